"""Frames of a continuous-rotation dataset (edkit.simulate.frames, science.md §5, §7).

Padding is inert, the bookkeeping (000 first, every scored reflection simulated, cell check) holds,
the rocking-curve integral converges in n_sub at its expected rate, thickness distributions and
per-frame thicknesses are what they claim, mosaicity acts on the frame edges, empty frames are
reported, gradients match central differences, and the real quartz data fit (mean per-frame R_obs
< 8 %, the diffBloch convention of science.md §7/§8). Most tests use a few frames
(:func:`subset_frames`) and few sub-orientations for speed; conftest.py turns x64 on.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit.errors import EdkitError
from edkit.io.cif import read_cif
from edkit.io.pets import read_pets, select_frames
from edkit.metrics import mean_frame_r_obs
from edkit.physics.rocking import sub_orientation_angles
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import (
    build_frame_setup,
    frame_intensity_stack,
    reflection_intensities,
    simulate_frames,
    thickness_search,
)

subset_frames = select_frames


@pytest.fixture(scope="module")
def quartz(data_dir):
    return read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")


@pytest.fixture(scope="module")
def crystal(data_dir):
    return read_cif(data_dir / "structures" / "quartz.cif")


@pytest.fixture(scope="module")
def six(quartz):
    return subset_frames(quartz, [0, 1, 2, 3, 4, 6])  # one beam bucket at n_sub = 7: one compile


@pytest.fixture(scope="module")
def three(quartz):
    return subset_frames(quartz, slice(0, 3))


@pytest.fixture(scope="module")
def setup6(crystal, six):
    return build_frame_setup(crystal, six, n_sub=7)


def _stack(crystal, setup, thickness, corrections=None):
    """frame_intensity_stack at ``thickness`` (n_f, n_t), jitted, as numpy (n_f, n_t, n)."""
    params, tables = structure_params(crystal), structure_tables(crystal)
    run = jax.jit(
        lambda p, t, c: frame_intensity_stack(p, tables, setup, t, orientation_corrections=c)
    )
    return np.asarray(run(params, jnp.asarray(thickness), corrections))


# ---------------------------------------------------------------------------------------------
# the helper itself
# ---------------------------------------------------------------------------------------------


def test_subset_frames_keeps_exactly_their_reflections(quartz, six) -> None:
    assert six.sizes["frame"] == 6
    assert set(np.unique(six["frame_id"].values)) <= set(six["frame"].values)
    expected = np.isin(quartz["frame_id"].values, six["frame"].values).sum()
    assert six.sizes["refl"] == expected > 0


# ---------------------------------------------------------------------------------------------
# setup bookkeeping
# ---------------------------------------------------------------------------------------------


def test_padding_beams_are_inert(crystal, six, setup6) -> None:
    """Padding to a larger size (one compiled shape for all frames) changes nothing: 1e-12."""
    n = setup6.hkl.shape[1]
    padded = build_frame_setup(crystal, six, n_sub=7, pad_to=n + 24)
    assert padded.hkl.shape[1] == n + 24
    np.testing.assert_array_equal(padded.hkl[:, :n], setup6.hkl)
    np.testing.assert_array_equal(padded.valid[:, :n], setup6.valid)
    thickness = np.tile([[150.0, 450.0, 900.0]], (6, 1))
    plain = _stack(crystal, setup6, thickness)
    wide = _stack(crystal, padded, thickness)
    np.testing.assert_allclose(wide[:, :, :n], plain, rtol=0, atol=1e-12)
    assert np.all(wide[:, :, n:] == 0.0)
    assert np.all(plain[~np.broadcast_to(setup6.valid[:, None, :], plain.shape)] == 0.0)


def test_000_is_first_in_every_frame(setup6) -> None:
    assert np.all(setup6.hkl[:, 0] == 0)
    assert np.all(setup6.valid[:, 0])
    nonzero = np.any(setup6.hkl != 0, axis=2)
    assert np.all(nonzero[:, 1:] == setup6.valid[:, 1:])  # 000 nowhere else; padding rows are 000


def test_every_scored_reflection_is_simulated(six, setup6) -> None:
    scored = setup6.scored
    assert scored.sum() > 20
    assert np.all(setup6.refl_beam[scored] >= 0)
    refl_hkl = np.stack([six[n].values for n in ("h", "k", "l")], axis=1)
    simulated = setup6.hkl[setup6.refl_frame[scored], setup6.refl_beam[scored]]
    np.testing.assert_array_equal(simulated, refl_hkl[scored])
    # and reflections outside g_max are never scored
    outside = setup6.refl_beam < 0
    assert not np.any(scored & outside)


def test_cell_mismatch_names_both_files(crystal, three) -> None:
    a, b, c, al, be, ga = crystal.cell
    near = crystal.replace(cell=(a * 1.005, b * 1.005, c, al, be, ga))
    build_frame_setup(near, three, n_sub=3)  # 0.5 % is accepted
    far = crystal.replace(cell=(a, b, c * 1.02, al, be, ga))
    with pytest.raises(EdkitError, match=r"quartz\.cif.*quartz_experimental\.cif_pets") as info:
        build_frame_setup(far, three, n_sub=3)
    assert re.search(r"cell c = 5\.5\d* vs 5\.4003 \(2\.0 % apart", str(info.value))


# ---------------------------------------------------------------------------------------------
# rocking curve
# ---------------------------------------------------------------------------------------------


def test_rocking_curve_converges_in_n_sub(crystal, quartz) -> None:
    """The uniform rule over [−θ, θ] converges at first order in the step: a rate test.

    Two frames, the same beams throughout (one setup, its sub-orientations replaced); relative
    error of the frame intensities (every real non-000 beam) against n_sub = 321. Measured (3
    frames, against 641): 0.057, 0.028, 0.013, 0.0057 at 21, 41, 81, 161, order 1.0–1.2; the end
    points' full weight makes the rule first order.
    """
    two = subset_frames(quartz, [0, 4])
    base = build_frame_setup(crystal, two, n_sub=41, mosaicity=0.0)
    theta = np.deg2rad(two["semiangle"].values)
    thickness = np.full((2, 1), 400.0)
    beams = base.valid.copy()
    beams[:, 0] = False

    def integrate(n: int) -> np.ndarray:
        setup = dataclasses.replace(
            base,
            angles=np.stack([sub_orientation_angles(t, n) for t in theta]),
            weights=np.full((2, n), 1.0 / n),
        )
        return _stack(crystal, setup, thickness)[:, 0][beams]

    exact = integrate(321)
    sizes = np.array([20, 40, 80])
    errors = np.array(
        [np.linalg.norm(integrate(int(n)) - exact) / np.linalg.norm(exact) for n in sizes]
    )
    order = -np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert np.all(np.diff(errors) < 0), errors
    assert order > 0.8, (order, errors)
    assert errors[-1] < 0.03, errors


def test_zero_mosaicity_gives_uniform_weights(crystal, three) -> None:
    setup = build_frame_setup(crystal, three, n_sub=9, mosaicity=0.0)
    theta = np.deg2rad(three["semiangle"].values)
    np.testing.assert_array_equal(setup.weights, np.full((3, 9), 1.0 / 9))
    for angles, t in zip(setup.angles, theta, strict=True):
        midpoints = -t + (np.arange(9) + 0.5) * (2 * t / 9)  # midpoint rule
        np.testing.assert_allclose(angles, midpoints, rtol=0, atol=1e-15)


def test_mosaicity_changes_edge_reflections(crystal, quartz) -> None:
    """A 0.1° mosaic spread blurs the frame's edges: beams whose rocking curve sits at the edge
    of the swept range (|S_g|/ΔS ≈ 1) change ≳ 10× more than beams well inside (< 0.6)."""
    four = subset_frames(quartz, [4, 8, 9, 10])  # one beam bucket in both setups
    plain = build_frame_setup(crystal, four, n_sub=61, mosaicity=0.0)
    mosaic = build_frame_setup(crystal, four, n_sub=61, mosaicity=0.1)
    assert mosaic.weights[0, 0] < 0.02 * mosaic.weights[0, 30]  # tapered ends (uniform: 1)
    thickness = np.full((4, 1), 500.0)
    i_plain = _stack(crystal, plain, thickness)[:, 0]
    i_mosaic = _stack(crystal, mosaic, thickness)[:, 0]
    reciprocal = np.asarray(crystal.reciprocal_basis)
    theta = np.deg2rad(four["semiangle"].values)
    ratio, change = [], []
    for f in range(4):
        where = {tuple(h): j for j, h in enumerate(mosaic.hkl[f, mosaic.valid[f]].tolist())}
        for j in range(1, int(plain.valid[f].sum())):
            h = tuple(plain.hkl[f, j].tolist())
            if h not in where:
                continue
            g = plain.rotations[f] @ (np.array(h) @ reciprocal)
            s0 = g[2] - g @ g / (2 * plain.wave_number)  # beam along −z
            ratio.append(abs(s0) / (np.hypot(g[1], g[2]) * theta[f]))
            change.append(abs(i_mosaic[f, where[h]] - i_plain[f, j]) / i_plain[f, j])
    ratio, change = np.array(ratio), np.array(change)
    centre = np.median(change[ratio < 0.6])
    edge = np.median(change[(ratio > 0.85) & (ratio < 1.15)])
    assert edge > 0.1, edge
    assert edge > 5 * centre, (edge, centre)


# ---------------------------------------------------------------------------------------------
# thickness models
# ---------------------------------------------------------------------------------------------


def test_thickness_distribution_is_the_weighted_sum(crystal, three) -> None:
    """simulate_frames with (values, weights) = Σ_j w_j · (the kernel at the single t_j)."""
    setup = build_frame_setup(crystal, three, n_sub=5)
    values, weights = np.array([250.0, 500.0, 800.0]), np.array([0.2, 0.5, 0.3])
    mixed = simulate_frames(crystal, three, (values, 2.0 * weights), setup=setup)  # normalised
    params, tables = structure_params(crystal), structure_tables(crystal)
    single = jax.jit(
        lambda t: reflection_intensities(
            setup, frame_intensity_stack(params, tables, setup, jnp.full((3, 1), t))[:, 0]
        )
    )
    expected = sum(w * np.asarray(single(t)) for w, t in zip(weights, values, strict=True))
    np.testing.assert_allclose(mixed["I_calc"].values, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mixed["thickness"].values, np.full(3, weights @ values))


def test_per_frame_thickness_equals_frame_by_frame_runs(crystal, quartz) -> None:
    """One value per frame = each frame simulated alone (its own setup) at its scalar value."""
    two = subset_frames(quartz, [0, 3])
    thickness = np.array([250.0, 800.0])
    together = simulate_frames(crystal, two, thickness, n_sub=5)
    for f, t in enumerate(thickness):
        alone = simulate_frames(crystal, subset_frames(two, [f]), float(t), n_sub=5)
        rows = two["frame_id"].values == two["frame"].values[f]
        np.testing.assert_allclose(
            together["I_calc"].values[rows], alone["I_calc"].values, rtol=1e-10, atol=1e-14
        )


# ---------------------------------------------------------------------------------------------
# frames with nothing to score
# ---------------------------------------------------------------------------------------------


def test_frames_without_scored_reflections_are_reported(crystal, six, setup6) -> None:
    ids = six["frame"].values
    # frame ids[2] keeps only its unscored reflections; frame ids[4] loses all of them
    drop = ((setup6.refl_frame == 2) & setup6.scored) | (setup6.refl_frame == 4)
    assert np.any((setup6.refl_frame == 2) & ~setup6.scored)
    thinned = six.isel(refl=np.flatnonzero(~drop))
    setup = build_frame_setup(crystal, thinned, n_sub=7)
    result = simulate_frames(crystal, thinned, 400.0, setup=setup)
    already = np.bincount(setup6.refl_frame[setup6.scored], minlength=6) == 0
    empty = sorted({int(ids[2]), int(ids[4])} | {int(f) for f in ids[already]})
    reported = [int(f) for f in result.attrs["frames_without_scored"].split()]
    assert reported == empty
    assert np.all(np.isfinite(result["I_calc"].values))
    assert np.all(np.isfinite(result["I_calc_scaled"].values))
    assert np.isnan(result["r_obs_frame"].sel(frame=ids[2]))
    assert np.isnan(result["r_obs_frame"].sel(frame=ids[4]))
    assert int(result["n_scored"].sel(frame=ids[4])) == 0
    search = thickness_search(crystal, thinned, np.array([200.0, 400.0]), setup=setup)
    assert np.isnan(search["thickness_best"].sel(frame=ids[4]))
    assert np.isfinite(search["thickness_best"].sel(frame=ids[0]))


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


def _central_difference(fun, x: np.ndarray, step: float) -> np.ndarray:
    grad = np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        e = np.zeros(x.shape)
        e[i] = step
        grad[i] = (fun(x + e) - fun(x - e)) / (2 * step)
    return grad


def test_gradients_match_central_differences(crystal, quartz) -> None:
    """d/d(thickness) and d/d(orientation corrections) of Σ c·I, c random, in float64."""
    setup = build_frame_setup(crystal, subset_frames(quartz, [1, 3]), n_sub=5)
    params, tables = structure_params(crystal), structure_tables(crystal)
    rng = np.random.default_rng(1)
    c = jnp.asarray(rng.uniform(size=(2, 1, setup.hkl.shape[1])))

    def loss(t, corrections):
        i = frame_intensity_stack(params, tables, setup, t, orientation_corrections=corrections)
        return jnp.sum(c * i)

    thickness = np.array([[310.0], [530.0]])
    corrections = rng.normal(scale=1e-3, size=(2, 3))
    value, (g_t, g_c) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        jnp.asarray(thickness), jnp.asarray(corrections)
    )
    assert value.dtype == jnp.float64 and g_t.dtype == jnp.float64
    f = jax.jit(loss)
    fd_t = _central_difference(lambda x: float(f(x, corrections)), thickness, 1e-2)
    fd_c = _central_difference(lambda x: float(f(thickness, x)), corrections, 1e-6)
    np.testing.assert_allclose(g_t, fd_t, rtol=0, atol=1e-6 * np.abs(fd_t).max())
    np.testing.assert_allclose(g_c, fd_c, rtol=0, atol=1e-5 * np.abs(fd_c).max())
    assert np.abs(fd_c).max() > 0.1  # the orientation does matter


@pytest.mark.parametrize("absorption", [pytest.param(None, marks=pytest.mark.slow), 0.05])  # 15 s
def test_rematerialisation_leaves_value_and_gradient_unchanged(crystal, quartz, absorption):
    """remat=True (recompute each frame) and remat="eigensystems" (keep only the
    eigendecompositions) change memory and time, never the numbers; with Bethe beams."""
    setup = build_frame_setup(
        crystal, subset_frames(quartz, [1, 3]), n_sub=5, sg_max=0.005, sg_weak=0.03
    )
    params, tables = structure_params(crystal), structure_tables(crystal)
    c = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 1, setup.hkl.shape[1])))

    def loss(p, t, remat):
        i = frame_intensity_stack(p, tables, setup, t, absorption=absorption, remat=remat)
        return jnp.sum(c * i)

    thickness = jnp.asarray([[310.0], [530.0]])
    results = [
        jax.jit(jax.value_and_grad(lambda p, t, r=remat: loss(p, t, r), argnums=(0, 1)))(
            params, thickness
        )
        for remat in (False, True, "eigensystems")
    ]
    reference = jax.tree_util.tree_leaves(results[0])
    for result in results[1:]:
        for a, b in zip(reference, jax.tree_util.tree_leaves(result), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14 * np.abs(a).max())
    with pytest.raises(EdkitError, match="remat = 'some'"):
        frame_intensity_stack(params, tables, setup, thickness, remat="some")


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_centrosymmetric_crystals_solve_real_matrices_with_the_same_result(data_dir) -> None:
    """Glycine (P2₁/n, inversion at the origin): F(h) is real, the Bloch matrices real
    symmetric; the real route gives the complex route's intensities and gradients (with Bethe
    beams, with and without absorption, double and single precision), and quartz (P3₂21) is
    not taken for centrosymmetric."""
    from edkit.physics.structure import centric_at_origin
    from edkit.simulate.synthetic import rotation_series

    glycine = read_cif(data_dir / "structures" / "glycine.cif")
    tables = structure_tables(glycine)
    assert centric_at_origin(tables)
    quartz_tables = structure_tables(read_cif(data_dir / "structures" / "quartz.cif"))
    assert not centric_at_origin(quartz_tables)
    geometry = rotation_series(
        cell=glycine.cell, alpha_start=-20.0, alpha_step=20.0, n_frames=2, semiangle=0.5
    )
    setup = build_frame_setup(glycine, geometry, g_max=1.2, n_sub=4, sg_max=0.005, sg_weak=0.03)
    params = structure_params(glycine)
    c = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 1, setup.hkl.shape[1])))
    thickness = jnp.asarray([[300.0], [450.0]])

    def loss(fract, real, absorption, solve_dtype):
        stack = frame_intensity_stack(
            params._replace(fract=fract), tables, setup, thickness, absorption=absorption,
            real_potential=real, solve_dtype=solve_dtype,
        )  # fmt: skip
        return jnp.sum(c * stack)

    fract = jnp.asarray(params.fract)
    for absorption, solve_dtype, rtol in ((None, None, 1e-10), (0.05, None, 1e-10),
                                          (None, jnp.complex64, 2e-4)):  # fmt: skip
        real, complex_ = (
            jax.jit(jax.value_and_grad(loss), static_argnums=(1, 3))(
                fract, flag, absorption, solve_dtype
            )
            for flag in (True, False)
        )
        np.testing.assert_allclose(real[0], complex_[0], rtol=rtol)
        scale = np.abs(complex_[1]).max()
        np.testing.assert_allclose(real[1], complex_[1], rtol=0, atol=rtol * scale)
    f = jax.jit(lambda x: loss(x, True, None, None))
    grad = np.asarray(jax.jit(jax.grad(lambda x: loss(x, True, None, None)))(fract))
    rest = np.asarray(fract)[2:]
    fd = _central_difference(
        lambda x: float(f(jnp.asarray(np.concatenate([x, rest])))), np.asarray(fract)[:2], 1e-6
    )
    np.testing.assert_allclose(grad[:2], fd, rtol=0, atol=1e-5 * np.abs(fd).max())
    assert np.abs(fd).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# the real quartz data (science.md §8: published mean per-frame R_obs 4–6.5 %)
# ---------------------------------------------------------------------------------------------


def _quartz_fit(crystal, dataset):
    setup = build_frame_setup(crystal, dataset)
    search = thickness_search(crystal, dataset, setup=setup)
    best = search["thickness_best"].values
    assert np.all(np.isfinite(best))
    result = simulate_frames(crystal, dataset, best, setup=setup)
    scored = setup.scored
    r_mean = mean_frame_r_obs(
        dataset["I_obs"].values[scored],
        dataset["sigma"].values[scored],
        result["I_calc"].values[scored],
        setup.refl_frame[scored],
        setup.n_frames,
    )
    # simulate_frames at the searched thickness reproduces the search's own R per frame
    np.testing.assert_allclose(
        result["r_obs_frame"].values, search["r_obs_best"].values, rtol=1e-10
    )
    return r_mean


def test_quartz_every_tenth_frame_fits(crystal, quartz) -> None:
    """10 frames spread over the whole α range, per-frame best thickness: measured 4.2 %."""
    r_mean = _quartz_fit(crystal, subset_frames(quartz, slice(0, 99, 10)))
    assert r_mean < 0.08


@pytest.mark.slow
def test_quartz_all_frames_fit(crystal, quartz) -> None:
    """All 99 frames, per-frame best thickness (≈15 s): measured 5.4 %."""
    assert _quartz_fit(crystal, quartz) < 0.08
