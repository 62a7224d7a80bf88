"""Thickness models' shared parts: bounds, frame features, smooth transforms, the base class.

Conventions: :mod:`edkit.models.thickness`.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edkit.errors import EdkitError

#: Default bounds of every thickness, Å.
LOWER = 20.0
UPPER = 5000.0
#: Smallest obliquity factor |cos| used in a path length t/|cos| (the platelet is never seen
#: exactly edge-on; 1/0.2 = 5 times the normal thickness at most).
COS_MIN = 0.2
#: Width of the softplus corner of :func:`soft_floor`, in units of cos.
COS_SOFTNESS = 0.01
#: Width of the saturating corners of :func:`soft_clamp`, as a fraction of (upper − lower).
CLAMP_SOFTNESS = 1e-3

KINDS = ("constant", "per-frame", "platelet", "wedge", "profile-net", "map-net")


class FrameFeatures(NamedTuple):
    """What a thickness model sees of each frame (a pytree: it passes through ``jit``).

    Attributes:
      alpha: goniometer α of each frame centre, degrees, shape (n_f,).
      alpha_normalized: α mapped linearly to [−1, 1] over the dataset's range, shape (n_f,).
      beam: unit vectors along the electrons' direction of travel at each frame centre,
        crystal-Cartesian axes, shape (n_f, 3).
    """

    alpha: jax.Array
    alpha_normalized: jax.Array
    beam: jax.Array


def float_dtype() -> jnp.dtype:
    """float64 when x64 is enabled, else float32."""
    return jnp.result_type(float)


def frame_features(
    alpha_degrees: jax.Array | np.ndarray | Sequence[float],
    beam_directions: jax.Array | np.ndarray,
    *,
    alpha_range: tuple[float, float] | None = None,
) -> FrameFeatures:
    """Build :class:`FrameFeatures` from the frames' α and beam directions.

    Args:
      alpha_degrees: goniometer α of each frame centre, degrees, shape (n_f,).
      beam_directions: the electrons' direction of travel per frame, crystal-Cartesian axes,
        shape (n_f, 3); normalised here.
      alpha_range: (α_min, α_max) in degrees mapped to [−1, 1]; default: the range of
        ``alpha_degrees`` (pass the whole dataset's range when building features of a subset).
        A zero range (one frame, constant α) maps every frame to 0.

    Returns:
      FrameFeatures in the default float dtype (float64 under x64).
    """
    dtype = float_dtype()
    alpha = jnp.asarray(alpha_degrees, dtype=dtype)
    beam = jnp.asarray(beam_directions, dtype=dtype)
    if alpha.ndim != 1:
        raise EdkitError(f"frame_features: alpha must have shape (n_f,), got {alpha.shape}")
    if beam.shape != (alpha.shape[0], 3):
        raise EdkitError(
            f"frame_features: beam_directions must have shape ({alpha.shape[0]}, 3) to match "
            f"alpha, got {beam.shape}"
        )
    if alpha_range is None:
        lo, hi = jnp.min(alpha), jnp.max(alpha)
    else:
        lo, hi = (jnp.asarray(a, dtype=dtype) for a in alpha_range)
    span = hi - lo
    positive = span > 0
    safe_span = jnp.where(positive, span, 1.0)
    normalized = jnp.where(positive, 2.0 * (alpha - lo) / safe_span - 1.0, 0.0)
    beam = beam / jnp.linalg.norm(beam, axis=-1, keepdims=True)
    return FrameFeatures(alpha=alpha, alpha_normalized=normalized, beam=beam)


# --- smooth transforms -------------------------------------------------------------------------


def bounded(raw: jax.Array, lower: float, upper: float) -> jax.Array:
    """Map an unconstrained ``raw`` onto (lower, upper) as lower·(upper/lower)^σ(raw), Å.

    Written as lower + (upper − lower)·expm1(σ L)/expm1(L), L = log(upper/lower), so the ends
    are reached exactly (σ = 0 → lower, σ = 1 → upper) even in floating point.
    """
    log_ratio = float(np.log(upper / lower))
    fraction = jnp.expm1(jax.nn.sigmoid(raw) * log_ratio) / np.expm1(log_ratio)
    return lower + (upper - lower) * fraction


def unbounded(value: float | np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Inverse of :func:`bounded` (numpy, for initialisation); ``value`` strictly inside."""
    value = np.asarray(value, dtype=float)
    if np.any(~np.isfinite(value)) or np.any(value <= lower) or np.any(value >= upper):
        raise EdkitError(
            f"initial thickness {value} must lie strictly inside the bounds ({lower}, {upper}) Å"
        )
    s = np.log(value / lower) / np.log(upper / lower)
    return np.log(s) - np.log1p(-s)


def soft_clamp(t: jax.Array, lower: float, upper: float) -> jax.Array:
    """Smooth clamp of ``t`` into (lower, upper): the identity well inside, saturating at both.

    f(t) = lower + s·[softplus((t − lower)/s) − softplus((t − upper)/s)], s = 10⁻³(upper −
    lower); 0 < f − lower < upper − lower since softplus is increasing and 1-Lipschitz. The two
    algebraically equal forms below keep it exact for huge |t| (no difference of large numbers).
    """
    s = CLAMP_SOFTNESS * (upper - lower)
    a = (t - lower) / s
    b = (t - upper) / s
    low_side = jax.nn.softplus(a) - jax.nn.softplus(b)
    high_side = (upper - lower) / s + jax.nn.softplus(-a) - jax.nn.softplus(-b)
    return lower + s * jnp.where(t < 0.5 * (lower + upper), low_side, high_side)


def soft_floor(c: jax.Array, c_min: float = COS_MIN) -> jax.Array:
    """Smooth max(c, c_min): c_min + τ·softplus((c − c_min)/τ), τ = 0.01 (error < 10⁻¹⁵ for
    c ≥ c_min + 0.3)."""
    return c_min + COS_SOFTNESS * jax.nn.softplus((c - c_min) / COS_SOFTNESS)


def check_finite(values: jax.Array, weights: jax.Array) -> jax.Array:
    """True when a model's (values, weights) are all finite; a 0-d bool array (works under jit).

    Models never raise on non-finite inputs (a NaN α or beam propagates); the refinement calls
    this on their outputs and reports the model instead (``bool(check_finite(...))`` outside jit).
    """
    return jnp.all(jnp.isfinite(values)) & jnp.all(jnp.isfinite(weights))


def check_bounds(lower: float, upper: float) -> tuple[float, float]:
    lower, upper = float(lower), float(upper)
    if not (0.0 < lower < upper < np.inf):
        raise EdkitError(f"thickness bounds must satisfy 0 < lower < upper, got {lower}, {upper}")
    return lower, upper


def uniform_weights(n_frames: int, n_nodes: int, dtype) -> jax.Array:
    return jnp.full((n_frames, n_nodes), 1.0 / n_nodes, dtype=dtype)


# --- the protocol ------------------------------------------------------------------------------


class ThicknessModel(nnx.Module):
    """Base class: per-frame thickness distributions.

    Subclasses set ``n_nodes`` (static, the n_t of the outputs), ``lower`` and ``upper`` (Å) and
    implement ``__call__(features) -> (values, weights)``:

    * values: thickness nodes, Å, shape (n_f, n_t), within [lower, upper];
    * weights: ≥ 0 and summing to 1 over the last axis, shape (n_f, n_t).
    """

    n_nodes: int
    lower: float
    upper: float

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def mean_thickness(self, features: FrameFeatures) -> jax.Array:
        """Σ_k w_k t_k per frame, Å, shape (n_f,)."""
        values, weights = self(features)
        return jnp.sum(values * weights, axis=-1)

    def fitted_thickness(self, features: FrameFeatures) -> jax.Array:
        """What :func:`~edkit.models.thickness.fit_to_thickness` matches to its target, Å,
        (n_f,): the mean thickness unless a model says otherwise."""
        return self.mean_thickness(features)
