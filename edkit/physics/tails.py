"""Tails: first-order amplitudes of beams left out of a solve, from the solve's Bloch waves.

A run of sub-orientations (:mod:`edkit.simulate.segments`) solves only the beams near the Ewald
sphere over the run; a frame beam left out of it still has a small amplitude there, the tail of
its rocking curve. To first order in its coupling B_wj = (π/K) M_w M_j U(h_j − h_w) to the
solved beams, and with no coupling back (the Bethe correction carries that), a left-out beam w
with diagonal d_w = 2π S_w M_w² follows dψ_w/dt = i d_w ψ_w + i Σ_j B_wj ψ_j(t), so

    ψ_w(t) = Σ_j (B W)_wj c_j f[λ_j, d_w](t),   f[λ, d](t) = (e^{itλ} − e^{itd}) / (λ − d),

with the solve's eigenvalues λ_j, eigenvectors W and entrance amplitudes c = W⁻¹e₀: an
(n_o × n) product per orientation instead of a larger eigendecomposition. The divided difference
is taken apart into products of e^{itλ_j} and e^{itd_w} (never an (n_t, n_o, n) tensor), with a
series where λ_j ≈ d_w.

The derivative: the solved beams keep the Daleckii–Krein rule of :mod:`edkit.physics.bloch`
(exact at degenerate eigenvalues); the tails differentiate through the eigenvalues and the
eigenvectors, dλ = diag X and dW = W (F ∘ X) with X = W⁻¹ dB W and F_ij = 1/(λ_j − λ_i). Pairs
degenerate to within √ε of the spectrum's scale drop out of F (their eigenvectors are not
defined); there the tails' gradient misses that pair's term, everywhere else it is exact.
"""

import jax
import jax.numpy as jnp

from edkit.physics import bloch


def tail_waves(
    eigenvalues: jax.Array,
    right: jax.Array,
    entrance: jax.Array,
    coupling: jax.Array,
    diagonal: jax.Array,
    thickness: jax.Array,
) -> jax.Array:
    """Amplitudes of left-out beams, first order in their coupling to the solved beams.

    Args:
      eigenvalues: λ_j of the solved beams' matrix B, Å⁻¹, shape (n,).
      right: its eigenvectors W (columns), shape (n, n).
      entrance: c = W⁻¹e₀, shape (n,).
      coupling: B_wj of each left-out beam w to each solved beam j, Å⁻¹, shape (n_o, n); zero
        rows for padding.
      diagonal: d_w = 2π S_w M_w², Å⁻¹, shape (n_o,).
      thickness: Å, shape (n_t,).

    Returns:
      ψ_w(t), complex, shape (n_t, n_o), in the scaled basis of :func:`bloch.propagate_hermitian`
      (multiply by M_w / M₀ for the physical amplitude).
    """
    weights = (coupling @ right) * entrance[None, :]  # (B W)_wj c_j
    gap = diagonal[:, None] - eigenvalues[None, :]  # d_w − λ_j
    t_max = jnp.max(jnp.abs(thickness))
    near = jnp.abs(gap) * (0.5 * t_max) < bloch.NEAR_THRESHOLD
    far = jnp.where(near, 0.0, weights / jnp.where(near, 1.0, gap))
    phases = jnp.exp(1j * thickness[:, None] * eigenvalues[None, :])  # (n_t, n)
    own = jnp.exp(1j * thickness[:, None] * diagonal[None, :])  # (n_t, n_o)
    psi = own * far.sum(axis=1)[None, :] - phases @ far.T
    # f[λ, d](t) = i t e^{itλ} Σ_k p_k (t (d − λ)/2)^k where λ ≈ d (bloch.NEAR_SERIES).
    near_weights = jnp.where(near, weights, 0.0)
    half_gap = 0.5 * gap
    for power, coefficient in enumerate(bloch.NEAR_SERIES):
        t_power = (1j * coefficient) * thickness[:, None] ** (power + 1)
        psi = psi + t_power * (phases @ (near_weights * half_gap**power).T)
    return psi


def _rotation(eigenvalues: jax.Array, x: jax.Array) -> jax.Array:
    """F ∘ X with F_ij = 1/(λ_j − λ_i), zero on the diagonal and on degenerate pairs."""
    gap = eigenvalues[None, :] - eigenvalues[:, None]
    scale = jnp.max(jnp.abs(eigenvalues)) + jnp.finfo(jnp.real(gap).dtype).tiny
    degenerate = jnp.abs(gap) <= jnp.sqrt(jnp.finfo(jnp.real(gap).dtype).eps) * scale
    return jnp.where(degenerate, 0.0, x / jnp.where(degenerate, 1.0, gap))


@jax.custom_jvp
def propagate_hermitian_tails(
    b: jax.Array, coupling: jax.Array, diagonal: jax.Array, thickness: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """exp(i t B) e₀ for a Hermitian B and the first-order tails of left-out beams, one ``eigh``.

    Args:
      b: Hermitian B = (π/K) A of the solved beams, Å⁻¹, shape (n, n).
      coupling: B_wj, Å⁻¹, shape (n_o, n).
      diagonal: d_w, Å⁻¹, shape (n_o,).
      thickness: Å, shape (n_t,).

    Returns:
      (ψ of the solved beams (n_t, n), ψ of the left-out beams (n_t, n_o)), complex.
    """
    eigenvalues, vectors = jnp.linalg.eigh(b)
    entrance = jnp.conj(vectors[0])
    psi = bloch.propagate_from_eigensystem(eigenvalues, vectors, entrance, thickness)
    return psi, tail_waves(eigenvalues, vectors, entrance, coupling, diagonal, thickness)


@propagate_hermitian_tails.defjvp
def _propagate_hermitian_tails_jvp(primals, tangents):
    b, coupling, diagonal, thickness = primals
    db, dcoupling, ddiagonal, dthickness = tangents
    eigenvalues, vectors = bloch.named_eigensystem(jnp.linalg.eigh(b))
    left = jnp.conj(vectors).T
    entrance = left[:, 0]
    x = left @ db.astype(vectors.dtype) @ vectors
    psi, dpsi = bloch.transported_jvp(eigenvalues, vectors, entrance, thickness, x, dthickness)
    rotation = _rotation(eigenvalues, x)
    tangent_in = (
        jnp.real(jnp.diagonal(x)).astype(eigenvalues.dtype),
        vectors @ rotation,
        -(rotation @ entrance),
        dcoupling,
        ddiagonal,
        dthickness,
    )
    tail, dtail = jax.jvp(
        tail_waves, (eigenvalues, vectors, entrance, coupling, diagonal, thickness), tangent_in
    )
    return (psi, tail), (dpsi, dtail)


def intensities_with_tails(
    excitation_error: jax.Array,
    g_normal: jax.Array,
    potential: jax.Array,
    k_mag: float | jax.Array,
    thickness: jax.Array,
    tail_excitation_error: jax.Array,
    tail_g_normal: jax.Array,
    tail_potential: jax.Array,
    solve_dtype: jnp.dtype | None = None,
    bethe: jax.Array | None = None,
) -> jax.Array:
    """:func:`bloch.bloch_intensities` without absorption, plus the left-out beams' tails.

    Args:
      excitation_error, g_normal, potential, k_mag, thickness, solve_dtype, bethe: as in
        :func:`bloch.bloch_intensities` for the n solved beams.
      tail_excitation_error: S_w of the n_o left-out beams, Å⁻¹, shape (n_o,).
      tail_g_normal: g_w·n̂, Å⁻¹, shape (n_o,).
      tail_potential: U(h_j − h_w) from each solved beam j into each left-out beam w, Å⁻²,
        shape (n_o, n); zero rows for padding.

    Returns:
      Intensities of the solved beams then the left-out ones, shape (n_t, n + n_o).
    """
    metric = bloch.metric_factors(g_normal, k_mag)
    tail_metric = bloch.metric_factors(tail_g_normal, k_mag)
    scale = jnp.pi / k_mag
    a = bloch.structure_matrix(excitation_error, metric, potential, k_mag)
    out_dtype = jnp.real(a).dtype
    if bethe is not None:
        a = bloch.with_bethe(a, metric, bethe)
    coupling = (scale * tail_metric[:, None] * metric[None, :]) * tail_potential
    diagonal = (2.0 * jnp.pi) * tail_excitation_error * tail_metric**2
    b = bloch.cast_solve(scale * a, solve_dtype)
    t = thickness.astype(jnp.real(b).dtype)
    psi, tail = propagate_hermitian_tails(
        b, coupling.astype(b.dtype), diagonal.astype(jnp.real(b).dtype), t
    )
    psi = jnp.concatenate([psi, tail], axis=1).astype(jnp.result_type(out_dtype, jnp.complex64))
    metric_all = jnp.concatenate([metric, tail_metric])
    return (jnp.abs(psi * (metric_all[None, :] / metric[0])) ** 2).astype(out_dtype)
