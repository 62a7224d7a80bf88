"""The refinement's losses as sums over frames, so that chunks of frames add up exactly.

Each loss of :mod:`edkit.metrics` is an outer function of one sum over frames (every frame
scaled in closed form by its own reflections) divided by a data-only normaliser D:

* "jana": wR = sqrt(N / D), N = Σ w (F_o − k_f F_c)², D = Σ w F_o² (:func:`metrics.jana_wr_loss`);
* "wr2": the mean of per-frame intensity wR2 = S / D, S = Σ_f wR2_f, D = number of frames with a
  scored reflection (:func:`metrics.intensity_wr2_loss`, ``reduction="frame_mean"``).

:func:`chunk_partial_sum` gives a chunk's N (or S); :func:`loss_from_sums` the loss and its
derivative with respect to the total sum, by which the chunks' summed gradients are scaled.
"""

import jax
import jax.numpy as jnp

from edkit import metrics
from edkit.metrics._losses import _safe_div, _safe_sqrt  # one definition of the safe ops


def _wr2_frame_sum(i_obs, sigma, i_calc, mask, frame_index, n_frames):
    num, den = metrics.wr2_frame_terms(i_obs, sigma, i_calc, mask, frame_index, n_frames)
    return jnp.sum(jnp.where(den > 0, _safe_sqrt(_safe_div(num, den)), 0.0))


def chunk_partial_sum(
    objective: str,
    i_obs: jax.Array,
    sigma: jax.Array,
    i_calc: jax.Array,
    mask: jax.Array,
    frame_index: jax.Array,
    n_frames: int,
) -> jax.Array:
    """A chunk's share of the loss's sum (N for "jana", S for "wr2"; module docstring), ().

    Args:
      objective: "jana" or "wr2" (static).
      i_obs, sigma, i_calc: the chunk's reflections, (r,).
      mask: reflections that count, bool, (r,).
      frame_index: each reflection's frame within the chunk, (r,).
      n_frames: frames in the chunk (static).
    """
    if objective == "wr2":
        total = _wr2_frame_sum(i_obs, sigma, i_calc, mask, frame_index, n_frames)
    else:
        r = metrics.jana_residuals(i_obs, sigma, i_calc, mask, frame_index, n_frames)
        total = jnp.sum(r * r)
    # The loss functions read a non-finite I_obs as F_o = 0; here it makes the sum NaN, so that
    # data corrupted after the set-up stops the run (Refinement names the reflection).
    counted = jnp.asarray(mask, dtype=bool)
    data_finite = jnp.all(jnp.isfinite(jnp.where(counted, i_obs * sigma, 0.0)))
    return jnp.where(data_finite, total, jnp.nan)


def loss_from_sums(
    objective: str, total: jax.Array, denominator: float
) -> tuple[jax.Array, jax.Array]:
    """(loss, d loss / d total) from the summed partial sums; NaN loss when D = 0."""
    total = jnp.asarray(total)
    if denominator <= 0:
        return jnp.asarray(jnp.nan), jnp.zeros_like(total)
    if objective == "wr2":
        return total / denominator, jnp.ones_like(total) / denominator
    loss = _safe_sqrt(total / denominator)
    factor = _safe_div(jnp.ones_like(total), 2.0 * loss * denominator)
    return jnp.where(jnp.isfinite(total), loss, jnp.nan), factor  # a NaN sum stays NaN
