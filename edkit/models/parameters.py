"""Refinable structure parameters with site-symmetry constraints and riding hydrogens.

Positions are refined as Cartesian shifts in Å along an orthonormal basis of each site's allowed
directions (so one learning rate in Å fits every cell); ADPs as U^cif shifts in Å² along a basis
of the site-allowed Uij (one parameter, ΔUiso, for isotropic atoms). Hydrogens ride: their
position follows the parent's shift through the symmetry operator that links them, and an
isotropic riding H takes Uiso = 1.2 × Ueq of its parent (1.5 for hydroxyl H and for the H of
methyl-like groups, a parent carrying three or more riding H: SHELX's AFIX/Uiso conventions).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from edkit.crystal import Crystal, adp_matrix, adp_vector
from edkit.physics.structure import StructureParams

#: Smallest eigenvalue an ADP tensor may take (Cartesian, Å²) before the penalty acts.
ADP_FLOOR = 1e-4
#: Uiso of a riding H over Ueq of its parent: usually, and for OH / CH3-like groups.
RIDING_U_FACTOR, RIDING_U_FACTOR_GROUP = 1.2, 1.5


def _orthonormal_columns(m: np.ndarray, tolerance: float = 1e-8) -> np.ndarray:
    """Orthonormal basis of the column space of m, padded with zero columns to m's width."""
    u, s, _ = np.linalg.svd(m)
    rank = int(np.sum(s > tolerance * max(1.0, s.max(initial=0.0))))
    basis = np.zeros_like(m)
    basis[:, :rank] = u[:, :rank]
    return basis


@dataclass(frozen=True, eq=False)
class StructureMapping:
    """How refinable coefficients map onto a structure (see module docstring).

    Attributes (n = asymmetric-unit atoms):
      fract0: starting fractional coordinates, (n, 3).
      u_cif0: starting U^cif 6-vectors (U11, U22, U33, U12, U13, U23), Å², (n, 6).
      occupancy0: (n,).
      position_basis: fractional shift per Å of each coefficient, (n, 3, 3); zero columns for
        directions fixed by symmetry and for riding atoms.
      adp_basis: U^cif shift per Å² of each coefficient, (n, 6, 6); zero columns where fixed.
      riding_parent: parent atom of each riding H, −1 otherwise, (n,).
      riding_rotation: rotation carrying the parent's fractional shift to the H, (n, 3, 3).
      reciprocal_lengths: |a*|, |b*|, |c*|, Å⁻¹, (3,).
      real_basis: rows a, b, c (Å), (3, 3).
      labels: atom labels.
      riding_u_factor: Uiso / Ueq(parent) of each isotropic riding H, 0 otherwise, (n,).
      iso_direction: the U^cif 6-vector of Uiso = 1 Å² in this cell, (6,).
    """

    fract0: np.ndarray
    u_cif0: np.ndarray
    occupancy0: np.ndarray
    position_basis: np.ndarray
    adp_basis: np.ndarray
    riding_parent: np.ndarray
    riding_rotation: np.ndarray
    reciprocal_lengths: np.ndarray
    real_basis: np.ndarray
    labels: tuple[str, ...]
    riding_u_factor: np.ndarray | None = None
    iso_direction: np.ndarray | None = None

    @property
    def position_mask(self) -> np.ndarray:
        """Free position coefficients, bool (n, 3)."""
        return np.any(self.position_basis != 0, axis=1)

    @property
    def adp_mask(self) -> np.ndarray:
        """Free ADP coefficients, bool (n, 6)."""
        return np.any(self.adp_basis != 0, axis=1)

    def fract(self, positions: jax.Array) -> jax.Array:
        """Fractional coordinates, (n, 3), from position coefficients (Å), (n, 3)."""
        shift = jnp.einsum("nij,nj->ni", self.position_basis, positions)
        parents = np.maximum(self.riding_parent, 0)
        riding = jnp.einsum("nij,nj->ni", self.riding_rotation, shift[parents])
        shift = jnp.where((self.riding_parent >= 0)[:, None], riding, shift)
        return jnp.asarray(self.fract0) + shift

    def u_cif(self, adp: jax.Array) -> jax.Array:
        """U^cif 6-vectors, Å², (n, 6), from ADP coefficients (Å²), (n, 6); a riding H's
        Uiso follows its parent's Ueq (``riding_u_factor``)."""
        u = jnp.asarray(self.u_cif0) + jnp.einsum("nij,nj->ni", self.adp_basis, adp)
        factor = self.riding_u_factor
        if factor is None or self.iso_direction is None or not np.any(factor > 0):
            return u
        m = jnp.asarray(_cartesian_adp_map(self))
        u_cart = jnp.einsum("ij,njk,lk->nil", m, _matrix(u), m)
        ueq = jnp.trace(u_cart, axis1=1, axis2=2) / 3.0
        parents = np.maximum(self.riding_parent, 0)
        riding = (factor * ueq[parents])[:, None] * jnp.asarray(self.iso_direction)[None, :]
        return jnp.where((factor > 0)[:, None], riding, u)

    def structure(
        self, positions: jax.Array, adp: jax.Array, occupancy_shift: jax.Array
    ) -> StructureParams:
        """The structure for coefficients (positions Å (n, 3), ADPs Å² (n, 6), Δocc (n,))."""
        u = _matrix(self.u_cif(adp))
        scale = jnp.asarray(self.reciprocal_lengths)
        u_star = u * scale[None, :, None] * scale[None, None, :]
        return StructureParams(
            fract=self.fract(positions),
            u_star=u_star,
            occupancy=jnp.asarray(self.occupancy0) + occupancy_shift,
        )

    def adp_penalty(self, adp: jax.Array) -> jax.Array:
        """Σ relu(ADP_FLOOR − λ_min)² over atoms: keeps every U tensor positive definite."""
        m = jnp.asarray(_cartesian_adp_map(self))
        u_cart = jnp.einsum("ij,njk,lk->nil", m, _matrix(self.u_cif(adp)), m)
        smallest = jnp.linalg.eigvalsh(u_cart)[:, 0]
        return jnp.sum(jnp.maximum(ADP_FLOOR - smallest, 0.0) ** 2)

    def crystal(self, crystal: Crystal, positions, adp, occupancy_shift) -> Crystal:
        """``crystal`` with refined positions, ADPs and occupancies (numpy)."""
        params = self.structure(positions, adp, occupancy_shift)
        return crystal.replace(
            fract=np.asarray(params.fract),
            u_cif=np.asarray(adp_matrix(np.asarray(self.u_cif(adp)))),
            occupancy=np.asarray(params.occupancy),
        )


def _cartesian_adp_map(mapping: StructureMapping) -> np.ndarray:
    """M with U_cart = M U^cif Mᵀ: the columns of M are |a*_i| a_i (A N, Trueblood et al.)."""
    return (mapping.real_basis * mapping.reciprocal_lengths[:, None]).T


def _matrix(v: jax.Array) -> jax.Array:
    """Symmetric (n, 3, 3) from (n, 6) in the order U11, U22, U33, U12, U13, U23 (JAX)."""
    u11, u22, u33, u12, u13, u23 = (v[:, i] for i in range(6))
    return jnp.stack(
        [
            jnp.stack([u11, u12, u13], axis=-1),
            jnp.stack([u12, u22, u23], axis=-1),
            jnp.stack([u13, u23, u33], axis=-1),
        ],
        axis=-2,
    )


def structure_mapping(
    crystal: Crystal, *, riding: bool = True, riding_uiso: bool = True
) -> StructureMapping:
    """Build the :class:`StructureMapping` of ``crystal``.

    Args:
      crystal: the starting structure.
      riding: hydrogens ride on their parent atom: position, and (``riding_uiso``) for an
        isotropic H its Uiso.
      riding_uiso: a riding isotropic H's Uiso is 1.2 or 1.5 × the parent's Ueq (see the
        module docstring); False: the crystal's own Uiso, fixed (SHELX's fixed-Uiso AFIX).
    """
    n = crystal.n_asu
    real = np.asarray(crystal.real_basis)
    to_fract = np.linalg.inv(real.T)  # δf = real⁻ᵀ δc
    position_projectors = crystal.position_projectors()
    adp_projectors = crystal.adp_projectors()
    reciprocal_lengths = np.linalg.norm(np.asarray(crystal.reciprocal_basis), axis=1)
    position_basis = np.zeros((n, 3, 3))
    adp_basis = np.zeros((n, 6, 6))
    parent = np.full(n, -1)
    riding_rotation = np.tile(np.eye(3), (n, 1, 1))
    if riding and any(e == "H" for e in crystal.elements):
        links_parent, links_op, _ = crystal.riding_links()
        for i in range(n):
            if links_parent[i] >= 0:
                parent[i] = links_parent[i]
                riding_rotation[i] = np.asarray(crystal.rotations)[links_op[i]]
    iso_direction = adp_vector(Crystal.u_cif_from_iso(crystal.cell, np.ones(1)))[0]
    riding_u_factor = np.zeros(n)
    for h in np.flatnonzero((parent >= 0) & ~np.asarray(crystal.anisotropic) & riding_uiso):
        group = crystal.elements[parent[h]] == "O" or np.sum(parent == parent[h]) >= 3
        riding_u_factor[h] = RIDING_U_FACTOR_GROUP if group else RIDING_U_FACTOR
    for i in range(n):
        if parent[i] < 0:
            cartesian = real.T @ position_projectors[i]  # allowed shifts as Cartesian columns
            position_basis[i] = to_fract @ _orthonormal_columns(cartesian)
        if parent[i] >= 0:
            continue  # riding H: position follows the parent, Uiso the parent's Ueq (or fixed)
        if crystal.anisotropic[i]:
            adp_basis[i] = _orthonormal_columns(adp_projectors[i])
        else:
            adp_basis[i, :, 0] = iso_direction  # one coefficient: ΔUiso
    return StructureMapping(
        fract0=np.asarray(crystal.fract, dtype=np.float64),
        u_cif0=adp_vector(np.asarray(crystal.u_cif, dtype=np.float64)),
        occupancy0=np.asarray(crystal.occupancy, dtype=np.float64),
        position_basis=position_basis,
        adp_basis=adp_basis,
        riding_parent=parent,
        riding_rotation=riding_rotation,
        reciprocal_lengths=reciprocal_lengths,
        real_basis=real,
        labels=tuple(crystal.labels),
        riding_u_factor=riding_u_factor,
        iso_direction=np.asarray(iso_direction, dtype=np.float64),
    )
