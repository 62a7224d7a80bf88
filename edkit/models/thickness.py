"""Thickness models of the hybrid refinement, as Flax NNX modules (science.md §6).

Every model maps the features of a batch of frames to a *distribution* of beam path lengths per
frame: ``values`` (thickness nodes, Å, shape (n_f, n_t)) and ``weights`` (≥ 0, summing to 1 per
frame, shape (n_f, n_t)). The refinement averages the intensities computed at the nodes with the
weights (incoherent sum, column approximation). ``n_t`` (``n_nodes``) is static per model.

Parameters are unconstrained ``nnx.Param``s mapped through smooth transforms, so every value lies
in ``[lower, upper]`` by construction and gradients never vanish through a hard clip:

* a bounded thickness is ``lower · (upper/lower)^σ(raw)`` (a sigmoid in log space: the same raw
  step is the same *relative* change anywhere in the range);
* derived values (t₀/cos, node spreads) go through :func:`soft_clamp`, the identity well inside
  the bounds that saturates smoothly at them;
* obliquity factors use :func:`soft_floor` (a softplus ``max(c, c_min)``), c_min = 0.2 by default.

The float dtype of the parameters (and so of the outputs) follows the x64 setting at
construction: float64 with ``jax_enable_x64``, else float32.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def _float_dtype() -> jnp.dtype:
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
    dtype = _float_dtype()
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


def _check_bounds(lower: float, upper: float) -> tuple[float, float]:
    lower, upper = float(lower), float(upper)
    if not (0.0 < lower < upper < np.inf):
        raise EdkitError(f"thickness bounds must satisfy 0 < lower < upper, got {lower}, {upper}")
    return lower, upper


def _uniform_weights(n_frames: int, n_nodes: int, dtype) -> jax.Array:
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


class ConstantThickness(ThicknessModel):
    """One thickness for every frame (Jana's model), n_t = 1.

    Args:
      initial: starting thickness, Å, strictly inside (lower, upper).
      lower, upper: bounds, Å.

    Params: ``raw`` (), with t = bounded(raw).
    """

    def __init__(self, initial: float = 500.0, *, lower: float = LOWER, upper: float = UPPER):
        self.lower, self.upper = _check_bounds(lower, upper)
        self.n_nodes = 1
        dtype = _float_dtype()
        self.raw = nnx.Param(jnp.asarray(unbounded(initial, self.lower, self.upper), dtype))

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        n_f = features.alpha.shape[0]
        t = bounded(self.raw[...], self.lower, self.upper)
        values = jnp.broadcast_to(t, (n_f, 1))
        return values, _uniform_weights(n_f, 1, values.dtype)


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
        self.lower, self.upper = _check_bounds(lower, upper)
        self.n_nodes = 1
        self.n_frames = int(n_frames)
        initial = np.broadcast_to(np.asarray(initial, dtype=float), (self.n_frames,))
        raw = unbounded(initial, self.lower, self.upper)
        self.raw = nnx.Param(jnp.asarray(raw, _float_dtype()))

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        n_f = features.alpha.shape[0]
        if n_f != self.n_frames:
            raise EdkitError(
                f"PerFrameThickness has {self.n_frames} frames, the features hold {n_f}"
            )
        values = bounded(self.raw[...], self.lower, self.upper)[:, None]
        return values, _uniform_weights(n_f, 1, values.dtype)


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
        self.lower, self.upper = _check_bounds(lower, upper)
        self.wedge = bool(wedge)
        self.cos_min = float(cos_min)
        dtype = _float_dtype()
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
            return values, _uniform_weights(n_f, 1, values.dtype)
        x = jnp.asarray(self.nodes, t.dtype)
        values = soft_clamp(t[:, None] * (1.0 + self.delta * x[None, :]), self.lower, self.upper)
        weights = jnp.broadcast_to(jnp.asarray(self.node_weights, t.dtype), values.shape)
        return values, weights


class _MLP(nnx.Module):
    """tanh MLP for a batch of points: (n, d_in) → (n, d_out); last layer initialised small."""

    def __init__(self, sizes: Sequence[int], *, last_scale: float, dtype, rngs: nnx.Rngs):
        small = nnx.initializers.variance_scaling(last_scale**2, "fan_in", "normal")
        n = len(sizes) - 1
        self.layers = nnx.List(
            [
                nnx.Linear(
                    sizes[i],
                    sizes[i + 1],
                    dtype=dtype,
                    param_dtype=dtype,
                    kernel_init=small if i == n - 1 else nnx.initializers.lecun_normal(),
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        *hidden, last = self.layers
        for layer in hidden:
            x = jnp.tanh(layer(x))
        return last(x)


class ProfileNet(ThicknessModel):
    """The paper's network: α_normalized → MLP 1→hidden→hidden→2 (tanh) → (μ(α), σ(α)).

    μ = bounded(o₀) ∈ (lower, upper); σ = μ·softplus(o₁) ≥ 0 (a relative spread, initialised at
    5 % of μ). With ``spread=True`` the thickness distribution is Gaussian, represented by
    ``n_nodes`` Gauss–Hermite nodes t_k = μ + √2 σ x_k with weights w_k/√π, smoothly clamped into
    [lower, upper]; with ``spread=False``, n_t = 1 and t = μ. The last layer starts small and its
    bias at the inverse transforms of ``initial`` and 5 %, so the output is ≈ ``initial`` (±1 %)
    for every α. The MLP runs on the batch of frames (each frame independently).

    Args:
      rngs: random keys for the weights (keyword-only).
      hidden: width of the two hidden layers.
      lower, upper: bounds of μ and of every node, Å.
      initial: starting thickness, Å.
      spread: represent a spread σ(α) with Gauss–Hermite nodes.
      n_nodes: number of Gauss–Hermite nodes when ``spread``.

    Params: ``mlp.layers[i].kernel`` / ``.bias`` for i = 0, 1, 2.
    """

    initial_spread = 0.05

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        hidden: int = 64,
        lower: float = LOWER,
        upper: float = UPPER,
        initial: float = 500.0,
        spread: bool = True,
        n_nodes: int = 5,
    ):
        self.lower, self.upper = _check_bounds(lower, upper)
        self.spread = bool(spread)
        dtype = _float_dtype()
        self.mlp = _MLP([1, hidden, hidden, 2], last_scale=1e-2, dtype=dtype, rngs=rngs)
        sigma_raw = np.log(np.expm1(self.initial_spread))  # softplus⁻¹(0.05)
        bias = np.array([unbounded(initial, self.lower, self.upper), sigma_raw])
        self.mlp.layers[-1].bias[...] = jnp.asarray(bias, dtype)
        if self.spread:
            if n_nodes < 1:
                raise EdkitError(f"ProfileNet: n_nodes must be ≥ 1, got {n_nodes}")
            self.n_nodes = int(n_nodes)
            x, w = np.polynomial.hermite.hermgauss(self.n_nodes)
            self.nodes = tuple(float(v) for v in x)
            self.node_weights = tuple(float(v) / np.sqrt(np.pi) for v in w)
        else:
            self.n_nodes = 1

    def mean_and_spread(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        """μ(α) and σ(α) in Å, each shape (n_f,) (before the nodes are clamped)."""
        out = self.mlp(features.alpha_normalized[:, None])  # (n_f, 2)
        mu = bounded(out[:, 0], self.lower, self.upper)
        return mu, mu * jax.nn.softplus(out[:, 1])

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        mu, sigma = self.mean_and_spread(features)
        if not self.spread:
            return mu[:, None], _uniform_weights(mu.shape[0], 1, mu.dtype)
        x = jnp.asarray(self.nodes, mu.dtype)
        values = soft_clamp(
            mu[:, None] + np.sqrt(2.0) * sigma[:, None] * x[None, :], self.lower, self.upper
        )
        weights = jnp.broadcast_to(jnp.asarray(self.node_weights, mu.dtype), values.shape)
        return values, weights


def _orthonormal_frame(normal: np.ndarray) -> np.ndarray:
    """Rows e1, e2, n: a right-handed orthonormal basis with n along ``normal``."""
    n = np.asarray(normal, dtype=float)
    norm = np.linalg.norm(n)
    if n.shape != (3,) or not np.isfinite(norm) or norm == 0:
        raise EdkitError(f"ThicknessMap: normal must be a nonzero 3-vector, got {normal!r}")
    n = n / norm
    helper = np.eye(3)[np.argmin(np.abs(n))]
    e1 = np.cross(helper, n)
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(n, e1), n])


class ThicknessMap(ThicknessModel):
    """A coordinate network h(x, y) over the crystal's projected area, seen along a tilted normal.

    h = bounded(MLP(x, y)) ∈ (lower, upper), MLP 2→hidden→hidden→1 with tanh, is the crystal's
    thickness along its platelet normal n at point (x, y) ∈ [−1, 1]² (in the platelet's plane).
    Each frame averages the ``grid``×``grid`` columns at the cell centres of [−1, 1]² with equal
    weights 1/grid² (column approximation): t_fk = h(x_k, y_k) / max(|n·beam_f|, c_min), smoothly
    clamped into [lower, upper]; n_t = grid².

    n = normalize(sin a·e1 + sin b·e2 + cos a cos b·n_init) with the two tilt angles (a, b) in
    degrees (init 0) about axes perpendicular to the initial normal n_init; the norm is ≥ 1, so
    this is smooth everywhere.

    Args:
      rngs: random keys (keyword-only).
      hidden: width of the two hidden layers.
      grid: columns per side.
      lower, upper: bounds of h and of every node value, Å.
      initial: starting h, Å (the last layer starts small: h ≈ initial everywhere).
      normal: initial platelet normal, crystal-Cartesian, shape (3,); default: the mean beam
        direction when known (``make_thickness_model`` passes it), else [0, 0, 1].
      cos_min: the floor c_min of |n·beam| (applied smoothly).

    Params: ``mlp.layers[i].kernel`` / ``.bias``, ``tilt`` (2,) degrees.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        hidden: int = 32,
        grid: int = 5,
        lower: float = LOWER,
        upper: float = UPPER,
        initial: float = 500.0,
        normal: np.ndarray | Sequence[float] | None = None,
        cos_min: float = COS_MIN,
    ):
        self.lower, self.upper = _check_bounds(lower, upper)
        if grid < 1:
            raise EdkitError(f"ThicknessMap: grid must be ≥ 1, got {grid}")
        self.grid = int(grid)
        self.n_nodes = self.grid**2
        self.cos_min = float(cos_min)
        dtype = _float_dtype()
        basis = _orthonormal_frame(np.array([0.0, 0.0, 1.0]) if normal is None else normal)
        self.basis = tuple(tuple(float(v) for v in row) for row in basis)
        self.mlp = _MLP([2, hidden, hidden, 1], last_scale=1e-2, dtype=dtype, rngs=rngs)
        bias = np.array([unbounded(initial, self.lower, self.upper)])
        self.mlp.layers[-1].bias[...] = jnp.asarray(bias, dtype)
        self.tilt = nnx.Param(jnp.zeros(2, dtype))

    @property
    def normal(self) -> jax.Array:
        """The platelet normal n, unit vector, crystal-Cartesian axes, shape (3,)."""
        a, b = jnp.deg2rad(self.tilt[...])
        e1, e2, n0 = jnp.asarray(self.basis, self.tilt.dtype)
        v = jnp.sin(a) * e1 + jnp.sin(b) * e2 + jnp.cos(a) * jnp.cos(b) * n0
        return v / jnp.linalg.norm(v)

    def height(self, points: jax.Array) -> jax.Array:
        """h at ``points`` (n, 2) in [−1, 1]², Å, shape (n,)."""
        return bounded(self.mlp(points)[:, 0], self.lower, self.upper)

    def _grid_points(self, resolution: int, dtype) -> tuple[jax.Array, jax.Array]:
        centres = -1.0 + (2.0 * jnp.arange(resolution, dtype=dtype) + 1.0) / resolution
        x, y = jnp.meshgrid(centres, centres)  # [iy, ix]
        return centres, jnp.stack([x.ravel(), y.ravel()], axis=-1)

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        dtype = self.tilt.dtype
        _, points = self._grid_points(self.grid, dtype)
        h = self.height(points)  # (n_t,)
        cos = soft_floor(jnp.abs(features.beam @ self.normal), self.cos_min)  # (n_f,)
        values = soft_clamp(h[None, :] / cos[:, None], self.lower, self.upper)
        return values, _uniform_weights(values.shape[0], self.n_nodes, dtype)

    def thickness_map(self, resolution: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The map for plotting: x (res,), y (res,) cell centres in [−1, 1] and h (res, res) in Å,
        h[iy, ix] at (x[ix], y[iy]) (the layout of ``pcolormesh(x, y, h)``)."""
        centres, points = self._grid_points(int(resolution), self.tilt.dtype)
        h = self.height(points).reshape(resolution, resolution)
        c = np.asarray(centres)
        return c, c.copy(), np.asarray(h)


# --- pre-training and the factory --------------------------------------------------------------


def fit_to_thickness(
    model: ThicknessModel,
    features: FrameFeatures,
    target: jax.Array | np.ndarray,
    mask: jax.Array | np.ndarray | None = None,
    *,
    steps: int = 400,
    learning_rate: float = 0.05,
) -> list[float]:
    """Pre-train ``model`` in place so its mean thickness matches ``target`` on the masked frames.

    Loss: mean over frames with ``mask`` of ((Σ_k w t − target)/target)². Adam on the model's
    ``nnx.Param``s with a short second-moment memory (b2 = 0.95: the first gradients of a far-off
    start are large and a long memory would stall the end of the fit), the rate decaying from
    ``learning_rate`` to 1 % of it (cosine); one jitted step (compiled once per call).

    Args:
      model: any ThicknessModel; updated in place.
      features: the frames, n_f of them.
      target: thickness per frame, Å, shape (n_f,), > 0 where masked in.
      mask: bool, shape (n_f,); default all frames.
      steps: optimizer steps.
      learning_rate: peak Adam rate.

    Returns:
      the loss before each step, ``steps`` floats.
    """
    n_f = features.alpha.shape[0]
    dtype = _float_dtype()
    target = jnp.asarray(target, dtype)
    mask = jnp.ones(n_f, bool) if mask is None else jnp.asarray(mask, bool)
    if target.shape != (n_f,) or mask.shape != (n_f,):
        raise EdkitError(
            f"fit_to_thickness: target and mask must have shape ({n_f},), got {target.shape} "
            f"and {mask.shape}"
        )
    if not bool(jnp.any(mask)):
        raise EdkitError("fit_to_thickness: the mask selects no frame")
    if not bool(jnp.all(jnp.where(mask, jnp.isfinite(target) & (target > 0), True))):
        raise EdkitError("fit_to_thickness: target must be finite and > 0 on the masked frames")
    safe_target = jnp.where(mask, target, 1.0)
    weight = mask.astype(dtype) / jnp.sum(mask)

    schedule = optax.cosine_decay_schedule(learning_rate, max(int(steps), 1), alpha=0.01)
    optimizer = nnx.Optimizer(model, optax.adam(schedule, b2=0.95), wrt=nnx.Param)

    def loss_fn(model: ThicknessModel) -> jax.Array:
        mean = model.mean_thickness(features)
        return jnp.sum(weight * ((mean - safe_target) / safe_target) ** 2)

    @nnx.jit
    def step(model: ThicknessModel, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(int(steps))]


def make_thickness_model(
    kind: str,
    *,
    n_frames: int,
    features: FrameFeatures | None = None,
    initial: float = 500.0,
    rngs: nnx.Rngs | None = None,
    **options,
) -> ThicknessModel:
    """Build a thickness model by name.

    Args:
      kind: one of "constant", "per-frame", "platelet", "wedge", "profile-net", "map-net".
      n_frames: number of frames (used by "per-frame").
      features: the dataset's frames; "map-net" starts its normal along their mean beam.
      initial: starting thickness, Å (scalar; "per-frame" also takes shape (n_f,)).
      rngs: random keys for the networks (default ``nnx.Rngs(0)``).
      **options: passed on to the model's constructor (lower, upper, hidden, n_nodes, …).

    Raises:
      EdkitError: unknown kind, naming the choices.
    """
    if kind == "constant":
        return ConstantThickness(initial, **options)
    if kind == "per-frame":
        return PerFrameThickness(n_frames, initial, **options)
    if kind == "platelet":
        return PlateletThickness(initial, **options)
    if kind == "wedge":
        return PlateletThickness(initial, wedge=True, **options)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if kind == "profile-net":
        return ProfileNet(rngs=rngs, initial=initial, **options)
    if kind == "map-net":
        if "normal" not in options and features is not None:
            mean_beam = np.mean(np.asarray(features.beam, dtype=float), axis=0)
            if np.linalg.norm(mean_beam) > 1e-6:
                options["normal"] = mean_beam
        return ThicknessMap(rngs=rngs, initial=initial, **options)
    raise EdkitError(f"unknown thickness model {kind!r}; choose one of {', '.join(KINDS)}")
