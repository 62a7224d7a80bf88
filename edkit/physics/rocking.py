"""Frames of a continuous-rotation dataset: rocking-curve integration (science.md §5).

A frame integrates the intensities of N sub-orientations R_x(φ_k) O_i, φ_k evenly spread over
[−θ, +θ] about the goniometer axis (lab x). Beams of a frame are padded to a common size with
*inert* beams (no coupling, far off the Ewald sphere) so one compiled function serves all frames.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edkit.errors import EdkitError
from edkit.physics import bloch, tails
from edkit.physics.orientation import rotation_x

#: Excitation error given to padding beams, Å⁻¹: far from any real beam, never coupled.
INERT_EXCITATION_ERROR = 10.0
#: Lab-frame direction of the electrons' travel (science.md §5: the beam travels along −z).
LAB_BEAM = np.array([0.0, 0.0, -1.0])


class WeakBeams(NamedTuple):
    """Beams of a frame that are folded into the strong ones as Bethe potentials.

    Attributes (n strong beams, n_w weak beams):
      g_cart: weak beams' reciprocal vectors, crystal axes, Å⁻¹, (n_w, 3).
      valid: False for padding, bool, (n_w,).
      potential_out: U(h_w − h_i), Å⁻², complex, (n, n_w).
      potential_in: U(h_j − h_w), Å⁻², complex, (n_w, n).
      absorptive_out, absorptive_in: the same for U', or None.
    """

    g_cart: jax.Array
    valid: jax.Array
    potential_out: jax.Array
    potential_in: jax.Array
    absorptive_out: jax.Array | None = None
    absorptive_in: jax.Array | None = None


class TailBeams(NamedTuple):
    """Frame beams left out of a solve whose first-order tails it adds (:mod:`.tails`).

    Attributes (n solved beams, n_o left-out beams):
      g_cart: their reciprocal vectors, crystal axes, Å⁻¹, (n_o, 3).
      valid: False for padding, bool, (n_o,).
      potential: U(h_j − h_w) from each solved beam j into each left-out beam w, Å⁻², (n_o, n).
    """

    g_cart: jax.Array
    valid: jax.Array
    potential: jax.Array


def sub_orientation_angles(semiangle: float, n_sub: int, mosaicity: float = 0.0) -> np.ndarray:
    """Goniometer offsets φ_k of a frame's sub-orientations, radians, shape (n_sub,).

    Midpoints of n_sub equal slices of [−θ, +θ] (θ = ``semiangle``, radians): the midpoint
    rule integrates the rocking curve to second order (0.14 % at 41 points on quartz, against
    2.8 % for end points included). With a Gaussian mosaic spread σ (radians) the range is
    [−θ − 2.5σ, θ + 2.5σ] and :func:`sub_orientation_weights` gives the edges their weight.
    """
    reach = semiangle + 2.5 * mosaicity
    return -reach + (np.arange(n_sub) + 0.5) * (2.0 * reach / n_sub)


def sub_orientation_weights(
    angles: np.ndarray, semiangle: float, mosaicity: float = 0.0
) -> np.ndarray:
    """Integration weights of sub-orientations, summing to 1, shape (n_sub,).

    The frame's box [−θ, +θ] convolved with a Gaussian of width σ = ``mosaicity`` (radians):
    w(φ) ∝ erf((θ − φ)/(√2σ)) + erf((θ + φ)/(√2σ)); uniform when σ = 0.
    """
    from scipy.special import erf

    if mosaicity <= 0:
        weights = np.ones_like(angles)
    else:
        scale = np.sqrt(2.0) * mosaicity
        weights = erf((semiangle - angles) / scale) + erf((semiangle + angles) / scale)
    return weights / weights.sum()


def sub_orientation_beams(frame_rotation: jax.Array, angles: jax.Array) -> jax.Array:
    """Electrons' direction of travel in crystal-Cartesian axes for each sub-orientation.

    Args:
      frame_rotation: O_i, lab ← crystal rotation of the frame centre, shape (3, 3).
      angles: goniometer offsets φ_k about lab x, radians, shape (n_sub,).

    Returns:
      Unit vectors (R_x(φ_k) O_i)ᵀ (−ẑ), shape (n_sub, 3).
    """

    def one(phi):
        return (rotation_x(phi) @ frame_rotation).T @ jnp.asarray(LAB_BEAM)

    return jax.vmap(one)(angles)


def chebyshev_fit(n_sub: int, n_terms: int) -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev basis over a frame's evenly spaced sub-orientations and its least-squares fit.

    Sub-orientation k of n_sub sits at x_k = (2k + 1)/n_sub − 1 ∈ (−1, 1) (its angle over the
    frame's reach, see :func:`sub_orientation_angles`).

    Args:
      n_sub: sub-orientations per frame.
      n_terms: Chebyshev polynomials T_0 … T_{n_terms − 1}; at most n_sub.

    Returns:
      (basis (n_sub, n_terms): T_j(x_k); fit (n_terms, n_sub): its pseudo-inverse, so that
      ``fit @ values`` are the coefficients of the least-squares fit of values (n_sub, …)).
    """
    x = (2.0 * np.arange(n_sub) + 1.0) / n_sub - 1.0
    basis = np.polynomial.chebyshev.chebvander(x, n_terms - 1)
    return basis, np.linalg.pinv(basis)


def frame_intensities(
    k_hats: jax.Array,
    weights: jax.Array,
    g_cart: jax.Array,
    valid: jax.Array,
    potential: jax.Array,
    k_mag: jax.Array,
    thickness: jax.Array,
    absorptive: jax.Array | None = None,
    method: bloch.AbsorptionMethod = "eig",
    solve_dtype: jnp.dtype | None = None,
    weak: WeakBeams | None = None,
    bethe_terms: int | None = None,
    sub_batch: int | None = None,
    tail: TailBeams | None = None,
) -> jax.Array:
    """Rocking-curve-integrated intensities of one frame, shape (n_t, n) (n + n_o with tails).

    Args:
      k_hats: electrons' direction for each sub-orientation, crystal axes, shape (n_sub, 3).
      weights: sub-orientation weights (sum 1), shape (n_sub,).
      g_cart: beams' reciprocal vectors, crystal axes, Å⁻¹, shape (n, 3); padding rows arbitrary.
      valid: False for padding beams, bool, shape (n,).
      potential: U(h_j − h_i), Å⁻², complex, shape (n, n) (padding rows/columns are ignored).
      k_mag: |K|, Å⁻¹.
      thickness: Å, shape (n_t,).
      absorptive: U'(h_j − h_i), complex, shape (n, n), or None.
      method: absorptive route (see ``bloch.bloch_intensities``).
      solve_dtype: complex dtype of the solves (see ``bloch.bloch_intensities``).
      weak: beams folded into the strong ones as Bethe potentials, or None.
      bethe_terms: share the Bethe correction over the frame's sub-orientations (which must be
        evenly spaced in angle, as :func:`sub_orientation_angles` makes them): fit each weak
        beam's 1/(2K S_w) by this many Chebyshev polynomials in the angle and build one
        correction matrix per polynomial (:func:`bloch.bethe_terms`) instead of one per
        sub-orientation. None, or ≥ n_sub, builds it exactly at every sub-orientation.
      sub_batch: solve this many sub-orientations at a time (``lax.map``, each chunk keeping only
        its eigendecompositions for the gradient) to bound the working memory of large beam
        sets; None solves all of them together (``vmap``).
      tail: left-out beams whose first-order tails are added (:func:`tails.intensities_with_tails`;
        without absorption only), or None.

    Returns:
      Σ_k w_k I_g(t; k), shape (n_t, n), then the left-out beams' with ``tail``, (n_t, n + n_o);
      zero on padding beams.
    """
    if tail is not None and absorptive is not None:
        raise EdkitError("tails are first order in a Hermitian solve: no absorption with tails")
    coupled = valid[:, None] & valid[None, :]
    potential = jnp.where(coupled, potential, 0.0)
    if absorptive is not None:
        absorptive = jnp.where(coupled, absorptive, 0.0)

    if weak is not None:
        # U + iU' between strong and weak beams; padding (invalid) pairs carry zero coupling.
        pair_out = valid[:, None] & weak.valid[None, :]
        pair_in = weak.valid[:, None] & valid[None, :]
        coupling_out = jnp.where(pair_out, weak.potential_out, 0.0)
        coupling_in = jnp.where(pair_in, weak.potential_in, 0.0)
        if (
            absorptive is not None
            and weak.absorptive_out is not None
            and weak.absorptive_in is not None
        ):
            coupling_out = coupling_out + 1j * jnp.where(pair_out, weak.absorptive_out, 0.0)
            coupling_in = coupling_in + 1j * jnp.where(pair_in, weak.absorptive_in, 0.0)

    if tail is not None:
        tail_potential = jnp.where(tail.valid[:, None] & valid[None, :], tail.potential, 0.0)
    valid_out = valid if tail is None else jnp.concatenate([valid, tail.valid])
    n_sub = k_hats.shape[0]
    shared = False
    if weak is not None and bethe_terms is not None and bethe_terms < n_sub:
        shared = True
        basis, fit = chebyshev_fit(n_sub, bethe_terms)
        s_weak = jax.vmap(lambda k: bloch.excitation_errors(weak.g_cart, k, k_mag))(k_hats)
        s_weak = jnp.where(weak.valid[None, :], s_weak, INERT_EXCITATION_ERROR)
        inverse = jnp.where(weak.valid[None, :], 1.0 / (2.0 * k_mag * s_weak), 0.0)
        terms = bloch.bethe_terms(coupling_out, coupling_in, jnp.asarray(fit) @ inverse)
    else:
        basis = np.zeros((n_sub, 0))

    def one(k_hat, basis_row):
        s = bloch.excitation_errors(g_cart, k_hat, k_mag)
        s = jnp.where(valid, s, INERT_EXCITATION_ERROR)
        g_normal = jnp.where(valid, g_cart @ k_hat, 0.0)
        bethe = None
        if shared:
            bethe = jnp.einsum("k,kij->ij", basis_row.astype(terms.real.dtype), terms)
        elif weak is not None:
            s_weak = bloch.excitation_errors(weak.g_cart, k_hat, k_mag)
            s_weak = jnp.where(weak.valid, s_weak, INERT_EXCITATION_ERROR)
            bethe = bloch.bethe_correction(coupling_out, coupling_in, s_weak, k_mag)
        if tail is not None:
            s_tail = bloch.excitation_errors(tail.g_cart, k_hat, k_mag)
            s_tail = jnp.where(tail.valid, s_tail, INERT_EXCITATION_ERROR)
            return tails.intensities_with_tails(
                s, g_normal, potential, k_mag, thickness, s_tail,
                jnp.where(tail.valid, tail.g_cart @ k_hat, 0.0), tail_potential, solve_dtype, bethe,
            )  # fmt: skip
        return bloch.bloch_intensities(
            s, g_normal, potential, k_mag, thickness, absorptive, method, solve_dtype, bethe
        )

    if sub_batch is None or sub_batch >= n_sub:
        intensities = jax.vmap(one)(k_hats, jnp.asarray(basis))  # (n_sub, n_t, n)
    else:
        # Each chunk keeps only its eigendecompositions for the gradient (the rest is recomputed
        # chunk by chunk): without this the backward pass would hold every chunk's intermediates.
        chunk = jax.checkpoint(lambda x: one(*x), policy=bloch.KEEP_EIGENSYSTEMS)
        intensities = jax.lax.map(chunk, (k_hats, jnp.asarray(basis)), batch_size=sub_batch)
    return jnp.where(valid_out[None, :], jnp.einsum("k,ktn->tn", weights, intensities), 0.0)
