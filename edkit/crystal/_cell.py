"""Cell metric and displacement tensors: the real basis of a cell, ADP 6-vectors ↔ tensors, Ueq.

Conventions are those of :mod:`edkit.crystal`. These functions are the one definition of each
quantity: the numpy ones validate (they are where a cell enters edkit); :func:`cell_basis_rows`
and :func:`adp_matrix` also take JAX arrays, so the differentiable kernels share the formula.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from edkit.errors import EdkitError

# Voigt-like order of the 6-vector of a symmetric 3×3 ADP tensor, as CIF lists U11…U23.
ADP_INDICES: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))

# adp_matrix gathers tensor element (i, j) from 6-vector position _ADP_SQUARE[i, j].
_ADP_SQUARE = np.empty((3, 3), dtype=np.int64)
for _k, (_i, _j) in enumerate(ADP_INDICES):
    _ADP_SQUARE[_i, _j] = _ADP_SQUARE[_j, _i] = _k
_ADP_ROWS = np.array([i for i, _ in ADP_INDICES])
_ADP_COLS = np.array([j for _, j in ADP_INDICES])


def adp_vector(u: Any) -> Any:
    """The 6-vectors (U11, U22, U33, U12, U13, U23) of symmetric tensors, (..., 3, 3) → (..., 6).

    numpy in, numpy out; a JAX array in gives a JAX array (traceable, differentiable).
    """
    u = u if hasattr(u, "shape") else np.asarray(u)
    return u[..., _ADP_ROWS, _ADP_COLS]


def adp_matrix(v: Any) -> Any:
    """Symmetric tensors from 6-vectors (U11, U22, U33, U12, U13, U23), (..., 6) → (..., 3, 3).

    Anything but a JAX array is read as float64 numpy; a JAX array (also under ``jit``) stays
    one, with its dtype, so the refinement's parameter mapping uses this same definition.
    """
    if not hasattr(v, "shape") or isinstance(v, np.ndarray | np.generic):
        v = np.asarray(v, dtype=np.float64)
    return v[..., _ADP_SQUARE]


def _cos_deg(angle: float) -> float:
    # Exact values for the angles crystal systems fix, so that 90° cells give exact zeros in the
    # bases instead of 6e-17 (which would show as spurious couplings in printed tensors).
    exact = {90.0: 0.0, 60.0: 0.5, 120.0: -0.5}
    return exact.get(float(angle), math.cos(math.radians(angle)))


def cell_basis_rows(
    lengths: tuple[Any, Any, Any], cosines: tuple[Any, Any, Any], sin_gamma: Any, xp: Any = np
) -> Any:
    """Rows a, b, c (a ∥ x, b in xy, c with positive z), Å, (3, 3), from the cell's metric.

    The one formula behind :func:`real_basis_of` (numpy, validated) and
    :func:`edkit.physics.orientation.real_space_basis` (JAX, differentiable); it trusts its inputs.

    Args:
      lengths: a, b, c in Å (scalars).
      cosines: cos α, cos β, cos γ (scalars).
      sin_gamma: sin γ (scalar).
      xp: the array module, ``numpy`` or ``jax.numpy``.
    """
    a, b, c = lengths
    cos_a, cos_b, cos_g = cosines
    cy = (cos_a - cos_b * cos_g) / sin_gamma
    cz = xp.sqrt(1.0 - cos_b**2 - cy**2)
    zero = xp.zeros_like(a)
    return xp.stack(
        [
            xp.stack([a, zero, zero]),
            xp.stack([b * cos_g, b * sin_gamma, zero]),
            xp.stack([c * cos_b, c * cy, c * cz]),
        ]
    )


def real_basis_of(cell: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rows a, b, c in crystal-Cartesian axes (a ∥ x, b in xy, right-handed), Å, shape (3, 3).

    Args:
      cell: (a, b, c, α, β, γ), lengths in Å, angles in degrees.

    Raises:
      EdkitError: non-positive lengths or angles that do not make a cell of positive volume.
    """
    if len(cell) != 6:
        raise EdkitError(f"cell = {tuple(cell)!r} must have 6 numbers (a, b, c in Å; α, β, γ in °)")
    a, b, c, alpha, beta, gamma = (float(v) for v in cell)
    if not all(math.isfinite(v) and v > 0 for v in (a, b, c)):
        raise EdkitError(f"cell lengths a, b, c = {a}, {b}, {c} must be positive numbers in Å")
    if not all(math.isfinite(v) and 0 < v < 180 for v in (alpha, beta, gamma)):
        raise EdkitError(f"cell angles α, β, γ = {alpha}, {beta}, {gamma} must lie in (0°, 180°)")
    ca, cb, cg = _cos_deg(alpha), _cos_deg(beta), _cos_deg(gamma)
    sg = math.sin(math.radians(gamma))
    cy = (ca - cb * cg) / sg
    cz2 = 1.0 - cb * cb - cy * cy
    if cz2 <= 1e-12:
        raise EdkitError(
            f"cell angles α, β, γ = {alpha}, {beta}, {gamma}° do not make a cell of positive volume"
        )
    return cell_basis_rows((a, b, c), (ca, cb, cg), sg)


def cartesian_adp_map(real_basis: np.ndarray) -> np.ndarray:
    """M with U_cart = M U^cif Mᵀ: columns |a*_i| a_i (A N, Trueblood et al. 1996), Å·Å⁻¹, (3, 3).

    Args:
      real_basis: rows a, b, c in Å, (3, 3).
    """
    real_basis = np.asarray(real_basis, dtype=np.float64)
    reciprocal_lengths = np.linalg.norm(np.linalg.inv(real_basis).T, axis=1)  # |a*|, |b*|, |c*|
    return (real_basis * reciprocal_lengths[:, None]).T


def ueq(u_cif: np.ndarray, real_basis: np.ndarray) -> np.ndarray:
    """Ueq = tr(U_cart)/3 with U_cart = M U^cif Mᵀ (:func:`cartesian_adp_map`), Å², (...).

    Args:
      u_cif: U^cif tensors (the Uij of a CIF), Å², (..., 3, 3); 6-vectors go through
        :func:`adp_matrix` first.
      real_basis: rows a, b, c in Å, (3, 3).
    """
    m = cartesian_adp_map(real_basis)
    u_cart = np.einsum("ij,...jk,lk->...il", m, np.asarray(u_cif, dtype=np.float64), m)
    return np.trace(u_cart, axis1=-2, axis2=-1) / 3.0
