"""JointRefinement: one structure against several datasets (edkit.refine.joint)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from edkit import EdkitError, Refinement, read_cif, read_pets, select_frames, write_pets
from edkit.refine import core
from edkit.refine.joint import JointRefinement
from edkit.simulate.synthetic import make_dataset


@pytest.fixture(scope="module")
def halves(data_dir, tmp_path_factory):
    """12 real quartz frames, and their odd and even frames written with write_pets and read
    back as two datasets."""
    full = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    frames = select_frames(full, list(range(20, 44, 2)))
    folder = tmp_path_factory.mktemp("halves")
    parts = []
    for name, positions in (("odd", range(0, 12, 2)), ("even", range(1, 12, 2))):
        path = folder / f"{name}.cif_pets"
        write_pets(select_frames(frames, list(positions)), path)
        parts.append(read_pets(path))
    return frames, parts


def _start_as(single: Refinement, member: Refinement) -> None:
    """The member's per-frame parameters (thickness, orientations) set to the single
    refinement's values for the same frames (the thickness search's smoothness prior looks at
    neighbouring frames, so the halves start a little differently on their own)."""
    rows = np.searchsorted(single.setup.frame, member.setup.frame)
    labels = jax.tree.leaves(core.group_labels(single.state))
    leaves = [
        theirs[rows] if np.ndim(theirs) and np.shape(theirs)[0] == single.setup.n_frames else own
        for label, own, theirs in zip(labels, jax.tree.leaves(member.state),
                                      jax.tree.leaves(single.state), strict=True)
    ]  # fmt: skip
    member.state = jax.tree.unflatten(jax.tree.structure(member.state), leaves)
    member._core_state = core.init(member.state, member.problem)


@pytest.mark.slow  # 93 s on CI's 2 cores; runs in test-slow (the default run stays under 10 min)
def test_split_dataset_with_per_frame_thickness_is_the_single_refinement(data_dir, halves):
    """Per-frame thickness, orientations and scales are per frame either way, so from the same
    start the joint loss and gradient are the single dataset's: the same steps, the same
    structure."""
    frames, parts = halves
    start = read_cif(data_dir / "structures" / "quartz_displaced_03.cif")
    options = dict(g_max=1.0, n_sub=4, thickness="per-frame", structure_delay=0)
    # From this far-off start a single refinement would make the kinematical start ("auto");
    # a joint one makes none, in no member: both start from the given structure.
    single = Refinement(start, frames, kinematic_start=False, **options)
    joint = JointRefinement(start, parts, names=["odd", "even"], **options)
    assert all(member.kinematic_start is None for member in joint.members)
    assert joint.options.kinematic_start is False
    for member in joint.members:
        _start_as(single, member)
    single.run(12, progress=False)
    joint.run(12, progress=False)
    np.testing.assert_allclose(joint.crystal.fract, single.crystal.fract, rtol=0, atol=1e-9)
    np.testing.assert_allclose(joint.crystal.u_cif, single.crystal.u_cif, rtol=0, atol=1e-11)
    report, alone = joint.report(), single.report()
    assert report["r_obs"] == pytest.approx(alone["r_obs"], rel=1e-6)
    assert report["n_all"] == alone["n_all"] and report["n_frames"] == 12
    assert [d["name"] for d in report["datasets"]] == ["odd", "even"]
    assert sum(d["n_all"] for d in report["datasets"]) == alone["n_all"]
    assert joint.members[0].history.sizes["step"] == 12  # each dataset keeps its history
    history = joint.history  # the joint figures, each dataset's, and the shared structure
    assert history.sizes == {"step": 12, "dataset": 2, "atom": 2, "xyz": 3}
    np.testing.assert_allclose(history["r_obs"], single.history["r_obs"], rtol=1e-6)
    np.testing.assert_allclose(history["fract"], single.history["fract"], rtol=0, atol=1e-9)
    assert list(history["dataset"].values) == ["odd", "even"]
    np.testing.assert_allclose(
        history["r_obs_by_dataset"].sel(dataset="even"), joint.members[1].history["r_obs"]
    )
    # The full normal matrix: per-frame nuisance parameters are per frame either way, so the
    # joint s.u.'s (each dataset's nuisance eliminated on its own, the structural blocks
    # summed) are the single dataset's, and larger than the structure-only ones.
    su, su_alone = joint.uncertainties(), single.uncertainties()
    assert float(su["gof"]) == pytest.approx(float(su_alone["gof"]), rel=1e-8)
    np.testing.assert_allclose(su["fract"], su_alone["fract"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(su["u_cif"], su_alone["u_cif"], rtol=1e-6, atol=1e-12)
    held = joint.uncertainties(nuisance=False)
    free = su["fract"] > 0
    assert np.all(su["fract"][free] >= held["fract"][free]) and joint.last_uncertainties


def test_a_saved_joint_refinement_continues_bit_identically(data_dir, halves, tmp_path):
    """save after 3 steps, load, 3 more: the same structure, thickness, history and best as 6
    steps without a break."""
    start = read_cif(data_dir / "structures" / "quartz_displaced_03.cif")
    options = dict(g_max=0.8, n_sub=3, thickness="per-frame", structure_delay=0)
    joint = JointRefinement(start, halves[1], names=["odd", "even"], **options)
    joint.run(3, progress=False)
    joint.save(tmp_path / "joint")
    joint.run(3, progress=False)
    again = JointRefinement.load(tmp_path / "joint")
    assert again.names == ["odd", "even"] and again.step_count == 3
    again.run(3, progress=False)
    np.testing.assert_array_equal(again.crystal.fract, joint.crystal.fract)
    np.testing.assert_array_equal(again.crystal.u_cif, joint.crystal.u_cif)
    for mine, theirs in zip(again.members, joint.members, strict=True):
        np.testing.assert_array_equal(mine.thickness.values, theirs.thickness.values)
    np.testing.assert_array_equal(again.history["loss"], joint.history["loss"])
    assert (again.best_step, again.best_loss) == (joint.best_step, joint.best_loss)
    with pytest.raises(EdkitError, match="not a joint checkpoint"):
        JointRefinement.load(tmp_path)


@pytest.mark.slow
def test_a_synthetic_pair_with_different_thicknesses_and_scales(data_dir):
    """Two crystals (500 and 900 Å, counts 10⁵ and 3·10⁴) on different frames of the same
    rotation: one structure moved toward the truth from quartz_displaced_01, each dataset's
    thickness its own."""
    truth = read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    geometry = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    thin = make_dataset(truth, select_frames(geometry, list(range(0, 99, 10))), 500.0,
                        g_max=1.0, n_sub=4, counts=1e5, seed=1)  # fmt: skip
    thick = make_dataset(truth, select_frames(geometry, list(range(5, 99, 10))), 900.0,
                         g_max=1.0, n_sub=4, counts=3e4, seed=2)  # fmt: skip
    start = read_cif(data_dir / "structures" / "quartz_displaced_01.cif")
    joint = JointRefinement(start, [thin, thick], g_max=1.0, n_sub=4, thickness="constant")
    joint.run(60, progress=False)
    joint.use_best()
    joint.refine_structure(6)  # Gauss–Newton on both datasets' normal equations together
    error = (joint.crystal.fract - truth.fract) @ truth.real_basis
    before = (start.fract - truth.fract) @ truth.real_basis
    rms = float(np.sqrt(np.mean(np.sum(error**2, axis=1))))
    print(f"RMS position error {rms:.4f} Å (start {np.sqrt(np.mean(np.sum(before**2, 1))):.4f})")
    print("thickness", [float(m.thickness.mean()) for m in joint.members])
    # Measured (2026-12-04): 0.084 → 0.026 Å in 60 steps and the joint least squares;
    # thicknesses 494.6 and 909.6 Å.
    assert rms < 0.035 and rms < 0.4 * float(np.sqrt(np.mean(np.sum(before**2, axis=1))))
    for member, expected in zip(joint.members, (500.0, 900.0), strict=True):
        assert float(member.thickness.mean()) == pytest.approx(expected, rel=0.05)


def test_joint_needs_two_datasets(data_dir, halves):
    start = read_cif(data_dir / "structures" / "quartz.cif")
    with pytest.raises(EdkitError, match="two or more datasets"):
        JointRefinement(start, [halves[1][0]])
    with pytest.raises(EdkitError, match="two or more datasets"):
        Refinement(start, [halves[1][0]])


def test_refinement_of_a_list_is_a_joint_refinement_driven_like_one(data_dir, halves):
    """Refinement(crystal, [a, b]) is a JointRefinement; a learning rate or a switch set on it
    reaches every dataset, and its step records carry the joint figures."""
    start = read_cif(data_dir / "structures" / "quartz.cif")
    joint = Refinement(start, halves[1], g_max=0.8, n_sub=3, thickness="per-frame")
    assert isinstance(joint, JointRefinement) and joint.names[0].endswith("odd.cif_pets")
    joint.set_learning_rate("adp", 1e-5)
    joint.set_enabled("orientation", False)
    for member in joint.members:
        assert member.base_learning_rates["adp"] == 1e-5 and not member.enabled["orientation"]
    record = joint.step(1)
    assert {"loss", "r_obs", "wr_obs", "r_obs_mean_frame", "r_obs_0", "r_obs_1"} <= set(record)
    assert record["step"] == 0 and joint.step_count == 1
    assert joint.start_crystal is start and joint.mapping is joint.members[0].mapping


@pytest.mark.slow
def test_cli_refines_several_datasets(data_dir, halves, tmp_path) -> None:
    """edkit refine --data A --data B: report.json lists both datasets, the CIF is written."""
    import json

    import gemmi

    from edkit.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for name, part in zip(("odd", "even"), halves[1], strict=True):
        paths.append(folder / f"{name}.cif_pets")
        write_pets(part, paths[-1])
    out = tmp_path / "out"
    code = main(["refine", "--structure", str(data_dir / "structures" / "quartz.cif"),
                 "--data", str(paths[0]), "--data", str(paths[1]), "--g-max", "1.0",
                 "--n-sub", "3", "--steps", "3", "--lm-rounds", "1", "--quiet",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [Path(d["name"]).name for d in report["datasets"]] == ["odd.cif_pets", "even.cif_pets"]
    assert report["n_all"] == sum(d["n_all"] for d in report["datasets"])
    assert report["steps"] == 3
    block = gemmi.cif.read(str(out / "refined.cif")).sole_block()
    assert "odd.cif_pets" in block.find_value("_refine_special_details")
    assert block.find_value("_diffrn_radiation_probe") == "electron"
    assert int(block.find_value("_refine_ls_number_parameters")) > 6 + 2 * 12  # frames' too
    assert float(block.find_value("_refine_ls_goodness_of_fit_ref")) > 0
    page = (out / "report.html").read_text()
    assert "<h2>Datasets</h2>" in page and "even.cif_pets" in page and "data:image/png" in page
    for name in ("convergence.png", "thickness_1.png", "thickness_2.png", "report.html"):
        assert (out / name).is_file() and name in report["written"]


@pytest.mark.slow
def test_cli_joint_run_stopped_by_ctrl_c_resumes_to_the_same_result(
    data_dir, halves, tmp_path, monkeypatch
) -> None:
    """edkit refine --data A --data B: Ctrl-C after step 2 writes a checkpoint and exits 130;
    --resume continues through the remaining steps, the least squares and the outputs to the
    same refined structure as a run without a break."""
    import json
    import signal

    from edkit.cli import main

    paths = []
    for name, part in zip(("odd", "even"), halves[1], strict=True):
        paths.append(tmp_path / f"{name}.cif_pets")
        write_pets(part, paths[-1])
    flags = ["refine", "--structure", str(data_dir / "structures" / "quartz_displaced_03.cif"),
             "--data", str(paths[0]), "--data", str(paths[1]), "--g-max", "0.8", "--n-sub",
             "3", "--thickness", "per-frame", "--steps", "4", "--lm-rounds", "1",
             "--lm-iterations", "2", "--quiet", "--checkpoint-every", "3"]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    real_step, calls = JointRefinement._one_step, []

    def interrupted_step(self):
        record = real_step(self)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: finish the step, checkpoint, stop
        return record

    monkeypatch.setattr(JointRefinement, "_one_step", interrupted_step)
    out = tmp_path / "broken"
    assert main([*flags, "--out", str(out)]) == 130
    monkeypatch.setattr(JointRefinement, "_one_step", real_step)
    assert not (out / "refined.cif").exists() and (out / "checkpoints").is_dir()
    assert main(["refine", "--resume", str(out), "--quiet"]) == 0
    whole, resumed = (read_cif(p / "refined.cif") for p in (tmp_path / "whole", out))
    np.testing.assert_array_equal(resumed.fract, whole.fract)
    np.testing.assert_array_equal(resumed.u_cif, whole.u_cif)
    reports = [json.loads((p / "report.json").read_text()) for p in (tmp_path / "whole", out)]
    assert reports[1]["r_obs"] == reports[0]["r_obs"] and reports[1]["steps"] == 4
    assert "resumed_from" in reports[1]


@pytest.mark.slow
def test_real_quartz_split_in_two_gives_the_single_structure_within_one_su(data_dir, tmp_path):
    """Every 4th frame of real quartz (25), refined from the kinematical structure as one
    dataset and as its odd and even frames written with write_pets (each half its own
    profile network, orientations and scales): the two structures agree within one s.u. of
    the single refinement (full normal matrix)."""
    start = read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    frames = select_frames(
        read_pets(data_dir / "pets" / "quartz_experimental.cif_pets"), list(range(0, 99, 4))
    )
    parts = []
    for name, positions in (("odd", range(0, 25, 2)), ("even", range(1, 25, 2))):
        write_pets(select_frames(frames, list(positions)), tmp_path / f"{name}.cif_pets")
        parts.append(read_pets(tmp_path / f"{name}.cif_pets"))
    options = dict(g_max=1.2, n_sub=6)
    single = Refinement(start, frames, **options)
    joint = JointRefinement(start, parts, **options)
    for refinement in (single, joint):
        refinement.run(200, progress=False, until_converged=True)
        refinement.use_best()
        refinement.refine_structure(5)
    su = single.uncertainties()["fract"]
    difference = np.abs(joint.crystal.fract - single.crystal.fract)
    ratio = np.where(su > 0, difference / np.where(su > 0, su, 1.0), 0.0)
    print("max |Δx|/s.u.", float(ratio.max()), "joint R_obs", joint.report()["r_obs"],
          "single R_obs", single.report()["r_obs"])  # fmt: skip
    assert float(ratio.max()) < 1.0
