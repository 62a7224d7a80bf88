"""Electron structure factors of a unit cell, differentiable in positions, ADPs and occupancies.

Conventions (science.md §3): reciprocal vectors in Å⁻¹ without 2π; the crystallographic sign
F(h) = (1/Ω) Σⱼ occⱼ fⱼ(|g|) exp(−2π² hᵀU*ⱼh) exp(+2πi h·xⱼ), F in Å⁻² with f in Å and Ω in Å³.
"""

import jax
import jax.numpy as jnp
import numpy as np

from edkit.physics.scattering import lobato_form_factor


def expand_to_cell(
    fract: jax.Array,
    u_star: jax.Array,
    occupancy: jax.Array,
    rotations: jax.Array | np.ndarray,
    translations: jax.Array | np.ndarray,
    site_atom: jax.Array | np.ndarray,
    site_op: jax.Array | np.ndarray,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Apply the space-group operators that generate each unit-cell atom.

    x' = R x + t and U*' = R U* Rᵀ (R, t act on fractional coordinates).

    Args:
      fract: asymmetric-unit fractional coordinates, shape (n_asu, 3).
      u_star: asymmetric-unit U* tensors (Debye–Waller exp(−2π² hᵀU*h)), shape (n_asu, 3, 3).
      occupancy: shape (n_asu,).
      rotations: operators' rotation parts, shape (n_ops, 3, 3).
      translations: operators' translations, shape (n_ops, 3).
      site_atom: asymmetric-unit index of each unit-cell atom, int, shape (n_cell,).
      site_op: operator index generating each unit-cell atom, int, shape (n_cell,).

    Returns:
      (fract, u_star, occupancy) of the unit cell, shapes (n_cell, 3), (n_cell, 3, 3), (n_cell,).
    """
    rot = rotations[site_op]
    cell_fract = jnp.einsum("nij,nj->ni", rot, fract[site_atom]) + translations[site_op]
    cell_u = jnp.einsum("nij,njk,nlk->nil", rot, u_star[site_atom], rot)
    return cell_fract, cell_u, occupancy[site_atom]


def structure_factors(
    hkl: jax.Array | np.ndarray,
    reciprocal_metric: jax.Array | np.ndarray,
    volume: float | jax.Array | np.ndarray,
    fract: jax.Array,
    u_star: jax.Array,
    occupancy: jax.Array,
    lobato_a: jax.Array | np.ndarray,
    lobato_b: jax.Array | np.ndarray,
) -> jax.Array:
    """Structure factors F(h) in Å⁻² for a list of Miller indices (science.md §3).

    Args:
      hkl: Miller indices, shape (n_hkl, 3) (ints or floats).
      reciprocal_metric: G*, shape (3, 3), Å⁻²; |g|² = hᵀG*h.
      volume: unit-cell volume Ω in Å³.
      fract: unit-cell atoms' fractional coordinates, shape (n_cell, 3).
      u_star: unit-cell atoms' U* tensors, shape (n_cell, 3, 3).
      occupancy: shape (n_cell,).
      lobato_a, lobato_b: Lobato–Van Dyck parameters of each atom, shape (n_cell, 5).

    Returns:
      Complex structure factors, shape (n_hkl,), crystallographic sign exp(+2πi h·x).
    """
    hkl = jnp.asarray(hkl, dtype=fract.dtype)
    g_squared = jnp.einsum("hi,ij,hj->h", hkl, reciprocal_metric, hkl)
    positive = g_squared > 0.0
    # Double where: a finite (zero) gradient at g = 0 should the metric ever be refined.
    g_norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, g_squared, 1.0)), 0.0)
    form = lobato_form_factor(lobato_a[:, None, :], lobato_b[:, None, :], g_norm[None, :])
    debye_waller = jnp.exp(-2.0 * jnp.pi**2 * jnp.einsum("hi,nij,hj->nh", hkl, u_star, hkl))
    phase = 2.0 * jnp.pi * (fract @ hkl.T)  # (n_cell, n_hkl)
    amplitude = occupancy[:, None] * form * debye_waller
    real = jnp.sum(amplitude * jnp.cos(phase), axis=0)
    imag = jnp.sum(amplitude * jnp.sin(phase), axis=0)
    return jax.lax.complex(real, imag) / volume
