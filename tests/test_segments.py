"""Segments: runs of a frame's sub-orientations solved with their own beams (setup ``segments``).

(i) With every beam exact in every run the runs must give the frame's intensities and
gradients exactly (the bookkeeping: run beams, couplings, scatter into the frame list);
(ii) on real quartz the runs solve fewer beams and keep the scored intensities and R close to
the frame solve; (iii) with absorption and shared Bethe terms the plumbing holds too;
(iv) bad choices are refused.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit import EdkitError
from edkit.io.cif import read_cif
from edkit.io.pets import read_pets, select_frames
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import build_frame_setup, frame_intensity_stack, simulate_frames


@pytest.fixture(scope="module")
def quartz_crystal(data_dir):
    return read_cif(data_dir / "structures" / "quartz.cif")


@pytest.fixture(scope="module")
def quartz_frames(data_dir):
    return read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")


def _stack(crystal, setup, thickness, **options):
    with jax.enable_x64(True):
        tables, params = structure_tables(crystal), structure_params(crystal)
        t = jnp.full((setup.n_frames, 1), thickness)
        return np.asarray(frame_intensity_stack(params, tables, setup, t, **options))


@pytest.mark.parametrize("absorption", [None, 0.05])
def test_runs_with_every_beam_exact_equal_the_frame_solve(
    quartz_crystal, quartz_frames, absorption
) -> None:
    frames = select_frames(quartz_frames, [0, 1, 2])
    options = {"sg_max": 2.0, "n_sub": 12, "g_max": 0.7}  # every beam exact everywhere
    whole = build_frame_setup(quartz_crystal, frames, **options)
    runs = build_frame_setup(quartz_crystal, frames, segments=3, **options)
    assert runs.segments is not None and whole.segments is None
    np.testing.assert_array_equal(runs.segments.n_beams, whole.n_beams[:, None].repeat(3, 1))
    expected = _stack(quartz_crystal, whole, 420.0, absorption=absorption)
    got = _stack(quartz_crystal, runs, 420.0, absorption=absorption)
    assert expected[:, :, 1:].max() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_runs_gradients_equal_the_frame_solve(quartz_crystal, quartz_frames) -> None:
    frames = select_frames(quartz_frames, [0])
    options = {"sg_max": 2.0, "n_sub": 6, "g_max": 0.6}
    tables, params = structure_tables(quartz_crystal), structure_params(quartz_crystal)
    grads = []
    for segments in (1, 2):
        setup = build_frame_setup(quartz_crystal, frames, segments=segments, **options)
        weights = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 1, setup.hkl.shape[1])))

        def loss(fract, t, setup=setup, weights=weights):
            stack = frame_intensity_stack(params._replace(fract=fract), tables, setup, t)
            return jnp.sum(weights * stack)

        with jax.enable_x64(True):
            grad = jax.grad(loss, argnums=(0, 1))(
                jnp.asarray(params.fract), jnp.full((1, 1), 380.0)
            )
        grads.append([np.asarray(g) for g in grad])
    for whole, runs in zip(*grads, strict=True):
        assert np.abs(whole).max() > 1e-6
        np.testing.assert_allclose(runs, whole, rtol=1e-8, atol=1e-12)


def test_quartz_runs_solve_fewer_beams_and_keep_the_r_factor(quartz_crystal, quartz_frames) -> None:
    """Real quartz, 6 frames: 4 runs of 6 sub-orientations against the whole frame, the
    refinement's beams (|S| ≤ 0.005 exact, Bethe to 0.03, 12 shared terms)."""
    frames = select_frames(quartz_frames, list(range(0, 30, 5)))
    options = {"sg_max": 0.005, "sg_weak": 0.03, "n_sub": 24, "bethe_terms": 4}
    whole = build_frame_setup(quartz_crystal, frames, **options)
    runs = build_frame_setup(quartz_crystal, frames, segments=4, **options)
    assert runs.segments is not None
    # The frame's beams are the union of its runs' beams; each run solves fewer.
    np.testing.assert_array_equal(runs.hkl, whole.hkl)
    assert runs.segments.n_beams.mean() < 0.8 * whole.n_beams.mean()
    results = [simulate_frames(quartz_crystal, frames, 450.0, setup=s) for s in (whole, runs)]
    scored = whole.scored
    i_whole, i_runs = (r["I_calc"].values[scored] for r in results)
    assert np.all(np.isfinite(i_runs)) and scored.sum() > 20
    assert np.abs(i_runs - i_whole).sum() / i_whole.sum() < 0.03
    r_whole, r_runs = (np.nanmean(r["r_obs_frame"].values) for r in results)
    assert abs(r_whole - r_runs) < 2e-3


def test_segments_are_checked(quartz_crystal, quartz_frames) -> None:
    frames = select_frames(quartz_frames, [0])
    with pytest.raises(EdkitError, match="does not divide n_sub = 10"):
        build_frame_setup(quartz_crystal, frames, n_sub=10, segments=3)
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(EdkitError, match="segments = "):
            build_frame_setup(quartz_crystal, frames, segments=bad)
    # A default n_sub is rounded up to a multiple of the runs.
    setup = build_frame_setup(quartz_crystal, frames, segments=7)
    assert setup.settings["n_sub"] % 7 == 0 and setup.settings["segments"] == 7
