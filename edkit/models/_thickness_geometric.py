"""Thickness models with a geometric form: constant, one value per frame, a tilted platelet.

Conventions: :mod:`edkit.models.thickness`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edkit.errors import EdkitError
from edkit.models._thickness_base import (
    COS_MIN,
    LOWER,
    UPPER,
    FrameFeatures,
    ThicknessModel,
    bounded,
    check_bounds,
    float_dtype,
    soft_clamp,
    soft_floor,
    unbounded,
    uniform_weights,
)


class ConstantThickness(ThicknessModel):
    """One thickness for every frame (Jana's model), n_t = 1.

    Args:
      initial: starting thickness, Å, strictly inside (lower, upper).
      lower, upper: bounds, Å.

    Params: ``raw`` (), with t = bounded(raw).
    """

    def __init__(self, initial: float = 500.0, *, lower: float = LOWER, upper: float = UPPER):
        self.lower, self.upper = check_bounds(lower, upper)
        self.n_nodes = 1
        dtype = float_dtype()
        self.raw = nnx.Param(jnp.asarray(unbounded(initial, self.lower, self.upper), dtype))

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        n_f = features.alpha.shape[0]
        t = bounded(self.raw[...], self.lower, self.upper)
        values = jnp.broadcast_to(t, (n_f, 1))
        return values, uniform_weights(n_f, 1, values.dtype)


class PerFrameThickness(ThicknessModel):
    """One free thickness per frame, n_t = 1; frames are matched by position.

    Args:
      n_frames: number of frames n_f; ``features`` must then hold all n_f frames in order.
      initial: starting thickness, Å: a scalar or shape (n_f,).
      lower, upper: bounds, Å.

    Params: ``raw`` (n_f,).
    """

    def __init__(
        self,
        n_frames: int,
        initial: float | np.ndarray = 500.0,
        *,
        lower: float = LOWER,
        upper: float = UPPER,
    ):
        self.lower, self.upper = check_bounds(lower, upper)
        self.n_nodes = 1
        self.n_frames = int(n_frames)
        initial = np.broadcast_to(np.asarray(initial, dtype=float), (self.n_frames,))
        raw = unbounded(initial, self.lower, self.upper)
        self.raw = nnx.Param(jnp.asarray(raw, float_dtype()))

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        n_f = features.alpha.shape[0]
        if n_f != self.n_frames:
            raise EdkitError(
                f"PerFrameThickness has {self.n_frames} frames, the features hold {n_f}"
            )
        values = bounded(self.raw[...], self.lower, self.upper)[:, None]
        return values, uniform_weights(n_f, 1, values.dtype)


class PlateletThickness(ThicknessModel):
    """A tilted platelet: t(α) = t₀ / max(cos(α − α₀), c_min), optionally a wedge.

    With ``wedge=True`` each frame sees a uniform spread of path lengths t(α)(1 + δx), x ∈
    [−1, 1], sampled at ``n_nodes`` Gauss–Legendre nodes with their weights (n_t = n_nodes);
    else n_t = 1.

    Args:
      initial: starting t₀, Å.
      lower, upper: bounds of t₀ and of every node value, Å.
      wedge: add the relative spread δ ∈ [0, 0.9] (initialised at 0.1).
      n_nodes: Gauss–Legendre nodes of the wedge.
      cos_min: the floor c_min of the obliquity factor (applied smoothly).

    Params: ``raw_t0`` (), ``alpha0`` () in degrees (init 0), and with the wedge ``raw_delta`` ().
    """

    max_delta = 0.9

    def __init__(
        self,
        initial: float = 500.0,
        *,
        lower: float = LOWER,
        upper: float = UPPER,
        wedge: bool = False,
        n_nodes: int = 5,
        cos_min: float = COS_MIN,
    ):
        self.lower, self.upper = check_bounds(lower, upper)
        self.wedge = bool(wedge)
        self.cos_min = float(cos_min)
        dtype = float_dtype()
        self.raw_t0 = nnx.Param(jnp.asarray(unbounded(initial, self.lower, self.upper), dtype))
        self.alpha0 = nnx.Param(jnp.zeros((), dtype))
        if self.wedge:
            if n_nodes < 1:
                raise EdkitError(f"PlateletThickness: n_nodes must be ≥ 1, got {n_nodes}")
            self.n_nodes = int(n_nodes)
            x, w = np.polynomial.legendre.leggauss(self.n_nodes)
            self.nodes = tuple(float(v) for v in x)
            self.node_weights = tuple(float(v) / 2.0 for v in w)
            init_delta = 0.1 / self.max_delta
            self.raw_delta = nnx.Param(jnp.asarray(np.log(init_delta / (1 - init_delta)), dtype))
        else:
            self.n_nodes = 1

    @property
    def t0(self) -> jax.Array:
        """Normal thickness t₀, Å."""
        return bounded(self.raw_t0[...], self.lower, self.upper)

    @property
    def delta(self) -> jax.Array:
        """Relative wedge spread δ (0 without the wedge)."""
        if not self.wedge:
            return jnp.zeros((), self.raw_t0.dtype)
        return self.max_delta * jax.nn.sigmoid(self.raw_delta[...])

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        n_f = features.alpha.shape[0]
        cos = jnp.cos(jnp.deg2rad(features.alpha - self.alpha0[...]))
        t = self.t0 / soft_floor(cos, self.cos_min)  # (n_f,)
        if not self.wedge:
            values = soft_clamp(t, self.lower, self.upper)[:, None]
            return values, uniform_weights(n_f, 1, values.dtype)
        x = jnp.asarray(self.nodes, t.dtype)
        values = soft_clamp(t[:, None] * (1.0 + self.delta * x[None, :]), self.lower, self.upper)
        weights = jnp.broadcast_to(jnp.asarray(self.node_weights, t.dtype), values.shape)
        return values, weights
