"""Differentiable losses (pure ``jax.numpy``): Jana wR on |F| and the per-frame intensity wR2.

They trust their inputs, work under ``jax.jit`` (``n_frames`` static) and ``jax.grad``, and keep
gradients finite where a calculated intensity is exactly zero (double ``where``, as optax's
``safe_norm``). Conventions: :mod:`edkit.metrics`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from edkit.errors import EdkitError
from edkit.metrics._report import JANA_INSTABILITY, WEAK_SIGMA_CUT


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt(max(x, 0)) whose gradient is 0 (not inf/NaN) at x ≤ 0 (optax ``safe_norm``)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 with a zero gradient where den == 0 (double ``where``)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _selection(mask: jax.Array) -> jax.Array:
    """Boolean selection from a boolean or 0/1 float mask."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def jana_weights(i_obs: jax.Array, sigma: jax.Array) -> jax.Array:
    """Jana2020 weights on |F| in JAX, the twin of :func:`_jana_weights_np` (science.md §7).

    w = 1/(σ_F² + (0.01 F_o)²), σ_F = σ/(2F_o), or 5√σ where I_o < 0.01σ; σ must be > 0.
    """
    f_o = _safe_sqrt(i_obs)
    weak = i_obs < WEAK_SIGMA_CUT * sigma
    sigma_f = jnp.where(weak, 5.0 * jnp.sqrt(sigma), 0.5 * sigma / jnp.where(weak, 1.0, f_o))
    return 1.0 / (sigma_f**2 + (JANA_INSTABILITY * f_o) ** 2)


def _jana_terms(
    i_obs: jax.Array,
    sigma: jax.Array,
    i_calc: jax.Array,
    mask: jax.Array,
    frame_index: jax.Array,
    n_frames: int,
) -> tuple[jax.Array, jax.Array]:
    """(sqrt(w)(F_o − k_f F_c), w F_o²) of every reflection, zero off ``mask``: the terms of
    Jana's wR with the closed-form per-frame amplitude scale (see :func:`jana_wr_loss`)."""
    sel = _selection(mask)
    i_o = jnp.where(sel, i_obs, 0.0)
    s = jnp.where(sel, sigma, 1.0)
    f_o = _safe_sqrt(i_o)
    f_c = _safe_sqrt(jnp.where(sel, i_calc, 0.0))
    w = jnp.where(sel, jana_weights(i_o, s), 0.0)
    num_k = jax.ops.segment_sum(w * f_o * f_c, frame_index, num_segments=n_frames)
    den_k = jax.ops.segment_sum(w * f_c * f_c, frame_index, num_segments=n_frames)
    k = _safe_div(num_k, den_k)
    return _safe_sqrt(w) * (f_o - k[frame_index] * f_c), w * f_o**2


def jana_residuals(
    i_obs: jax.Array,
    sigma: jax.Array,
    i_calc: jax.Array,
    mask: jax.Array,
    frame_index: jax.Array,
    n_frames: int,
) -> jax.Array:
    """Jana's weighted |F| residuals sqrt(w)(F_o − k_f F_c), each frame scaled in closed form,
    zero off ``mask``, shape (n_refl,): Σ r² is the numerator of :func:`jana_wr_loss`, and
    least squares (Levenberg–Marquardt, s.u.'s) minimise it. Arguments as there."""
    return _jana_terms(i_obs, sigma, i_calc, mask, frame_index, n_frames)[0]


def jana_wr_loss(
    i_obs: jax.Array,
    sigma: jax.Array,
    i_calc: jax.Array,
    mask: jax.Array,
    frame_index: jax.Array,
    n_frames: int,
) -> jax.Array:
    """Jana wR on |F| over the scored reflections, each frame scaled in closed form (§7).

    Per frame f, the amplitude scale k_f = Σ w F_o F_c / Σ w F_c² (sums over the scored
    reflections of f) is the exact minimiser of Σ w (F_o − k_f F_c)², computed inside the loss
    so the gradient goes through it; k_f F_c = sqrt(k_f² I_c), i.e. the intensity scale is k_f².
    Then wR = sqrt(Σ w (F_o − k_f F_c)² / Σ w F_o²) over every scored reflection (one global
    ratio). F_o = sqrt(max(I_o, 0)), F_c = sqrt(max(I_c, 0)), w are Jana's weights
    (:func:`jana_figures`). The loss is invariant to any positive rescaling of ``i_calc``.

    Gradients stay finite where I_c = 0 (F_c's gradient there is taken as 0), at a perfect fit
    (wR = 0) and in a frame with no scored reflection (k_f = 0). Unscored reflections may carry
    any finite or non-finite values: they never reach the value or the gradient. Computed in the
    dtype of the inputs (float64 under x64).

    Args:
      i_obs: observed intensities, arbitrary units, shape (n_refl,).
      sigma: σ(I_o), shape (n_refl,); > 0 on scored reflections.
      i_calc: calculated intensities on any scale, shape (n_refl,); the differentiated input.
      mask: scored reflections, bool or 0/1 float, shape (n_refl,).
      frame_index: frame of each reflection, int in [0, n_frames), shape (n_refl,).
      n_frames: number of frames (static under ``jax.jit``).

    Returns:
      wR as a fraction, shape (). NaN (with a zero gradient) when nothing is scored or every
      scored F_o is 0.
    """
    residuals, squares = _jana_terms(i_obs, sigma, i_calc, mask, frame_index, n_frames)
    num = jnp.sum(residuals**2)
    den = jnp.sum(squares)
    return jnp.where(den > 0, _safe_sqrt(_safe_div(num, den)), jnp.nan)


def wr2_frame_terms(
    i_obs: jax.Array,
    sigma: jax.Array,
    i_calc: jax.Array,
    mask: jax.Array,
    frame_index: jax.Array,
    n_frames: int,
) -> tuple[jax.Array, jax.Array]:
    """Per frame Σ w (I_o − k_f I_c)² and Σ w I_o² (w = 1/σ², k_f in closed form, sums over
    ``mask``), each (n_frames,): wR2_f = sqrt(num/den) (see :func:`intensity_wr2_loss`)."""
    sel = _selection(mask)
    i_o = jnp.where(sel, i_obs, 0.0)
    s = jnp.where(sel, sigma, 1.0)
    i_c = jnp.where(sel, i_calc, 0.0)
    w = jnp.where(sel, 1.0 / s**2, 0.0)
    num_k = jax.ops.segment_sum(w * i_o * i_c, frame_index, num_segments=n_frames)
    den_k = jax.ops.segment_sum(w * i_c * i_c, frame_index, num_segments=n_frames)
    k = _safe_div(num_k, den_k)
    res = i_o - k[frame_index] * i_c
    num = jax.ops.segment_sum(w * res**2, frame_index, num_segments=n_frames)
    den = jax.ops.segment_sum(w * i_o**2, frame_index, num_segments=n_frames)
    return num, den


def intensity_wr2_loss(
    i_obs: jax.Array,
    sigma: jax.Array,
    i_calc: jax.Array,
    mask: jax.Array,
    frame_index: jax.Array,
    n_frames: int,
    *,
    reduction: Literal["frame_mean", "global"] = "frame_mean",
) -> jax.Array:
    """diffBloch's intensity wR2 with a closed-form per-frame scale (science.md §7).

    Per frame f (sums over its scored reflections), w = 1/σ², k_f = Σ w I_o I_c / Σ w I_c²
    (computed inside the loss and differentiated through) and
    wR2_f = sqrt(Σ w (I_o − k_f I_c)² / Σ w I_o²), as :func:`frame_wr2` reports.

    ``reduction="frame_mean"`` (default) returns the mean of wR2_f over the frames with a scored
    reflection (Σ w I_o² > 0): every frame weighs the same, as in the paper's per-frame
    objective. ``reduction="global"`` returns sqrt(Σ_f Σ w (I_o − k_f I_c)² / Σ_f Σ w I_o²),
    which weighs frames by their Σ w I_o². Both are invariant to a positive rescaling of
    ``i_calc``; gradients stay finite at a perfect fit, at I_c = 0 and for empty frames.

    Args:
      i_obs: observed intensities, arbitrary units, shape (n_refl,); negative values allowed.
      sigma: σ(I_o), shape (n_refl,); > 0 on scored reflections.
      i_calc: calculated intensities on any scale, shape (n_refl,); the differentiated input.
      mask: scored reflections, bool or 0/1 float, shape (n_refl,).
      frame_index: frame of each reflection, int in [0, n_frames), shape (n_refl,).
      n_frames: number of frames (static under ``jax.jit``).
      reduction: "frame_mean" or "global" (static).

    Returns:
      wR2 as a fraction, shape (). NaN (with a zero gradient) when nothing is scored.

    Raises:
      EdkitError: ``reduction`` is not "frame_mean" or "global" (raised while tracing).
    """
    if reduction not in ("frame_mean", "global"):
        raise EdkitError(
            f"intensity_wr2_loss: reduction = {reduction!r}, expected 'frame_mean' or 'global'"
        )
    num, den = wr2_frame_terms(i_obs, sigma, i_calc, mask, frame_index, n_frames)
    if reduction == "global":
        total = jnp.sum(den)
        return jnp.where(total > 0, _safe_sqrt(_safe_div(jnp.sum(num), total)), jnp.nan)
    valid = den > 0
    n_valid = jnp.sum(valid)
    per_frame = jnp.where(valid, _safe_sqrt(_safe_div(num, den)), 0.0)
    return jnp.where(n_valid > 0, _safe_div(jnp.sum(per_frame), n_valid), jnp.nan)
