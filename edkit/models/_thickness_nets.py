"""Neural thickness models: the per-frame profile network and the thickness-map network.

Conventions: :mod:`edkit.models.thickness`.
"""

from collections.abc import Sequence

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

    def set_last_bias(self, bias: jax.Array) -> None:
        """Overwrite the last layer's bias (its initial output)."""
        last = self.layers[-1].bias
        if last is None:  # unreachable: every layer is built with use_bias=True (the default)
            raise EdkitError("_MLP: the last layer has no bias")
        last[...] = bias

    def __call__(self, x: jax.Array) -> jax.Array:
        *hidden, last = self.layers
        for layer in hidden:
            x = jnp.tanh(layer(x))
        return last(x)


class ProfileNet(ThicknessModel):
    """The paper's network: α_normalized → MLP 1→hidden→hidden→2 (tanh) → (μ(α), σ(α)).

    μ = bounded(o₀) ∈ (lower, upper); σ = μ·softplus(o₁) ≥ 0, a relative spread that starts at
    ``initial_spread`` = 5 % of μ (:meth:`set_relative_spread` sets another; a refinement
    chooses 1 % or 5 %: :func:`edkit.refine.prepare.start_spread`). With ``spread=True`` the
    thickness distribution is Gaussian, represented by ``n_nodes`` Gauss–Hermite nodes
    t_k = μ + √2 σ x_k with weights w_k/√π, smoothly clamped into [lower, upper]; with
    ``spread=False``, n_t = 1 and t = μ. The last layer starts small and its bias at the
    inverse transforms of ``initial`` and the spread, so the output is ≈ ``initial`` (±1 %)
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
        self.lower, self.upper = check_bounds(lower, upper)
        self.spread = bool(spread)
        dtype = float_dtype()
        self.mlp = _MLP([1, hidden, hidden, 2], last_scale=1e-2, dtype=dtype, rngs=rngs)
        bias = np.array([unbounded(initial, self.lower, self.upper), 0.0])
        self.mlp.set_last_bias(jnp.asarray(bias, dtype))
        self.set_relative_spread(self.initial_spread)
        if self.spread:
            if n_nodes < 1:
                raise EdkitError(f"ProfileNet: n_nodes must be ≥ 1, got {n_nodes}")
            self.n_nodes = int(n_nodes)
            x, w = np.polynomial.hermite.hermgauss(self.n_nodes)
            self.nodes = tuple(float(v) for v in x)
            self.node_weights = tuple(float(v) / np.sqrt(np.pi) for v in w)
        else:
            self.n_nodes = 1

    def set_relative_spread(self, relative: float) -> None:
        """Make σ = ``relative``·μ at every α: the spread output's weights to zero, its bias
        softplus⁻¹(``relative``); the mean's output is left as it is (e.g. after a fit)."""
        if not (np.isfinite(relative) and relative > 0):
            raise EdkitError(f"ProfileNet: the relative spread must be > 0, got {relative!r}")
        last = self.mlp.layers[-1]
        assert last.bias is not None  # every layer has one (set_last_bias)
        last.kernel[...] = last.kernel[...].at[:, 1].set(0.0)
        last.bias[...] = last.bias[...].at[1].set(np.log(np.expm1(relative)))

    def mean_and_spread(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        """μ(α) and σ(α) in Å, each shape (n_f,) (before the nodes are clamped)."""
        out = self.mlp(features.alpha_normalized[:, None])  # (n_f, 2)
        mu = bounded(out[:, 0], self.lower, self.upper)
        return mu, mu * jax.nn.softplus(out[:, 1])

    def fitted_thickness(self, features: FrameFeatures) -> jax.Array:
        """μ(α), Å, (n_f,): fitted to a target, the mean of the clamped nodes has a degenerate
        optimum (μ at the lower bound, σ thousands of Å, measured) that μ itself has not."""
        return self.mean_and_spread(features)[0]

    def __call__(self, features: FrameFeatures) -> tuple[jax.Array, jax.Array]:
        mu, sigma = self.mean_and_spread(features)
        if not self.spread:
            return mu[:, None], uniform_weights(mu.shape[0], 1, mu.dtype)
        x = jnp.asarray(self.nodes, mu.dtype)
        values = soft_clamp(
            mu[:, None] + np.sqrt(2.0) * sigma[:, None] * x[None, :], self.lower, self.upper
        )
        weights = jnp.broadcast_to(jnp.asarray(self.node_weights, mu.dtype), values.shape)
        return values, weights


def _orthonormal_frame(normal: np.ndarray | Sequence[float]) -> np.ndarray:
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
        self.lower, self.upper = check_bounds(lower, upper)
        if grid < 1:
            raise EdkitError(f"ThicknessMap: grid must be ≥ 1, got {grid}")
        self.grid = int(grid)
        self.n_nodes = self.grid**2
        self.cos_min = float(cos_min)
        dtype = float_dtype()
        basis = _orthonormal_frame(np.array([0.0, 0.0, 1.0]) if normal is None else normal)
        self.basis = tuple(tuple(float(v) for v in row) for row in basis)
        self.mlp = _MLP([2, hidden, hidden, 1], last_scale=1e-2, dtype=dtype, rngs=rngs)
        bias = np.array([unbounded(initial, self.lower, self.upper)])
        self.mlp.set_last_bias(jnp.asarray(bias, dtype))
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
        return values, uniform_weights(values.shape[0], self.n_nodes, dtype)

    def thickness_map(self, resolution: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The map for plotting: x (res,), y (res,) cell centres in [−1, 1] and h (res, res) in Å,
        h[iy, ix] at (x[ix], y[iy]) (the layout of ``pcolormesh(x, y, h)``)."""
        centres, points = self._grid_points(int(resolution), self.tilt.dtype)
        h = self.height(points).reshape(resolution, resolution)
        c = np.asarray(centres)
        return c, c.copy(), np.asarray(h)
