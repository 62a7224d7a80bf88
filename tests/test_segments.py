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
from edkit.io.pets import select_frames
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import build_frame_setup, frame_intensity_stack, simulate_frames


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


def test_coupling_strength_is_u_over_2k(quartz_crystal, quartz_frames) -> None:
    from edkit.constants import potential_prefactor
    from edkit.physics.structure import structure_factors_of
    from edkit.simulate.segments import coupling_strength

    candidates = np.array([[0, 0, 0], [1, 0, 0], [0, 1, -1], [2, -1, 1]])
    strength = coupling_strength(quartz_crystal, candidates, 200e3, 40.0)
    differences = np.array([[1, 0, 0], [-2, 2, -2], [2, -1, 1], [0, 0, 0]])
    with jax.enable_x64(True):
        f = np.asarray(
            structure_factors_of(
                structure_params(quartz_crystal), structure_tables(quartz_crystal), differences
            )
        )
    expected = np.abs(f) * potential_prefactor(200e3) / 80.0
    expected[-1] = 0.0  # U₀ couples nothing
    np.testing.assert_allclose(strength(differences), expected, rtol=1e-12)
    assert expected[:3].min() > 0


def test_resonant_beams_join_the_run() -> None:
    """A frame beam off the sphere over the whole run joins the run's exact beams when an exact
    beam drives it near resonance (|U|/2K against their S difference), not otherwise."""
    from edkit.simulate.segments import CouplingStrength, run_selection

    candidates = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [0, 5, 0]])
    # S over two sub-orientations (one run): 000 and beam 1 near the sphere, 2 at 0.02 like
    # nothing exact, 3 resonant with 1 at the second sub-orientation, 4 far and weak.
    excitation = np.array([[0.0, 0.0], [0.001, 0.03], [0.05, 0.05], [0.04, 0.0305], [0.2, 0.2]])
    keep = np.ones(5, bool)
    values = np.zeros((9, 11, 1))
    lower = np.array([-4, -5, 0])
    table = CouplingStrength(lower, values)
    values[2 + 4, 5, 0] = values[-2 + 4, 5, 0] = 0.002  # h_3 − h_1 = (2, 0, 0)
    values[1 + 4, 5, 0] = values[-1 + 4, 5, 0] = 0.0001  # neighbours along the row: weak
    plain, _ = run_selection(excitation, keep, 1, 0.005, None)
    promoted, _ = run_selection(excitation, keep, 1, 0.005, None, candidates, table)
    np.testing.assert_array_equal(plain[0], [0, 1])
    # Beam 3: |U|/2K = 0.002 against |S_3 − S_1| = 0.0005 → ratio 4 ≥ RESONANCE; beam 2's
    # couplings are 0.0001 over gaps ≥ 0.01 (ratio ≤ 0.01); beam 4 couples to nothing.
    np.testing.assert_array_equal(promoted[0], [0, 1, 3])


def test_refinement_option_segment_tails_reaches_the_setup(quartz_crystal, quartz_frames) -> None:
    from edkit.refine.options import options_from
    from edkit.refine.prepare import plan_setup

    frames = select_frames(quartz_frames, [0, 1])
    for tails in (False, True):
        opts = options_from(segments=2, segment_tails=tails, g_max=0.8)
        setup, _, _ = plan_setup(quartz_crystal, frames, opts)
        assert setup.segments is not None
        assert (setup.segments.tail is not None) == tails
        assert setup.settings["tails"] == int(tails)
    with pytest.raises(EdkitError, match="segment_tails"):
        options_from(segment_tails="yes")
