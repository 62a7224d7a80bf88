"""The kinematical start (edkit.refine.kinematic): positions fitted to |F|² from a far-off
model, one overall U chosen by the thickness search, and the option that puts it before a
refinement. The data are the paper's synthetic quartz (made from quartz_kinematical.cif, the
truth); the far-off model is quartz_displaced_03.cif (0.29 Å RMS, every U reset to 0.1 Å²).
"""

import dataclasses

import numpy as np
import pytest
import xarray as xr

import edkit
from edkit.errors import EdkitError
from edkit.io.cif import read_cif
from edkit.io.pets import read_pets, select_frames
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables
from edkit.refine import kinematic, prepare
from edkit.refine.kinematic import (
    CANDIDATES,
    FAR_OFF_R,
    U_GRID,
    KinematicStart,
    far_off_r,
    joint_member_options,
    kinematic_start,
    position_candidates,
)
from edkit.refine.options import RefinementOptions, options_from


@pytest.fixture(scope="module")
def synthetic(data_dir):
    return read_pets(data_dir / "pets" / "quartz_synthetic.cif_pets")


@pytest.fixture(scope="module")
def truth(data_dir):
    return read_cif(data_dir / "structures" / "quartz_kinematical.cif")


@pytest.fixture(scope="module")
def far(data_dir):
    return read_cif(data_dir / "structures" / "quartz_displaced_03.cif")


def _distances(crystal, truth) -> np.ndarray:
    """Each asymmetric-unit atom's distance from the truth's, Å."""
    delta = (np.asarray(crystal.fract) - np.asarray(truth.fract) + 0.5) % 1.0 - 0.5
    return np.linalg.norm(delta @ np.asarray(truth.real_basis), axis=1)


def test_kinematical_data_give_back_the_truth_exactly(far, truth, synthetic) -> None:
    """Intensities that are exactly k_f |F_truth|² (a scale per frame, σ from the Poisson
    counts): from 0.31 and 0.26 Å off, the lowest kinematical minimum is the truth to 1e-4 Å
    (measured 4e-7 and 4e-5), the kinematical R falls from 51 % to < 0.2 % (0.07 %), and the
    candidates keep the start's ADPs, occupancies and site symmetry (Si on its 2-fold axis)."""
    dataset = select_frames(synthetic, slice(0, None, 3))
    hkl = np.stack([dataset[k].values for k in "hkl"], axis=1)
    f = np.asarray(structure_factors_of(structure_params(truth), structure_tables(truth), hkl))
    _, frame = np.unique(dataset["frame_id"].values, return_inverse=True)
    scale = 1e4 * (1.0 + 0.5 * np.sin(np.arange(frame.max() + 1)))
    i_obs = scale[frame] * np.abs(f) ** 2
    exact = dataset.assign(I_obs=("refl", i_obs), sigma=("refl", np.sqrt(i_obs) + 1.0))
    assert np.all(_distances(far, truth) > 0.2)
    candidates, r_before = position_candidates(far, exact)
    best, r_after = candidates[0]
    print("distances from the truth, Å:", _distances(best, truth), r_before, r_after)
    assert np.all(_distances(best, truth) < 1e-4)
    assert r_after < 0.002 and r_before > 0.5
    for moved, _ in candidates:
        np.testing.assert_array_equal(moved.u_cif, far.u_cif)
        np.testing.assert_array_equal(moved.occupancy, far.occupancy)
        assert moved.fract[0, 2] == pytest.approx(far.fract[0, 2], abs=1e-12)
        assert moved.fract[0, 0] == pytest.approx(far.fract[0, 0], abs=1e-12)
    assert len(candidates) <= CANDIDATES


@pytest.mark.slow  # 70 s: two refinements' set-ups on 99 frames, one with the start
def test_a_far_start_finds_every_frames_thickness(far, truth, synthetic, data_dir) -> None:
    """Issue 12's check, with the defaults: from quartz_displaced_03.cif the refinement's
    thickness search fits badly (R_obs 62 %), so the kinematical start is made ("auto"), and
    every frame's thickness from the refinement's search is then within 10 % of the one
    quartz.cif's refinement finds (measured: at most 8.3 %); without it, none is (40–77 % off;
    tests/test_thickness_search.py). The positions come within 0.03 Å of the truth (measured
    0.006 and 0.018 Å), and the right minimum fits the search clearly best."""
    reference = edkit.Refinement(read_cif(data_dir / "structures" / "quartz.cif"), synthetic,
                                 progress=False)  # fmt: skip
    assert reference.kinematic_start is None  # R_obs 16 %: no start
    refinement = edkit.Refinement(far, synthetic, progress=False)
    start = refinement.kinematic_start
    assert start is not None and start.far_off_r > FAR_OFF_R
    print(start.describe(), start.candidate_r, start.given_r, start.search_r)
    assert np.all(_distances(start.crystal, truth) < 0.03)
    assert min(start.candidate_r) < 0.5 * start.given_r
    assert U_GRID[0] <= start.u_overall <= U_GRID[-1]
    assert start.search_r[start.u_overall] < start.start_adp_r  # the reset U = 0.1 fits worse
    found, expected = (
        r.thickness_search_result["thickness_best"].values for r in (refinement, reference)
    )
    deviation = np.abs(found / expected - 1.0)
    print(f"kinematical start vs quartz.cif: max deviation {deviation.max():.3f}")
    assert deviation.max() < 0.10


@pytest.mark.slow  # 33 s in CI (2026-12-06); test_the_choice_is_kept covers "auto" in the fast run
def test_a_far_off_model_gets_the_start_by_default(far, truth, synthetic) -> None:
    """``kinematic_start="auto"`` (the default): from the far-off model the refinement's search
    fits at a mean R_obs above FAR_OFF_R (11 frames: 48 %), so the start is made and the
    refinement set up again from it: every atom within 0.1 Å of the truth (from 0.31 and
    0.26 Å); its messages say so and why."""
    dataset = select_frames(synthetic, slice(0, None, 9))  # 11 frames
    small = {"n_sub": 5, "g_max": 1.2}
    refinement = edkit.Refinement(far, dataset, progress=False, **small)
    start = refinement.kinematic_start
    assert start is not None
    assert start.far_off_r > FAR_OFF_R
    assert refinement.start_crystal is start.crystal
    assert refinement.messages[0] == start.describe()
    assert f"above {100 * FAR_OFF_R:g} %" in refinement.messages[0]
    assert np.all(_distances(refinement.start_crystal, truth) < 0.1)
    # the refinement's search is the one from the start's crystal, and fits better
    assert np.nanmean(refinement.thickness_search_result["r_obs_best"].values) < start.far_off_r
    assert options_from().kinematic_start == "auto"
    assert edkit.Refinement.kinematic_start is None  # what a refinement without it reports


@pytest.mark.parametrize(
    ("choice", "model", "made"),
    [(True, "good", True), ("auto", "good", False), ("auto", "far", True), (False, "far", False)],
)
def test_the_choice_is_kept(
    choice, model, made, far, quartz_crystal, quartz_frames, monkeypatch
) -> None:
    """True makes the start even from a good model (and says nothing of R), False never, and
    "auto" from the far-off model only, saying why: 3 frames of the real quartz, where
    quartz.cif fits the first search at a mean R_obs of 1.9 % and quartz_displaced_03.cif at
    41 % (measured 2026-12-06); the start is stubbed here. Under "auto" a start made stops the
    first set-up after its search: one spread choice in every case, a second search only where
    the start was judged. (The paper's synthetic frames are no good model's test at these
    settings: the truth fits 3 of them at 20.5 %, above FAR_OFF_R.)"""
    calls = []

    def spy(crystal, dataset, opts, progress, far_off_r=np.nan):
        calls.append(far_off_r)
        return KinematicStart(crystal, np.zeros(2), (0.5, 0.5), np.nan, {}, 0.1,
                              far_off_r=far_off_r)  # fmt: skip

    monkeypatch.setattr(kinematic, "kinematic_start", spy)
    counted = {"thickness_search": 0, "start_spread": 0}
    for name in counted:
        monkeypatch.setattr(prepare, name, _counting(getattr(prepare, name), name, counted))
    dataset = select_frames(quartz_frames, slice(0, None, 40))
    crystal = {"good": quartz_crystal, "far": far}[model]
    refinement = edkit.Refinement(
        crystal, dataset, kinematic_start=choice, progress=False, n_sub=3, g_max=1.0
    )
    assert (refinement.kinematic_start is not None) is made
    assert len(calls) == int(made)
    if choice is True:
        assert np.isnan(calls[0])  # asked for, not judged
        assert "mean per-frame R_obs" not in refinement.messages[0]
    elif made:
        assert calls[0] > FAR_OFF_R
        assert f"R_obs of {100 * calls[0]:.1f} %" in refinement.messages[0]
    judged = choice == "auto" and made
    assert counted == {"thickness_search": 2 if judged else 1, "start_spread": 1}


def _counting(function, name, counted):
    def counting(*args, **kwargs):
        counted[name] += 1
        return function(*args, **kwargs)

    return counting


def test_bad_uses_are_refused(far, synthetic) -> None:
    with pytest.raises(EdkitError, match="kinematic_start"):
        options_from(kinematic_start="yes")
    dataset = select_frames(synthetic, slice(0, 2))
    with pytest.raises(EdkitError, match="kinematic_start fits one dataset"):
        edkit.Refinement(far, [dataset, dataset], kinematic_start=True, progress=False)
    for given in ({}, {"kinematic_start": "auto"}, {"kinematic_start": False}):
        assert joint_member_options(given) == {"kinematic_start": False}  # off for a joint one
    empty = dataset.assign(sigma=("refl", np.zeros(dataset.sizes["refl"])))
    with pytest.raises(EdkitError, match="sigma"):
        kinematic_start(far, empty)


def test_far_off_r_judges_the_first_search_only_under_auto() -> None:
    """The mean over scored frames (a frame without scored reflections is NaN), above
    FAR_OFF_R only, and only for "auto"; the flag's help names the same threshold."""
    search = xr.Dataset({"r_obs_best": ("frame", [0.5, np.nan, 0.2])})
    auto = options_from()
    assert far_off_r(search, auto) == pytest.approx(0.35)
    assert far_off_r(search.assign(r_obs_best=("frame", [0.2, 0.15, 0.1])), auto) is None
    assert far_off_r(search.assign(r_obs_best=("frame", [np.nan] * 3)), auto) is None
    assert far_off_r(None, auto) is None  # the thickness was given: no search
    for choice in (True, False):
        assert far_off_r(search, options_from(kinematic_start=choice)) is None
    fields = {f.name: f for f in dataclasses.fields(RefinementOptions)}
    assert f"({100 * FAR_OFF_R:g} %)" in fields["kinematic_start"].metadata["help"]


def test_the_overall_u_spares_fixed_hydrogen_uiso(data_dir) -> None:
    """The start's overall U reaches every atom, but the riding H whose Uiso the options fix
    (--fixed-h-uiso): they keep the model's (glycine: 0.0196 and 0.0183 Å²)."""
    glycine = read_cif(data_dir / "structures" / "glycine.cif")
    hydrogen = np.array([e == "H" for e in glycine.elements])
    riding = kinematic._with_overall_u(glycine, 0.009, options_from())
    np.testing.assert_allclose(riding.u_iso_equivalent, 0.009, rtol=1e-9)
    fixed = kinematic._with_overall_u(glycine, 0.009, options_from(riding_uiso=False))
    np.testing.assert_allclose(fixed.u_iso_equivalent[~hydrogen], 0.009, rtol=1e-9)
    np.testing.assert_array_equal(fixed.u_cif[hydrogen], glycine.u_cif[hydrogen])
    assert np.all(glycine.u_iso_equivalent[hydrogen] > 0.018)
    for crystal, says in ((riding, "every atom isotropic"), (fixed, "but the riding H")):
        start = KinematicStart(crystal, np.zeros(10), (0.5, 0.5), 0.009, {}, 0.1, (0.2,))
        assert says in start.describe()
