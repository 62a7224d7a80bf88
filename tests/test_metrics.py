"""Figures of merit and losses against hand-computed values, plain loops and finite differences.

Every expected number is written out from the formulas of science.md §7 in the test itself,
never from edkit's own helpers. conftest.py turns x64 on.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from edkit.errors import EdkitError
from edkit.metrics import (
    frame_r_obs,
    frame_scale,
    frame_wr2,
    intensity_wr2_loss,
    jana_figures,
    jana_scale_per_frame,
    jana_wr_loss,
    mean_frame_r_obs,
    scale_per_frame,
)

# ---------------------------------------------------------------------------------------------
# A hand-computed five-reflection example (science.md §7)
# ---------------------------------------------------------------------------------------------
#   I_o    σ    I_c    F_o   F_c   weak?(I_o<0.01σ)  σ_F                 obs?(I_o>3σ)
#   100   10     81    10     9    no                10/(2·10) = 0.5      yes
#    25    5     36     5     6    no                 5/(2·5)  = 0.5      yes
#     4    4      1     2     1    no                 4/(2·2)  = 1        no
#    -1    2      4     0     2    yes               5√2                  no
#  0.01    4   0.16   0.1   0.4    yes (0.01<0.04)   5√4 = 10 (not 20)    no
HAND_I_O = [100.0, 25.0, 4.0, -1.0, 0.01]
HAND_SIGMA = [10.0, 5.0, 4.0, 2.0, 4.0]
HAND_I_C = [81.0, 36.0, 1.0, 4.0, 0.16]
# w = 1/(σ_F² + (0.01 F_o)²)
HAND_W = [
    1.0 / (0.25 + 0.01),
    1.0 / (0.25 + 0.0025),
    1.0 / (1.0 + 0.0004),
    1.0 / 50.0,
    1.0 / (100.0 + 1e-6),
]
HAND_F_O = [10.0, 5.0, 2.0, 0.0, 0.1]
HAND_DF = [1.0, -1.0, 1.0, -2.0, -0.3]  # F_o − F_c


def _hand_expected(n_params):
    w, f_o, df = HAND_W, HAND_F_O, HAND_DF
    num_obs = w[0] * df[0] ** 2 + w[1] * df[1] ** 2
    den_obs = w[0] * f_o[0] ** 2 + w[1] * f_o[1] ** 2
    num_all = sum(wi * d**2 for wi, d in zip(w, df, strict=True))
    den_all = sum(wi * f**2 for wi, f in zip(w, f_o, strict=True))
    return {
        "r_obs": (1.0 + 1.0) / (10.0 + 5.0),
        "r_all": (1.0 + 1.0 + 1.0 + 2.0 + 0.3) / (10.0 + 5.0 + 2.0 + 0.0 + 0.1),
        "wr_obs": math.sqrt(num_obs / den_obs),
        "wr_all": math.sqrt(num_all / den_all),
        "gof": math.sqrt(num_obs / (2 - n_params)),
        "gof_all": math.sqrt(num_all / (5 - n_params)),
        "n_obs": 2,
        "n_all": 5,
    }


@pytest.mark.parametrize("key", ["r_obs", "r_all", "wr_obs", "wr_all", "gof", "gof_all"])
def test_jana_figures_hand_example(key):
    got = jana_figures(np.array(HAND_I_O), np.array(HAND_SIGMA), np.array(HAND_I_C), n_params=1)
    expected = _hand_expected(1)
    assert isinstance(got[key], float)
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-13)


def test_jana_figures_counts_and_keys():
    got = jana_figures(HAND_I_O, HAND_SIGMA, HAND_I_C)
    assert set(got) == {"r_obs", "r_all", "wr_obs", "wr_all", "gof", "gof_all", "n_obs", "n_all"}
    assert got["n_obs"] == 2 and got["n_all"] == 5
    assert isinstance(got["n_obs"], int) and isinstance(got["n_all"], int)
    np.testing.assert_allclose(got["gof"], _hand_expected(0)["gof"], rtol=1e-13)


def test_jana_weak_branch_is_the_continuous_cap():
    # At I_o = 0.01σ exactly the σ/(2F_o) branch is used (the cut is strict) and equals 5√σ; just
    # below, 5√σ is used. wR_all of a one-reflection set with F_c = 0 is 1 whatever w is, so use
    # the GoF, which is sqrt(w)·F_o: w must be continuous across the cut.
    sigma = 16.0
    at = jana_figures([0.01 * sigma], [sigma], [0.0])["gof_all"]
    below = jana_figures([0.01 * sigma * (1 - 1e-12)], [sigma], [0.0])["gof_all"]
    f_o = math.sqrt(0.01 * sigma)
    expected = f_o / math.sqrt((5.0 * math.sqrt(sigma)) ** 2 + (0.01 * f_o) ** 2)
    np.testing.assert_allclose(at, expected, rtol=1e-13)
    np.testing.assert_allclose(below, expected, rtol=1e-9)


def test_jana_perfect_fit_is_zero_even_with_negative_intensities():
    i_o = np.array([100.0, 25.0, 4.0, -1.0, 0.0, 3.0])
    sigma = np.array([10.0, 5.0, 4.0, 2.0, 1.0, 0.5])
    got = jana_figures(i_o, sigma, i_o)  # F_c = sqrt(max(I, 0)) = F_o everywhere
    for key in ("r_obs", "r_all", "wr_obs", "wr_all", "gof", "gof_all"):
        assert got[key] == 0.0, key


def test_jana_negative_intensities_give_zero_f_and_no_nan():
    i_o = np.array([-5.0, -0.001, 50.0])
    sigma = np.array([1.0, 1.0, 2.0])
    i_c = np.array([-3.0, 1.0, 49.0])  # negative I_c is clipped to 0
    got = jana_figures(i_o, sigma, i_c)
    assert all(np.isfinite(v) for v in got.values())
    # F_o = [0, 0, √50], F_c = [0, 1, 7]
    np.testing.assert_allclose(got["r_all"], (0.0 + 1.0 + abs(math.sqrt(50) - 7)) / math.sqrt(50))
    np.testing.assert_allclose(got["r_obs"], abs(math.sqrt(50) - 7) / math.sqrt(50))


def test_jana_empty_selections_are_nan():
    empty = jana_figures([], [], [])
    assert empty["n_obs"] == 0 and empty["n_all"] == 0
    for key in ("r_obs", "r_all", "wr_obs", "wr_all", "gof", "gof_all"):
        assert math.isnan(empty[key]), key
    none_observed = jana_figures([1.0, -2.0], [1.0, 1.0], [1.5, 0.5])
    assert none_observed["n_obs"] == 0
    assert math.isnan(none_observed["r_obs"]) and math.isnan(none_observed["wr_obs"])
    assert math.isnan(none_observed["gof"])
    assert np.isfinite(none_observed["r_all"]) and np.isfinite(none_observed["gof_all"])
    # N_ref − N_par ≤ 0: GoF undefined.
    too_many = jana_figures(HAND_I_O, HAND_SIGMA, HAND_I_C, n_params=5)
    assert math.isnan(too_many["gof"]) and math.isnan(too_many["gof_all"])
    assert np.isfinite(too_many["r_obs"])


def test_jana_rejects_bad_input_with_a_clear_message():
    with pytest.raises(EdkitError, match=r"sigma\[1\] = 0\.0.*must be > 0"):
        jana_figures([1.0, 2.0], [1.0, 0.0], [1.0, 2.0])
    with pytest.raises(EdkitError, match=r"i_calc has shape \(3,\), expected shape \(2,\)"):
        jana_figures([1.0, 2.0], [1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(EdkitError, match=r"i_obs\[0\] = nan is not a finite number"):
        jana_figures([np.nan], [1.0], [1.0])
    with pytest.raises(EdkitError, match=r"n_params = -1"):
        jana_figures([1.0], [1.0], [1.0], n_params=-1)


# ---------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------


def test_frame_scale_is_the_least_squares_minimiser():
    rng = np.random.default_rng(0)
    i_c = rng.uniform(0.0, 100.0, 12)
    i_o = 0.37 * i_c + rng.normal(0.0, 5.0, 12)
    w = rng.uniform(0.1, 2.0, 12)

    def objective(k):
        return float(np.sum(w**2 * (i_o - k * i_c) ** 2))

    k = frame_scale(i_o, i_c, w)
    # derivative −2 Σ w² I_c (I_o − k I_c) vanishes at the minimiser
    grad = -2.0 * np.sum(w**2 * i_c * (i_o - k * i_c))
    assert abs(grad) < 1e-9 * np.sum(w**2 * i_c * i_o)
    numeric = minimize_scalar(objective, bracket=(0.0, 1.0), tol=1e-12).x
    np.testing.assert_allclose(k, numeric, rtol=1e-7)
    assert objective(k) < objective(k * (1 + 1e-4)) and objective(k) < objective(k * (1 - 1e-4))
    # unweighted: a plain ratio of sums
    np.testing.assert_allclose(frame_scale(i_o, i_c), np.dot(i_o, i_c) / np.dot(i_c, i_c))
    # the weights matter (a test that a dropped w would fail)
    assert abs(frame_scale(i_o, i_c, w) - frame_scale(i_o, i_c)) > 1e-6


def test_frame_scale_undefined_is_zero():
    assert frame_scale([], []) == 0.0
    assert frame_scale([1.0, 2.0], [0.0, 0.0]) == 0.0


def _random_dataset(seed, n_refl=60, n_frames=5):
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, n_frames - 1, n_refl)  # the last frame stays empty on purpose
    true = rng.uniform(0.0, 400.0, n_refl)
    scales = rng.uniform(0.5, 3.0, n_frames)
    sigma = np.sqrt(true + 4.0)
    i_obs = scales[frame] * true + rng.normal(0.0, 1.0, n_refl) * sigma
    i_obs[:4] = [-3.0, -0.5, 0.0, 0.001]  # background-subtracted weak and negative values
    i_calc = true * rng.uniform(0.8, 1.25, n_refl)
    return i_obs, sigma, i_calc, frame, n_frames


def test_scale_per_frame_matches_a_loop():
    i_obs, sigma, i_calc, frame, n_frames = _random_dataset(1)
    i_calc[frame == 1] = 0.0  # frame 1: undefined scale
    got = scale_per_frame(i_obs, i_calc, frame, n_frames, weights=1.0 / sigma)
    assert got.shape == (n_frames,) and got.dtype == np.float64
    for f in range(n_frames):
        sel = frame == f
        num = sum(o * c / s**2 for o, c, s in zip(i_obs[sel], i_calc[sel], sigma[sel], strict=True))
        den = sum(c * c / s**2 for c, s in zip(i_calc[sel], sigma[sel], strict=True))
        expected = num / den if den else 0.0
        np.testing.assert_allclose(got[f], expected, rtol=1e-13)
    assert got[1] == 0.0 and got[n_frames - 1] == 0.0


def test_frame_index_out_of_range_is_rejected():
    with pytest.raises(EdkitError, match=r"frame_index\[1\] = 3 is outside \[0, 3\)"):
        scale_per_frame([1.0, 2.0], [1.0, 2.0], [0, 3], 3)


# ---------------------------------------------------------------------------------------------
# Per-frame figures (diffBloch convention)
# ---------------------------------------------------------------------------------------------


def _loop_frame_r_obs(i_obs, sigma, i_calc, frame, n_frames):
    out = []
    for f in range(n_frames):
        rows = [
            (o, s, c) for o, s, c, fr in zip(i_obs, sigma, i_calc, frame, strict=True) if fr == f
        ]
        num_k = sum(o * c / s**2 for o, s, c in rows)
        den_k = sum(c * c / s**2 for o, s, c in rows)
        k = num_k / den_k if den_k else 0.0
        obs = [(o, c) for o, s, c in rows if o > 3 * s]
        if not obs:
            out.append(math.nan)
            continue
        num = sum(abs(math.sqrt(o) - math.sqrt(max(k * c, 0.0))) for o, c in obs)
        out.append(num / sum(math.sqrt(o) for o, c in obs))
    return np.array(out)


def _loop_frame_wr2(i_obs, sigma, i_calc, frame, n_frames):
    out = []
    for f in range(n_frames):
        rows = [
            (o, s, c) for o, s, c, fr in zip(i_obs, sigma, i_calc, frame, strict=True) if fr == f
        ]
        num_k = sum(o * c / s**2 for o, s, c in rows)
        den_k = sum(c * c / s**2 for o, s, c in rows)
        k = num_k / den_k if den_k else 0.0
        den = sum(o * o / s**2 for o, s, c in rows)
        if den == 0:
            out.append(math.nan)
            continue
        out.append(math.sqrt(sum((o - k * c) ** 2 / s**2 for o, s, c in rows) / den))
    return np.array(out)


def test_frame_r_obs_matches_a_loop_and_is_labelled_per_frame():
    i_obs, sigma, i_calc, frame, n_frames = _random_dataset(2)
    got = frame_r_obs(i_obs, sigma, i_calc, frame, n_frames)
    expected = _loop_frame_r_obs(i_obs, sigma, i_calc, frame, n_frames)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert math.isnan(got[n_frames - 1])  # empty frame
    assert np.all(np.isfinite(got[:-1])) and np.all(got[:-1] > 0)
    mean = mean_frame_r_obs(i_obs, sigma, i_calc, frame, n_frames)
    np.testing.assert_allclose(mean, np.mean(expected[:-1]), rtol=1e-12)


def test_frame_wr2_matches_a_loop():
    i_obs, sigma, i_calc, frame, n_frames = _random_dataset(3)
    got = frame_wr2(i_obs, sigma, i_calc, frame, n_frames)
    expected = _loop_frame_wr2(i_obs, sigma, i_calc, frame, n_frames)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert math.isnan(got[-1])


def test_per_frame_figures_ignore_per_frame_rescaling():
    i_obs, sigma, i_calc, frame, n_frames = _random_dataset(4)
    factors = np.array([0.01, 3.0, 250.0, 7.0, 1.0])
    r0 = frame_r_obs(i_obs, sigma, i_calc, frame, n_frames)
    r1 = frame_r_obs(i_obs, sigma, i_calc * factors[frame], frame, n_frames)
    np.testing.assert_allclose(r1, r0, rtol=1e-12)
    w0 = frame_wr2(i_obs, sigma, i_calc, frame, n_frames)
    w1 = frame_wr2(i_obs, sigma, i_calc * factors[frame], frame, n_frames)
    np.testing.assert_allclose(w1, w0, rtol=1e-12)
    # but not to a change of shape within a frame
    perturbed = i_calc.copy()
    perturbed[frame == 0] *= np.linspace(0.5, 1.5, np.count_nonzero(frame == 0))
    assert not np.allclose(frame_r_obs(i_obs, sigma, perturbed, frame, n_frames)[0], r0[0])


def test_per_frame_perfect_fit_and_empty_cases():
    frame = np.array([0, 0, 1, 1])
    i_obs = np.array([100.0, 50.0, 80.0, 30.0])
    sigma = np.ones(4)
    np.testing.assert_allclose(
        frame_r_obs(i_obs, sigma, 2.0 * i_obs, frame, 3)[:2], 0.0, atol=1e-15
    )
    np.testing.assert_allclose(frame_wr2(i_obs, sigma, 5.0 * i_obs, frame, 3)[:2], 0.0, atol=1e-15)
    # nothing observed anywhere: NaN, no warning
    assert math.isnan(mean_frame_r_obs([1.0, -1.0], [1.0, 1.0], [1.0, 1.0], [0, 1], 2))
    assert frame_r_obs([], [], [], [], 2).shape == (2,)
    # a frame whose calculated intensities are all zero: scale 0, R_obs = 1 (honest misfit)
    r = frame_r_obs(i_obs, sigma, np.array([1.0, 2.0, 0.0, 0.0]), frame, 2)
    np.testing.assert_allclose(r[1], 1.0)


# ---------------------------------------------------------------------------------------------
# Differentiable losses
# ---------------------------------------------------------------------------------------------


def _jana_w(i_o, s):
    """Jana weights written out again (science.md §7), independent of edkit's helper."""
    out = []
    for o, si in zip(i_o, s, strict=True):
        f = math.sqrt(max(o, 0.0))
        sf = 5.0 * math.sqrt(si) if o < 0.01 * si else si / (2.0 * f)
        out.append(1.0 / (sf**2 + (0.01 * f) ** 2))
    return np.array(out)


def _loop_jana_wr(i_obs, sigma, i_calc, mask, frame, n_frames):
    m = np.asarray(mask, dtype=bool)
    w = _jana_w(i_obs[m], sigma[m])
    f_o = np.sqrt(np.maximum(i_obs[m], 0.0))
    f_c = np.sqrt(np.maximum(i_calc[m], 0.0))
    fr = frame[m]
    num = den = 0.0
    for f in range(n_frames):
        sel = fr == f
        d = np.sum(w[sel] * f_c[sel] ** 2)
        k = np.sum(w[sel] * f_o[sel] * f_c[sel]) / d if d else 0.0
        num += np.sum(w[sel] * (f_o[sel] - k * f_c[sel]) ** 2)
        den += np.sum(w[sel] * f_o[sel] ** 2)
    return math.sqrt(num / den)


def _loss_inputs(seed):
    i_obs, sigma, i_calc, frame, n_frames = _random_dataset(seed)
    rng = np.random.default_rng(seed + 100)
    mask = rng.uniform(size=i_obs.shape) < 0.8
    mask[:4] = True  # keep the negative / weak reflections scored
    return i_obs, sigma, i_calc, mask, frame, n_frames


def test_jana_wr_loss_matches_a_loop_and_jana_figures():
    i_obs, sigma, i_calc, mask, frame, n_frames = _loss_inputs(5)
    loss = jana_wr_loss(
        jnp.asarray(i_obs),
        jnp.asarray(sigma),
        jnp.asarray(i_calc),
        jnp.asarray(mask),
        jnp.asarray(frame),
        n_frames,
    )
    assert loss.shape == () and loss.dtype == jnp.float64
    expected = _loop_jana_wr(i_obs, sigma, i_calc, mask, frame, n_frames)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)
    # second route: scale each frame by k_F² on intensities, then Jana's wR_all on the scored set
    w = _jana_w(i_obs, sigma)
    f_o, f_c = np.sqrt(np.maximum(i_obs, 0.0)), np.sqrt(i_calc)
    scaled = i_calc.copy()
    for f in range(n_frames):
        sel = mask & (frame == f)
        if sel.any():
            k_f = np.sum(w[sel] * f_o[sel] * f_c[sel]) / np.sum(w[sel] * f_c[sel] ** 2)
            scaled[sel] *= k_f**2
    np.testing.assert_allclose(
        float(loss), jana_figures(i_obs[mask], sigma[mask], scaled[mask])["wr_all"], rtol=1e-12
    )


def test_jana_scale_per_frame_gives_the_wr_the_loss_minimises():
    """The refinement's report (edkit.refine.results.figures) scales with this: its wR_all is
    then the loss's wR exactly, and any other scale of a frame only raises it."""
    i_obs, sigma, i_calc, mask, frame, n_frames = _loss_inputs(5)
    scale = jana_scale_per_frame(i_obs[mask], sigma[mask], i_calc[mask], frame[mask], n_frames)
    scored = np.bincount(frame[mask], minlength=n_frames) > 0
    assert scale.shape == (n_frames,) and np.all(scale[scored] > 0)
    np.testing.assert_array_equal(scale[~scored], 0.0)  # nothing to scale on: 0, finite
    loss = float(jana_wr_loss(*map(jnp.asarray, (i_obs, sigma, i_calc, mask, frame)), n_frames))

    def wr_all(scales):
        scaled = (i_calc * scales[frame])[mask]
        return jana_figures(i_obs[mask], sigma[mask], scaled)["wr_all"]

    np.testing.assert_allclose(wr_all(scale), loss, rtol=1e-12)
    for f in np.flatnonzero(scored):
        for factor in (0.98, 1.02):
            nudged = scale.copy()
            nudged[f] *= factor
            assert wr_all(nudged) > loss
    with pytest.raises(EdkitError, match="jana_scale_per_frame"):
        jana_scale_per_frame([1.0], [0.0], [1.0], [0], 1)


@pytest.mark.parametrize("reduction", ["frame_mean", "global"])
def test_intensity_wr2_loss_matches_frame_wr2(reduction):
    i_obs, sigma, i_calc, mask, frame, n_frames = _loss_inputs(6)
    loss = intensity_wr2_loss(
        jnp.asarray(i_obs),
        jnp.asarray(sigma),
        jnp.asarray(i_calc),
        jnp.asarray(mask),
        jnp.asarray(frame),
        n_frames,
        reduction=reduction,
    )
    assert loss.dtype == jnp.float64
    per_frame = _loop_frame_wr2(i_obs[mask], sigma[mask], i_calc[mask], frame[mask], n_frames)
    if reduction == "frame_mean":
        expected = np.mean(per_frame[np.isfinite(per_frame)])
    else:
        m = mask
        num = den = 0.0
        for f in range(n_frames):
            sel = frame[m] == f
            o, s, c = i_obs[m][sel], sigma[m][sel], i_calc[m][sel]
            k = np.sum(o * c / s**2) / np.sum(c * c / s**2) if sel.any() else 0.0
            num += np.sum((o - k * c) ** 2 / s**2)
            den += np.sum(o**2 / s**2)
        expected = math.sqrt(num / den)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)


def test_intensity_wr2_reductions_differ_and_bad_reduction_is_rejected():
    args = [jnp.asarray(a) for a in _loss_inputs(7)[:5]]
    a = intensity_wr2_loss(*args, 5, reduction="frame_mean")
    b = intensity_wr2_loss(*args, 5, reduction="global")
    assert abs(float(a) - float(b)) > 1e-6
    with pytest.raises(EdkitError, match="reduction = 'mean'"):
        intensity_wr2_loss(*args, 5, reduction="mean")


LOSSES = [
    pytest.param(jana_wr_loss, id="jana_wr"),
    pytest.param(intensity_wr2_loss, id="wr2_frame_mean"),
    pytest.param(partial(intensity_wr2_loss, reduction="global"), id="wr2_global"),
]


def _jitted(loss, n_frames):
    return jax.jit(lambda i_o, s, i_c, m, fr: loss(i_o, s, i_c, m, fr, n_frames))


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_gradient_matches_central_differences(loss):
    i_obs, sigma, i_calc, mask, frame, n_frames = _loss_inputs(8)
    fn = _jitted(loss, n_frames)
    data = (jnp.asarray(i_obs), jnp.asarray(sigma))
    rest = (jnp.asarray(mask), jnp.asarray(frame))
    grad = np.asarray(jax.grad(lambda c: fn(*data, c, *rest))(jnp.asarray(i_calc)))
    assert grad.dtype == np.float64
    fd = np.zeros_like(i_calc)
    for j in range(i_calc.size):
        h = 1e-6 * i_calc[j]
        up, down = i_calc.copy(), i_calc.copy()
        up[j] += h
        down[j] -= h
        fd[j] = (
            float(fn(*data, jnp.asarray(up), *rest)) - float(fn(*data, jnp.asarray(down), *rest))
        ) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-9 * np.max(np.abs(fd)))
    assert np.all(grad[~mask] == 0.0)  # unscored reflections have no influence
    assert np.count_nonzero(grad[mask]) > mask.sum() // 2


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_is_invariant_to_rescaling_calc(loss):
    i_obs, sigma, i_calc, mask, frame, n_frames = _loss_inputs(9)
    fn = _jitted(loss, n_frames)
    args = (jnp.asarray(i_obs), jnp.asarray(sigma))
    rest = (jnp.asarray(mask), jnp.asarray(frame))
    base = float(fn(*args, jnp.asarray(i_calc), *rest))
    assert 0.0 < base < 1.0
    for factor in (1e-4, 0.3, 17.0, 1e5):
        np.testing.assert_allclose(
            float(fn(*args, jnp.asarray(factor * i_calc), *rest)), base, rtol=1e-11
        )
    per_frame = np.array([0.2, 5.0, 1.0, 40.0, 3.0])[frame]  # frames are scaled independently
    np.testing.assert_allclose(
        float(fn(*args, jnp.asarray(per_frame * i_calc), *rest)), base, rtol=1e-11
    )
    # and it does see a change of shape
    bent = i_calc * np.linspace(0.7, 1.3, i_calc.size)
    assert abs(float(fn(*args, jnp.asarray(bent), *rest)) - base) > 1e-4


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_gradient_finite_at_zero_calc_and_perfect_fit(loss):
    i_obs, sigma, i_calc, mask, frame, n_frames = _loss_inputs(10)
    fn = _jitted(loss, n_frames)
    data = (jnp.asarray(i_obs), jnp.asarray(sigma))
    rest = (jnp.asarray(mask), jnp.asarray(frame))
    g = jax.grad(lambda c: fn(*data, c, *rest))
    zeros = i_calc.copy()
    zeros[::3] = 0.0
    zeros[frame == 2] = 0.0  # a whole frame with I_c = 0: undefined scale
    value = float(fn(*data, jnp.asarray(zeros), *rest))
    assert np.isfinite(value)
    assert np.all(np.isfinite(np.asarray(g(jnp.asarray(zeros)))))
    # exact perfect fit (powers of two, so every residual is exactly 0 in floating point): loss 0
    # and gradient 0 (the safe sqrt at 0), not NaN/inf from d sqrt(x)/dx at x = 0.
    exact_obs = 2.0 ** np.arange(i_obs.size, dtype=np.float64) % 64.0 + 4.0
    exact_calc = 0.25 * exact_obs
    ones = jnp.ones(i_obs.shape)

    def perfect(c):
        return fn(jnp.asarray(exact_obs), ones, c, *rest)

    assert float(perfect(jnp.asarray(exact_calc))) == 0.0
    grad = np.asarray(jax.grad(perfect)(jnp.asarray(exact_calc)))
    assert np.all(grad == 0.0)
    # next to it (a tiny misfit) the gradient of a norm-like wR is bounded, not blowing up
    near = exact_calc * (1.0 + 1e-9 * np.sin(np.arange(i_obs.size)))
    assert 0.0 < float(perfect(jnp.asarray(near))) < 1e-8
    assert np.all(np.isfinite(np.asarray(jax.grad(perfect)(jnp.asarray(near)))))


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_ignores_garbage_in_unscored_reflections_and_takes_float_masks(loss):
    i_obs, sigma, i_calc, mask, frame, n_frames = _loss_inputs(11)
    fn = _jitted(loss, n_frames)
    clean = float(
        fn(
            jnp.asarray(i_obs),
            jnp.asarray(sigma),
            jnp.asarray(i_calc),
            jnp.asarray(mask),
            jnp.asarray(frame),
        )
    )
    dirty_obs, dirty_sigma, dirty_calc = i_obs.copy(), sigma.copy(), i_calc.copy()
    dirty_obs[~mask] = np.nan
    dirty_sigma[~mask] = 0.0
    dirty_calc[~mask] = np.inf
    float_mask = jnp.asarray(mask.astype(np.float64))

    def f(c):
        return fn(
            jnp.asarray(dirty_obs), jnp.asarray(dirty_sigma), c, float_mask, jnp.asarray(frame)
        )

    np.testing.assert_allclose(float(f(jnp.asarray(dirty_calc))), clean, rtol=1e-13)
    grad = np.asarray(jax.grad(f)(jnp.asarray(dirty_calc)))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_with_nothing_scored_is_nan_with_zero_gradient(loss):
    i_obs, sigma, i_calc, _, frame, n_frames = _loss_inputs(12)
    fn = _jitted(loss, n_frames)
    none = jnp.zeros(i_obs.shape, dtype=bool)
    data = (jnp.asarray(i_obs), jnp.asarray(sigma))
    value = fn(*data, jnp.asarray(i_calc), none, jnp.asarray(frame))
    assert math.isnan(float(value))
    grad = jax.grad(lambda c: fn(*data, c, none, jnp.asarray(frame)))(jnp.asarray(i_calc))
    assert np.all(np.asarray(grad) == 0.0)
