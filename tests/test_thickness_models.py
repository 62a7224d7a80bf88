"""Thickness models (edkit/models/thickness.py): shapes, bounds, gradients, geometry, fitting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from edkit.errors import EdkitError
from edkit.models.thickness import (
    KINDS,
    ConstantThickness,
    FrameFeatures,
    PerFrameThickness,
    PlateletThickness,
    ProfileNet,
    ThicknessMap,
    ThicknessModel,
    check_finite,
    fit_to_thickness,
    frame_features,
    make_thickness_model,
    unbounded,
)

N_FRAMES = 41
LOWER, UPPER = 20.0, 5000.0

# Jitted once per model structure (the graphdef is static), so the parametrized tests share
# compilations instead of dispatching every op eagerly.
call = nnx.jit(lambda model, features: model(features))


@pytest.fixture(scope="module")
def features() -> FrameFeatures:
    """41 frames, α from −60° to 60°, the beam rotating about the crystal's x axis."""
    alpha = np.linspace(-60.0, 60.0, N_FRAMES)
    a = np.deg2rad(alpha)
    beam = np.stack([0.1 * np.ones_like(a), np.sin(a), -np.cos(a)], axis=-1)
    return frame_features(alpha, beam)


def build(kind: str, features: FrameFeatures) -> ThicknessModel:
    return make_thickness_model(
        kind, n_frames=N_FRAMES, features=features, initial=500.0, rngs=nnx.Rngs(0)
    )


def with_params(model: ThicknessModel, fill) -> ThicknessModel:
    """A copy of ``model`` with every nnx.Param leaf replaced by ``fill(leaf)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(fill, params), rest)


def assert_valid(model: ThicknessModel, values, weights, n_f=N_FRAMES):
    assert values.shape == weights.shape == (n_f, model.n_nodes)
    assert values.dtype == weights.dtype == jnp.float64
    assert bool(check_finite(values, weights))
    assert np.all(np.asarray(weights) >= 0)
    np.testing.assert_allclose(np.sum(weights, axis=-1), 1.0, rtol=1e-12)
    assert np.all(np.asarray(values) >= model.lower)
    assert np.all(np.asarray(values) <= model.upper)


# --- features ----------------------------------------------------------------------------------


def test_frame_features(features):
    assert features.alpha.dtype == jnp.float64
    np.testing.assert_allclose(
        np.asarray(features.alpha_normalized)[[0, 20, -1]], [-1.0, 0.0, 1.0], atol=1e-15
    )
    np.testing.assert_allclose(np.linalg.norm(features.beam, axis=-1), 1.0, rtol=1e-14)
    one = frame_features([12.0], [[0.0, 0.0, -2.0]])
    np.testing.assert_array_equal(one.alpha_normalized, [0.0])
    np.testing.assert_allclose(one.beam, [[0.0, 0.0, -1.0]])
    flat = frame_features([5.0, 5.0], [[0.0, 0.0, 1.0]] * 2)
    np.testing.assert_array_equal(flat.alpha_normalized, [0.0, 0.0])
    subset = frame_features([0.0, 30.0], [[0.0, 0.0, 1.0]] * 2, alpha_range=(-60.0, 60.0))
    np.testing.assert_allclose(subset.alpha_normalized, [0.0, 0.5])
    with pytest.raises(EdkitError, match="beam_directions"):
        frame_features([0.0, 1.0], [[0.0, 0.0, 1.0]])


# --- every model -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_weights(kind, features):
    model = build(kind, features)
    values, weights = call(model, features)
    assert_valid(model, values, weights)
    mean = model.mean_thickness(features)
    assert mean.shape == (N_FRAMES,)
    # Initialised near `initial` (the geometric models see 500/cos(α) at most 5× that).
    assert np.all(np.asarray(mean) > 0.9 * 500.0)
    assert np.all(np.asarray(mean) < 1.1 * 500.0 / np.cos(np.deg2rad(60.0)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fill", [50.0, -50.0])
def test_bounds_for_extreme_params(kind, fill, features):
    model = with_params(build(kind, features), lambda p: jnp.full_like(p, fill))
    values, weights = call(model, features)
    assert_valid(model, values, weights)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite_and_nonzero(kind, features):
    model = build(kind, features)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # The second moment also sees the spread parameters (the mean of a symmetric spread does not
    # depend on its width); uneven frame weights break the ±α symmetry that cancels ∂/∂α₀.
    frame_weight = jnp.linspace(0.5, 1.5, N_FRAMES)[:, None]

    def second_moment(params):
        values, weights = nnx.merge(graphdef, params, rest)(features)
        return jnp.sum(frame_weight * weights * (values / 500.0) ** 2)

    grads = jax.jit(jax.grad(second_moment))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0.0), path
    if kind == "per-frame":
        assert np.all(np.asarray(grads["raw"]) != 0.0)


def test_custom_bounds(features):
    model = make_thickness_model(
        "profile-net", n_frames=N_FRAMES, initial=100.0, rngs=nnx.Rngs(1), lower=50.0, upper=200.0
    )
    values, weights = model(features)
    assert model.lower == 50.0 and model.upper == 200.0
    assert_valid(model, values, weights)
    np.testing.assert_allclose(model.mean_thickness(features), 100.0, rtol=0.02)


def test_initial_outside_bounds_rejected():
    with pytest.raises(EdkitError, match="strictly inside"):
        ConstantThickness(10.0)
    with pytest.raises(EdkitError, match="bounds"):
        PerFrameThickness(3, 500.0, lower=600.0, upper=100.0)


def test_dtype_follows_x64():
    with jax.enable_x64(False):
        alpha = np.linspace(-30.0, 30.0, 4)
        f32 = frame_features(alpha, np.tile([0.0, 0.0, -1.0], (4, 1)))
        for model in (
            ConstantThickness(),
            PlateletThickness(wedge=True),
            ProfileNet(rngs=nnx.Rngs(0)),
        ):
            values, weights = model(f32)
            assert values.dtype == weights.dtype == jnp.float32


# --- geometry ----------------------------------------------------------------------------------


def test_constant_and_per_frame_values(features):
    np.testing.assert_allclose(ConstantThickness(321.0)(features)[0], 321.0, rtol=1e-12)
    initial = np.linspace(100.0, 900.0, N_FRAMES)
    model = PerFrameThickness(N_FRAMES, initial)
    np.testing.assert_allclose(model.mean_thickness(features), initial, rtol=1e-12)
    with pytest.raises(EdkitError, match="frames"):
        model(frame_features([0.0], [[0.0, 0.0, 1.0]]))


def test_platelet_follows_inverse_cosine(features):
    model = PlateletThickness(300.0)
    model.alpha0[...] = 10.0
    expected = 300.0 / np.cos(np.deg2rad(np.asarray(features.alpha) - 10.0))
    np.testing.assert_allclose(model.mean_thickness(features), expected, rtol=1e-7)
    # Beyond the floor (|α − α₀| > 78.5°) the path length saturates at t₀/c_min.
    edge_on = frame_features([95.0], [[0.0, 0.0, 1.0]])
    np.testing.assert_allclose(model.mean_thickness(edge_on), 300.0 / 0.2, rtol=1e-3)


def test_wedge_nodes(features):
    model = PlateletThickness(300.0, wedge=True, n_nodes=4)
    values, weights = model(features)
    t = 300.0 / np.cos(np.deg2rad(np.asarray(features.alpha)))
    np.testing.assert_allclose(model.mean_thickness(features), t, rtol=1e-7)
    delta = float(model.delta)
    np.testing.assert_allclose(delta, 0.1, rtol=1e-12)
    x, w = np.polynomial.legendre.leggauss(4)
    np.testing.assert_allclose(values, t[:, None] * (1 + delta * x), rtol=1e-7)
    np.testing.assert_allclose(weights[0], w / 2, rtol=1e-12)


def test_profile_net_gauss_hermite(features):
    model = ProfileNet(rngs=nnx.Rngs(3), initial=800.0)
    mu, sigma = model.mean_and_spread(features)
    np.testing.assert_allclose(mu, 800.0, rtol=0.02)
    np.testing.assert_allclose(sigma / mu, 0.05, rtol=0.05)
    values, weights = model(features)
    np.testing.assert_allclose(np.sum(weights * values, -1), mu, rtol=1e-10)
    variance = np.sum(weights * (values - np.asarray(mu)[:, None]) ** 2, -1)
    np.testing.assert_allclose(np.sqrt(variance), sigma, rtol=1e-8)
    plain = ProfileNet(rngs=nnx.Rngs(3), spread=False)
    assert plain.n_nodes == 1
    assert plain(features)[0].shape == (N_FRAMES, 1)


def test_map_constant_height(features):
    normal = np.array([0.05, 0.05, -1.0])
    model = ThicknessMap(rngs=nnx.Rngs(0), normal=normal, initial=400.0)
    model.mlp.layers[-1].kernel[...] = jnp.zeros_like(model.mlp.layers[-1].kernel[...])
    beam = np.asarray(features.beam)
    n = normal / np.linalg.norm(normal)
    np.testing.assert_allclose(model.normal, n, rtol=1e-14, atol=1e-15)
    obliquity = np.abs(beam @ n)
    assert obliquity.min() > 0.45  # well above the floor c_min = 0.2
    values, _ = model(features)
    np.testing.assert_allclose(values, np.broadcast_to(400.0 / obliquity[:, None], values.shape))
    np.testing.assert_allclose(model.mean_thickness(features), 400.0 / obliquity)
    # A tilted normal: still a unit vector, still h/|n·beam| where |n·beam| is above the floor.
    model.tilt[...] = jnp.array([20.0, -15.0])
    n = np.asarray(model.normal)
    np.testing.assert_allclose(np.linalg.norm(n), 1.0, rtol=1e-14)
    obliquity = np.abs(beam @ n)
    clear = obliquity > 0.45
    assert clear.sum() > 10
    mean = np.asarray(model.mean_thickness(features))
    np.testing.assert_allclose(mean[clear], 400.0 / obliquity[clear], rtol=1e-9)
    assert np.all(mean <= 400.0 / 0.2 * (1 + 1e-9))
    x, y, h = model.thickness_map(resolution=8)
    assert x.shape == y.shape == (8,) and h.shape == (8, 8)
    np.testing.assert_allclose(h, 400.0)


def test_map_net_starts_along_mean_beam(features):
    model = build("map-net", features)
    assert model.n_nodes == 25
    mean_beam = np.mean(np.asarray(features.beam), axis=0)
    np.testing.assert_allclose(model.normal, mean_beam / np.linalg.norm(mean_beam), atol=1e-14)
    _, _, h = model.thickness_map()
    assert h.shape == (32, 32)
    np.testing.assert_allclose(h, 500.0, rtol=0.02)


# --- non-finite inputs -------------------------------------------------------------------------


def test_check_finite_reports_nan(features):
    bad = features._replace(
        alpha=features.alpha.at[3].set(jnp.nan),
        alpha_normalized=features.alpha_normalized.at[3].set(jnp.nan),
        beam=features.beam.at[3].set(jnp.nan),
    )
    for kind in ("platelet", "wedge", "profile-net", "map-net"):
        values, weights = call(build(kind, features), bad)  # propagates, raises nothing
        assert not bool(check_finite(values, weights))
    assert bool(jax.jit(check_finite)(*build("constant", features)(features)))


# --- fitting -----------------------------------------------------------------------------------


def test_fit_profile_net_recovers_smooth_profile(features):
    target = 400.0 + 150.0 * np.sin(1.5 * np.asarray(features.alpha_normalized))
    model = ProfileNet(rngs=nnx.Rngs(0))
    history = fit_to_thickness(model, features, target)
    assert len(history) == 400 and history[-1] < 1e-2 * history[0]
    rms = np.sqrt(np.mean((np.asarray(model.mean_thickness(features)) / target - 1) ** 2))
    assert rms < 0.03


def test_fit_per_frame_recovers_arbitrary_values(features):
    target = np.random.default_rng(0).uniform(50.0, 3000.0, N_FRAMES)
    model = PerFrameThickness(N_FRAMES)
    fit_to_thickness(model, features, target)
    np.testing.assert_allclose(model.mean_thickness(features), target, rtol=5e-3)


def test_fit_respects_mask(features):
    target = np.full(N_FRAMES, 250.0)
    target[:10] = np.nan  # masked out: ignored
    mask = np.arange(N_FRAMES) >= 10
    model = PerFrameThickness(N_FRAMES)
    fit_to_thickness(model, features, target, mask, steps=200)
    mean = np.asarray(model.mean_thickness(features))
    np.testing.assert_allclose(mean[10:], 250.0, rtol=5e-3)
    np.testing.assert_allclose(mean[:10], 500.0, rtol=1e-12)
    with pytest.raises(EdkitError, match="finite"):
        fit_to_thickness(model, features, target, steps=1)
    with pytest.raises(EdkitError, match="shape"):
        fit_to_thickness(model, features, target[:5], steps=1)


def test_fit_platelet(features):
    truth = PlateletThickness(350.0)
    truth.alpha0[...] = 5.0
    target = np.asarray(truth.mean_thickness(features))
    model = PlateletThickness(500.0)
    fit_to_thickness(model, features, target, steps=600, learning_rate=0.1)
    np.testing.assert_allclose(model.mean_thickness(features), target, rtol=0.01)


# --- factory -----------------------------------------------------------------------------------


def test_make_thickness_model_kinds(features):
    expected = {
        "constant": (ConstantThickness, 1),
        "per-frame": (PerFrameThickness, 1),
        "platelet": (PlateletThickness, 1),
        "wedge": (PlateletThickness, 5),
        "profile-net": (ProfileNet, 5),
        "map-net": (ThicknessMap, 25),
    }
    for kind, (cls, n_nodes) in expected.items():
        model = build(kind, features)
        assert isinstance(model, cls) and model.n_nodes == n_nodes
    model = make_thickness_model("wedge", n_frames=3, n_nodes=3, lower=10.0)
    assert model.n_nodes == 3 and model.lower == 10.0


def test_make_thickness_model_unknown_kind():
    with pytest.raises(EdkitError) as info:
        make_thickness_model("slab", n_frames=3)
    message = str(info.value)
    assert "'slab'" in message
    for kind in KINDS:
        assert kind in message


def test_unbounded_inverts_bounded():
    from edkit.models.thickness import bounded

    values = np.array([21.0, 100.0, 500.0, 4999.0])
    np.testing.assert_allclose(bounded(unbounded(values, LOWER, UPPER), LOWER, UPPER), values)
    assert float(bounded(jnp.asarray(-1e3), LOWER, UPPER)) == LOWER
    assert float(bounded(jnp.asarray(1e3), LOWER, UPPER)) == UPPER
