"""From a :class:`~edkit.crystal.Crystal` to the arrays the physics kernel differentiates.

``StructureTables`` holds what stays fixed during a refinement (symmetry, scattering-factor
parameters, metric); ``StructureParams`` holds what is refined (asymmetric-unit positions, U*,
occupancies). ``structure_factors_of`` joins them into F(h).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edkit.crystal import Crystal
from edkit.physics.scattering import lobato_parameters
from edkit.physics.structure_factors import expand_to_cell, structure_factors


class StructureTables(NamedTuple):
    """Fixed data of a crystal (float64 numpy arrays, or their device copies in a refinement
    problem; hashable shapes for jit).

    Attributes:
      rotations: (n_ops, 3, 3); translations: (n_ops, 3): space-group operators (fractional).
      site_atom, site_op: int (n_cell,): which asymmetric-unit atom and operator make each atom.
      lobato_a, lobato_b: (n_cell, 5) scattering-factor parameters of each unit-cell atom.
      reciprocal_metric: G*, (3, 3), Å⁻². volume: Ω, Å³, shape ().
      reciprocal_basis: rows a*, b*, c* in crystal-Cartesian axes, Å⁻¹, (3, 3).
      real_basis: rows a, b, c in crystal-Cartesian axes (a along x, b in xy), Å, (3, 3).
    """

    rotations: np.ndarray | jax.Array
    translations: np.ndarray | jax.Array
    site_atom: np.ndarray | jax.Array
    site_op: np.ndarray | jax.Array
    lobato_a: np.ndarray | jax.Array
    lobato_b: np.ndarray | jax.Array
    reciprocal_metric: np.ndarray | jax.Array
    volume: np.ndarray | jax.Array
    reciprocal_basis: np.ndarray | jax.Array
    real_basis: np.ndarray | jax.Array


class StructureParams(NamedTuple):
    """Refinable structure, asymmetric unit.

    Attributes:
      fract: fractional coordinates, (n_asu, 3).
      u_star: U* tensors, (n_asu, 3, 3) (Debye–Waller exp(−2π² hᵀU*h)).
      occupancy: (n_asu,).
    """

    fract: jax.Array | np.ndarray
    u_star: jax.Array | np.ndarray
    occupancy: jax.Array | np.ndarray


def structure_tables(crystal: Crystal) -> StructureTables:
    """The fixed arrays of ``crystal`` (see :class:`StructureTables`)."""
    a, b = lobato_parameters(np.asarray(crystal.atomic_numbers)[crystal.site_atom])
    return StructureTables(
        rotations=np.asarray(crystal.rotations, dtype=np.float64),
        translations=np.asarray(crystal.translations, dtype=np.float64),
        site_atom=np.asarray(crystal.site_atom, dtype=np.int32),
        site_op=np.asarray(crystal.site_op, dtype=np.int32),
        lobato_a=a,
        lobato_b=b,
        reciprocal_metric=np.asarray(crystal.reciprocal_metric, dtype=np.float64),
        volume=np.asarray(crystal.volume, dtype=np.float64),
        reciprocal_basis=np.asarray(crystal.reciprocal_basis, dtype=np.float64),
        real_basis=np.asarray(crystal.real_basis, dtype=np.float64),
    )


def structure_params(crystal: Crystal) -> StructureParams:
    """The refinable arrays of ``crystal`` as float64 numpy (see :class:`StructureParams`)."""
    return StructureParams(
        fract=np.asarray(crystal.fract, dtype=np.float64),
        u_star=np.asarray(crystal.u_star, dtype=np.float64),
        occupancy=np.asarray(crystal.occupancy, dtype=np.float64),
    )


def centric_at_origin(tables: StructureTables, tolerance: float = 1e-9) -> bool:
    """True when the space group contains the inversion through the origin (x, y, z → −x, −y,
    −z): then F(h) = F(−h) = F(h)* is real for every structure of the group, and the Bloch
    matrices are real symmetric."""
    inversion = np.all(np.abs(tables.rotations + np.eye(3)) < tolerance, axis=(1, 2))
    shift = tables.translations - np.round(tables.translations)
    return bool(np.any(inversion & np.all(np.abs(shift) < tolerance, axis=1)))


def structure_factors_of(
    params: StructureParams, tables: StructureTables, hkl: jax.Array | np.ndarray
) -> jax.Array:
    """F(h) in Å⁻² (complex, shape (n_hkl,)) of the structure ``params`` for Miller indices hkl."""
    fract, u_star, occupancy = expand_to_cell(
        jnp.asarray(params.fract),
        jnp.asarray(params.u_star),
        jnp.asarray(params.occupancy),
        tables.rotations,
        tables.translations,
        tables.site_atom,
        tables.site_op,
    )
    return structure_factors(
        hkl,
        tables.reciprocal_metric,
        tables.volume,
        fract,
        u_star,
        occupancy,
        tables.lobato_a,
        tables.lobato_b,
    )
