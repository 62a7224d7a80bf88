"""edkit.Refinement: the Python shell around one compiled step (style.md §4, §7; science.md §6–§7).

The problem: α-quartz (quartz.cif) on 4 frames of a generated rotation series with the real quartz
experiment's UB and mosaicity (α = −30, −15, 0, 15°, θ = 2°), thickness t(α) = 400 + 150 cos(3α) Å,
Poisson counts, g_max = 1.2 Å⁻¹, n_sub = 5: 47 reflections, 24–30 beams per frame. The start is
the truth with O1 moved by 0.037 Å. The thickness group runs at 3e-4 instead of the default 2e-2:
on this problem the default's first (sign-like) Adam step moves the profile network's output by
tens of % and the loss jumps from 0.18 to 0.5 (see the report of the helper that wrote these
tests).

Expensive objects are shared: one ``Refinement`` is built per module (``template``); tests step
shallow copies of it (``fresh``) that share its compiled step (the step closes over the
template's fixed data, which the copies share), so the step compiles once for the module.
conftest.py turns x64 on; pyproject turns warnings into errors.
"""

import copy
import dataclasses
import errno
import gc
import json
import re
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import xarray as xr
from conftest import inject_nan_loss, twenty_steps_trace_once
from flax import nnx

from edkit import EdkitError, Refinement, read_cif, read_pets, refine_in_cycles
from edkit.io.pets import select_frames
from edkit.models.thickness import fit_to_thickness
from edkit.refine import candidates, core, cycles, prepare, research
from edkit.refine import checkpoint as checkpoints
from edkit.refine.convergence import Convergence
from edkit.simulate.synthetic import make_dataset, rotation_series

G_MAX = 1.2
N_SUB = 5
GRID = (100.0, 1000.0, 100.0)
RATES = {"thickness": 3e-4}


def profile(alpha: np.ndarray) -> np.ndarray:
    """The true thickness, Å, at goniometer angle α (degrees)."""
    return 400.0 + 150.0 * np.cos(np.deg2rad(3.0 * alpha))


@pytest.fixture(scope="module")
def quartz(data_dir):
    return read_cif(data_dir / "structures" / "quartz.cif")


@pytest.fixture(scope="module")
def experiment(data_dir):
    return read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")


@pytest.fixture(scope="module")
def dataset(quartz, experiment):
    geometry = rotation_series(
        experiment, alpha_start=-30.0, alpha_step=15.0, n_frames=4, semiangle=2.0
    )
    return make_dataset(quartz, geometry, profile, n_sub=N_SUB, g_max=G_MAX, seed=1)


def _displace(crystal, label, shift):
    """``crystal`` with atom ``label`` moved by the Cartesian ``shift`` (Å), its coordinates
    rounded to 6 decimals so that a CIF holds them exactly (``Refinement.save`` keeps the start
    as a CIF, which writes at most 10 decimals: see ``test_checkpoint_keeps_the_start_exactly``).
    """
    fract = crystal.fract.copy()
    i = crystal.labels.index(label)
    fract[i] += np.linalg.solve(np.asarray(crystal.real_basis).T, shift)
    return crystal.replace(fract=np.vectorize(lambda v: float(f"{v:.6f}"))(fract))


@pytest.fixture(scope="module")
def start(quartz):
    return _displace(quartz, "O1", np.array([0.03, -0.02, 0.01]))


@pytest.fixture(scope="module")
def template(start, dataset):
    """Never stepped itself; see the module docstring."""
    # No warm-up ramp and no structure delay: these tests check Adam's own first steps (the
    # warm-up has its own test, on a copy with the defaults switched back on).
    refinement = Refinement(
        start, dataset, g_max=G_MAX, n_sub=N_SUB, thickness_grid=GRID, learning_rates=RATES,
        warmup_steps=0, structure_delay=0,
    )  # fmt: skip
    return refinement


def fresh(template: Refinement) -> Refinement:
    """An unstepped copy of ``template`` with its own mutable bookkeeping."""
    refinement = copy.copy(template)
    # A new optimiser state: the live learning rates are written into it before every step.
    refinement._core_state = core.init(jax.tree.map(lambda x: x, template.state), template.problem)
    refinement.best_state = refinement.state
    refinement.base_learning_rates = dict(template.base_learning_rates)
    refinement.enabled = dict(template.enabled)
    refinement.messages = []
    refinement._records = []
    refinement._least_squares = None
    refinement._normal_equations = (None, None)
    refinement.stop_reason = ""
    return refinement


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def positions(refinement: Refinement) -> np.ndarray:
    return np.asarray(refinement.model.positions[...])


def adp(refinement: Refinement) -> np.ndarray:
    return np.asarray(refinement.model.adp[...])


# ---------------------------------------------------------------------------------------------
# construction, steps, history
# ---------------------------------------------------------------------------------------------


def test_construction(template, dataset) -> None:
    r = template
    assert r.setup.n_frames == 4
    assert r.train_mask.sum() == r.setup.scored.sum() > 20
    assert r.n_parameters == 14  # Si1: 1 position + 4 Uij; O1: 3 + 6
    # The search refines each frame's grid minimum between grid points (thickness_search.py).
    assert np.all((r.initial_thickness >= GRID[0]) & (r.initial_thickness <= GRID[1]))
    thickness = r.thickness
    assert thickness.dims == ("frame",) and thickness.attrs["units"] == "angstrom"
    assert {"alpha", "spread", "grid_search"} <= set(thickness.coords)
    np.testing.assert_array_equal(thickness["frame"], dataset["frame"])
    # the network starts at the grid search's thickness (science.md §6)
    np.testing.assert_allclose(thickness.values, r.initial_thickness, rtol=1e-3)
    assert r.thickness_map() is None  # profile-net has no map
    np.testing.assert_array_equal(positions(r), 0.0)
    assert r.history.sizes["step"] == 0


def test_step_changes_parameters_and_records_history(template, quartz) -> None:
    r = fresh(template)
    record = r.step(2)
    assert record["step"] == 1 and np.isfinite(record["loss"])
    assert np.any(positions(r) != 0) and np.any(adp(r) != 0)
    assert r.step_count == 2
    history = r.history
    assert dict(history.sizes) == {"step": 2, "atom": 2, "xyz": 3, "frame": 4}
    np.testing.assert_array_equal(history["step"], [0, 1])
    assert list(history["atom"].values) == list(quartz.labels)
    np.testing.assert_array_equal(history["frame"], [1, 2, 3, 4])
    assert history["fract"].dims == ("step", "atom", "xyz")
    assert history["ueq"].dims == ("step", "atom")
    assert history["thickness"].dims == ("step", "frame")
    assert history["fract"].attrs["units"] == "1"
    assert history["ueq"].attrs["units"] == "angstrom**2"
    assert history["thickness"].attrs["units"] == "angstrom"
    assert history["loss"].attrs["units"] == "1"
    assert history.attrs["objective"] == "jana"
    # step 0 records the start; its fract is the starting structure's
    np.testing.assert_allclose(history["fract"].values[0], template.start_crystal.fract)
    assert np.all(np.isfinite(history["loss"])) and np.all(history["r_obs"] > 0)


def test_first_adam_step_moves_each_free_coordinate_by_the_rate_in_angstrom(template) -> None:
    """Adam's first update is −rate·g/(|g| + ε): every free coefficient moves by the rate (Å);
    coefficients fixed by symmetry (quartz Si1 x, z) do not move."""
    r = fresh(template)
    r.set_learning_rate("positions", 1e-3)
    r.step(1)
    free = r.mapping.position_mask
    np.testing.assert_allclose(np.abs(positions(r)[free]), 1e-3, rtol=1e-5)
    np.testing.assert_array_equal(positions(r)[~free], 0.0)
    assert free.sum() == 4


def _compiled_sizes() -> tuple[int, ...]:
    """Entries in the compile caches of the core's jitted pieces."""
    pieces = (
        core.intermediates,
        core.chunk_value_and_cotangent,
        core.fused_value_and_cotangent,
        core.apply_gradient,
    )
    return tuple(piece._cache_size() for piece in pieces)


def test_twenty_steps_trace_once(template) -> None:
    r = fresh(template)
    assert r.problem.fused  # a small problem runs as one program
    twenty_steps_trace_once(r)


def test_set_learning_rate_takes_effect_without_recompiling(template) -> None:
    r = fresh(template)
    r.step(1)
    compiled = _compiled_sizes()
    before_adp = adp(r)
    before_positions = positions(r)
    r.set_learning_rate("adp", 0.0)
    r.set_learning_rate("positions", 5e-3)
    r.step(2)
    np.testing.assert_array_equal(adp(r), before_adp)  # rate 0: frozen
    assert np.any(positions(r) != before_positions)
    r.set_learning_rate("adp", 1e-4)
    r.step(1)
    assert np.any(adp(r) != before_adp)
    assert _compiled_sizes() == compiled  # the rates live in the optimiser state
    with pytest.raises(EdkitError, match="bonds"):
        r.set_learning_rate("bonds", 1e-3)
    with pytest.raises(EdkitError, match="positions"):
        r.set_learning_rate("positions", -1.0)


def test_set_enabled_freezes_a_group(template) -> None:
    r = fresh(template)
    r.step(1)
    compiled = _compiled_sizes()
    r._core_state = core.init(template.state, template.problem)
    r.set_enabled("positions", False)
    assert r.n_parameters == 10
    r.step(3)
    np.testing.assert_array_equal(positions(r), 0.0)
    assert np.any(adp(r) != 0)
    assert _compiled_sizes() == compiled
    with pytest.raises(EdkitError, match="unknown parameter group 'bonds'"):
        r.set_enabled("bonds", True)


def test_loss_decreases_from_a_displaced_start(template) -> None:
    r = fresh(template)
    r.step(10)
    loss = r.history["loss"].values
    assert len(loss) == 10 and not r.messages  # no divergence
    assert loss[-1] < 0.8 * loss[0]
    assert r.history["wr_all"].values[-1] < r.history["wr_all"].values[0]
    assert r.best_step == 9 and r.best_loss == loss[-1]


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(template, tmp_path_factory):
    """A refinement saved after 3 steps."""
    r = fresh(template)
    r.step(3)
    return r.save(tmp_path_factory.mktemp("checkpoint") / "run")


def test_resume_is_bit_identical(template, checkpoint) -> None:
    straight = fresh(template)
    straight.step(6)
    resumed = Refinement.load(checkpoint)
    assert resumed.step_count == 3 and resumed.history.sizes["step"] == 3
    resumed.step(3)
    assert resumed.step_count == straight.step_count == 6
    assert_trees_equal(resumed.state, straight.state)
    assert_trees_equal(resumed.opt_state, straight.opt_state)
    assert_trees_equal(resumed.best_state, straight.best_state)
    assert resumed.best_step == straight.best_step and resumed.best_loss == straight.best_loss
    assert resumed.base_learning_rates == straight.base_learning_rates
    for name in ("loss", "r_obs", "wr_all", "fract", "ueq", "thickness"):
        np.testing.assert_array_equal(resumed.history[name], straight.history[name])
    np.testing.assert_array_equal(resumed.history["step"], np.arange(6))


def test_checkpoint_keeps_the_start_exactly(template, tmp_path) -> None:
    r = fresh(template)
    start = r.start_crystal
    r.start_crystal = start.replace(fract=start.fract + np.pi * 1e-11)  # not CIF-exact
    loaded = Refinement.load(r.save(tmp_path / "run"))
    np.testing.assert_array_equal(loaded.start_crystal.fract, r.start_crystal.fract)


def _copy_checkpoint(checkpoint, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint, folder)
    return folder


def test_wrong_checkpoint_version(checkpoint, tmp_path) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    (folder / checkpoints.CHECKSUMS).unlink()  # else the changed file is named first
    with pytest.raises(EdkitError, match="version 99") as error:
        Refinement.load(folder)
    assert str(folder / "config.json") in str(error.value)


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(EdkitError, match="not an edkit checkpoint") as error:
        Refinement.load(tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(error.value)


@pytest.mark.parametrize("name", ["config.json", "state.npz", "data.nc"])
def test_checkpoint_changed_after_it_was_written(checkpoint, tmp_path, name) -> None:
    """One byte changed in any file: the checksums written last name the file."""
    folder = _copy_checkpoint(checkpoint, tmp_path)
    raw = bytearray((folder / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(raw))
    with pytest.raises(EdkitError, match="SHA-256") as error:
        Refinement.load(folder)
    assert str(folder / name) in str(error.value) and "corrupted checkpoint" in str(error.value)
    (folder / checkpoints.CHECKSUMS).write_text("{not json")
    with pytest.raises(EdkitError, match=r"checksums\.json: corrupted checkpoint"):
        Refinement.load(folder)


def test_checkpoint_with_a_wrong_shape(checkpoint, tmp_path) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path)
    (folder / checkpoints.CHECKSUMS).unlink()  # as written before checksums: the reader's checks
    with np.load(folder / "state.npz") as stored:
        arrays = dict(stored)
    arrays["state_0"] = np.zeros(7)
    np.savez(folder / "state.npz", **arrays)
    with pytest.raises(EdkitError, match="corrupted checkpoint") as error:
        Refinement.load(folder)
    assert str(folder / "state.npz") in str(error.value)


def test_checkpoint_of_another_dataset(checkpoint, tmp_path) -> None:
    """A coherent-looking folder (checksums remade) whose data.nc holds other data than the
    state was saved for, as when files of two runs are mixed: refused, naming both."""
    folder = _copy_checkpoint(checkpoint, tmp_path)
    data = xr.load_dataset(folder / "data.nc", engine="h5netcdf")
    data["I_obs"].values[0] *= 2.0
    data.to_netcdf(folder / "data.nc", engine="h5netcdf")
    sums = json.loads((folder / checkpoints.CHECKSUMS).read_text())
    sums["data.nc"] = checkpoints._sha256(folder / "data.nc")
    (folder / checkpoints.CHECKSUMS).write_text(json.dumps(sums))
    with pytest.raises(EdkitError, match="a checkpoint of another dataset") as error:
        Refinement.load(folder)
    n_frames, n_refl = data.sizes["frame"], data.sizes["refl"]
    assert str(folder / "data.nc") in str(error.value)
    assert str(error.value).count(f"{n_frames} frames, {n_refl} reflections") == 2


def _load_error(folder) -> Exception:
    """What ``Refinement.load(folder)`` raises. np.load leaks the file handle of an .npz it fails
    to open (numpy 2 pops it from its ExitStack before reading the zip directory): drop the
    traceback and collect it here, so no ResourceWarning surfaces in a later test."""
    caught: Exception | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            Refinement.load(folder)
        except Exception as error:
            error.__traceback__ = None
            caught = error
        gc.collect()
    assert caught is not None, "a corrupted checkpoint was loaded"
    return caught


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_checkpoint(checkpoint, tmp_path, keep) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path)
    (folder / checkpoints.CHECKSUMS).unlink()  # the reader's own checks (the sum's: above)
    raw = (folder / "state.npz").read_bytes()
    (folder / "state.npz").write_bytes(raw[: int(keep * len(raw))])
    error = _load_error(folder)
    assert isinstance(error, EdkitError), repr(error)
    assert "corrupted checkpoint" in str(error) and str(folder / "state.npz") in str(error)


# ---------------------------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------------------------


def _check_recovered(r: Refinement, template: Refinement, halved: float) -> None:
    assert_trees_equal(r.state, template.state)  # back at the best (the starting) state
    assert_trees_equal(r.opt_state, r.problem.optimizer.init(r.state))  # optimiser restarted
    assert r.base_learning_rates["adp"] == 0.5 * template.base_learning_rates["adp"]
    assert r.base_learning_rates["positions"] == halved
    messages = r.history.attrs["messages"]
    assert "step 1: the refinement diverged" in messages
    assert "returned to the best state" in messages
    assert r.history.sizes["step"] == 1 and r.step_count == 2
    record = r.step(1)  # continues from the best state: the same loss as step 0
    assert record["step"] == 2 and record["loss"] == r.history["loss"].values[0]


def test_divergence_returns_to_the_best_state(template) -> None:
    r = fresh(template)
    r.set_learning_rate("positions", 10.0)  # 10 Å steps
    with pytest.warns(RuntimeWarning, match="diverged") as caught:
        record = r.step(2)
    assert len(caught) == 1
    assert record["diverged"] == 1.0 and record["loss"] > 3 * r.best_loss
    _check_recovered(r, template, halved=5.0)


def test_non_finite_loss_returns_to_the_best_state(template, monkeypatch) -> None:
    r = fresh(template)
    inject_nan_loss(r, monkeypatch)
    with pytest.warns(RuntimeWarning, match="loss nan"):
        record = r.step(2)
    assert record["diverged"] == 1.0
    _check_recovered(r, template, halved=0.5 * template.base_learning_rates["positions"])


def test_a_nan_parameter_mid_run_returns_to_the_best_state(template) -> None:
    """A real fault, not a mocked loss: after two steps the positions become NaN (a bit flip, a
    bad callback). The next step is refused, the best state comes back, the history's messages
    say so, and the run goes on with finite losses."""
    r = fresh(template)
    r.step(2)
    best = r.best_state
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(r.state)
    keystr = jax.tree_util.keystr
    poisoned = [
        np.full_like(np.asarray(leaf), np.nan) if "positions" in keystr(path) else leaf
        for path, leaf in paths_and_leaves
    ]
    assert sum(np.isnan(np.asarray(x)).any() for x in poisoned) == 1
    r.state = jax.tree_util.tree_unflatten(treedef, poisoned)
    # The loss may stay finite (NaN intensities are masked out of it); the gradient is not.
    what = r"step 2: the refinement (diverged|had a non-finite gradient) \(loss "
    with pytest.warns(RuntimeWarning, match=what):
        record = r.step(1)
    assert record["diverged"] == 1.0
    assert_trees_equal(r.state, best)
    assert re.search(what + r".*returned to the best state", r.history.attrs["messages"])
    assert np.isfinite(r.step(1)["loss"])


def test_a_nan_observation_mid_run_stops_at_the_best_state(template) -> None:
    """The refinement's own copy of I_obs corrupted after two steps (the dataset it was given
    stays clean): the step is refused, the best state comes back, the message is in the history,
    and an EdkitError names the reflection instead of NaN steps going on."""
    from edkit.refine.problem import HostChunks

    r = fresh(template)
    r.step(2)
    best, problem = r.best_state, r.problem
    first = problem.chunks[0]
    i_obs = np.array(first.i_obs)
    i_obs[3] = np.nan
    bad = first._replace(i_obs=i_obs)
    chunks = (bad, *problem.chunks[1:])
    host = None if problem.host is None else HostChunks((bad, *problem.host.chunks[1:]))
    r.problem = problem.replace(chunks=chunks, host=host)
    index = int(np.asarray(first.refl_index)[3])
    hkl = " ".join(str(int(r.dataset[c].values[index])) for c in ("h", "k", "l"))
    with pytest.warns(RuntimeWarning, match="step 2: the refinement diverged \\(loss nan"):
        with pytest.raises(EdkitError, match="copy of I_obs became non-finite") as error:
            r.step(1)
    assert f"reflection {index}, hkl {hkl}" in str(error.value)
    assert_trees_equal(r.state, best)
    assert "returned to the best state" in r.history.attrs["messages"]


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_cell_mismatch_names_both_files(quartz, experiment) -> None:
    a, b, c, alpha, beta, gamma = quartz.cell
    wrong = quartz.replace(cell=(a * 1.02, b * 1.02, c, alpha, beta, gamma))
    with pytest.raises(EdkitError, match="does not match the dataset") as error:
        Refinement(wrong, select_frames(experiment, slice(0, 2)), g_max=G_MAX, n_sub=N_SUB)
    message = str(error.value)
    assert "quartz.cif" in message and "quartz_experimental.cif_pets" in message
    assert "2.0 %" in message


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"thickness": "slab"}, "thickness = 'slab': expected one of"),
        ({"refine": ("positions", "bonds")}, r"unknown group\(s\) \['bonds'\]"),
        ({"refine": ("absorption",)}, "absorption is None"),
        ({"objective": "r1"}, "objective = 'r1'"),
        ({"learning_rates": {"bonds": 1.0}}, "learning_rates: unknown group"),
        ({"thickness_spread": 0.0}, r"thickness_spread = 0.0: expected a fraction 0 < s < 1"),
    ],
)
def test_bad_options(quartz, dataset, options, match) -> None:
    with pytest.raises(EdkitError, match=match):
        Refinement(quartz, dataset, g_max=G_MAX, n_sub=N_SUB, **options)


def test_no_scored_reflection(quartz, dataset) -> None:
    # every reflection moved out of the beam lists (|g| > g_max): none can be scored
    far = dataset.assign(l=dataset["l"] + 40)
    with pytest.raises(EdkitError, match="is scored"):
        Refinement(quartz, far, g_max=G_MAX, n_sub=N_SUB)


# ---------------------------------------------------------------------------------------------
# uncertainties, Levenberg–Marquardt, CIF
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refined(template):
    r = fresh(template)
    r.step(4)
    return r


def test_uncertainties(refined) -> None:
    su = refined.uncertainties()
    fract, u_cif = su["fract"], su["u_cif"]
    assert fract.shape == (2, 3) and u_cif.shape == (2, 3, 3)
    assert np.isfinite(su["gof"]) and su["gof"] > 0
    # Si1 at (0, y, 5/6) on the 2-fold axis: only y is free
    np.testing.assert_allclose(fract[0, [0, 2]], 0.0, atol=1e-15)
    assert fract[0, 1] > 1e-5
    assert np.all(fract[1] > 1e-5)  # O1: general position
    assert np.all(fract < 0.05)
    # U^cif: zero exactly where no coefficient reaches the component
    index = ([0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2])
    reached = np.any(refined.mapping.adp_basis != 0, axis=2)  # (n, 6): component moves
    for atom in range(2):
        values = u_cif[atom][index]
        assert np.all(values[reached[atom]] > 1e-6)
        np.testing.assert_array_equal(values[~reached[atom]], 0.0)
    np.testing.assert_array_equal(u_cif, np.swapaxes(u_cif, 1, 2))


def test_refine_structure_does_not_increase_wr(refined) -> None:
    before = refined.report()
    step = refined.step_count
    wr = refined.refine_structure(2)
    assert 1 <= len(wr) <= 2
    assert np.all(np.diff(wr) <= 0)
    after = refined.report()
    assert after["wr_all"] <= before["wr_all"]
    assert "Levenberg–Marquardt" in refined.messages[-1]
    assert refined.history["step"].values[-1] == step
    assert refined.history["loss"].values[-1] == wr[-1]


def test_levenberg_marquardt_says_why_it_stopped_and_shares_its_normal_matrix(
    refined, monkeypatch
) -> None:
    """A round stops on max shift/s.u. (a huge tolerance: after its first iteration) and says
    so; s.u.'s at an unchanged state reuse the normal matrix instead of accumulating another."""
    least_squares = refined._structure_least_squares()
    calls = []
    accumulate = least_squares.normal_equations
    monkeypatch.setattr(
        least_squares, "normal_equations", lambda p: calls.append(1) or accumulate(p)
    )
    wr = refined.refine_structure(5, shift_tolerance=1e9)
    assert len(wr) == 1 and len(calls) == 1  # none after the last iteration
    assert "max shift/s.u." in refined.stop_reason and "< 1e+09" in refined.stop_reason
    assert "stopped: max shift/s.u." in refined.messages[-1]
    # the structure-only s.u.'s use the least squares' matrix (the full one has its own cache)
    first = refined.uncertainties(nuisance=False)
    second = refined.uncertainties(nuisance=False)  # same state: the matrix is reused
    assert len(calls) == 2
    np.testing.assert_array_equal(first["fract"], second["fract"])


def test_run_until_converged_stops_and_says_why(template) -> None:
    r = fresh(template)
    rule = Convergence(window=2, tolerance=0.5, min_steps=3)  # a 50 % fall per 2 steps: soon
    r.run(30, progress=False, until_converged=rule)
    assert 3 <= r.step_count < 30
    assert "converged: the best loss fell" in r.stop_reason and r.stop_reason in r.messages
    limited = fresh(template)
    limited.run(2, progress=False, until_converged=True)
    assert limited.step_count == 2 and "step limit" in limited.stop_reason


def test_fit_runs_the_default_recipe(template) -> None:
    """Adam (here cut at 3 steps), the best state, the thickness search again (it stands), one
    least-squares round; each stage says how it ended."""
    r = fresh(template)
    r.fit(max_steps=3, lm_iterations=1, progress=False)
    assert r.step_count == 4  # 3 Adam steps + 1 LM record
    assert "step limit" in r.messages[-3] and "Levenberg–Marquardt" in r.messages[-1]
    assert r.messages[-2].startswith("thickness search from the refined structure (step 3)")
    assert r.messages[-2].endswith("the thickness stands")  # searched once: no more steps
    assert r.history["loss"].values[-1] <= r.history["loss"].values[:3].min()


def test_warm_up_holds_the_structure_then_ramps_it(template) -> None:
    """structure_delay = 2: the positions stay put for two steps while the thickness moves;
    warmup_steps = 4: the positions' first step is a quarter of the rate (Adam's normalised
    update is at most about 1 per coefficient)."""
    r = fresh(template)
    r.options = dataclasses.replace(r.options, warmup_steps=4, structure_delay=2)
    rate = r.base_learning_rates["positions"]
    thickness_before = r.thickness.values
    r.step(2)
    np.testing.assert_array_equal(positions(r), 0.0)
    assert np.any(r.thickness.values != thickness_before)
    r.step(1)
    moved = np.abs(positions(r)[r.mapping.position_mask])
    assert np.all(moved > 0) and np.all(moved <= 0.25 * rate * 1.05)


def test_adam_starts_again_after_least_squares(template, tmp_path) -> None:
    """After a Levenberg–Marquardt round Adam has new moments and ramps its rates again: the old
    moments pointed where LM had moved the parameters from (in test_recovers_a_synthetic_truth
    the first steps from them diverged, the loss ×3.4). A checkpoint keeps where the ramp began."""
    r = fresh(template)
    r.options = dataclasses.replace(r.options, warmup_steps=4)
    r.step(3)
    moments_before = leaves(r.opt_state)
    r.refine_structure(1)
    assert r.warmup_step == r.step_count == 4
    new = leaves(core.init(r.state, r.problem).opt_state)
    for x, y in zip(leaves(r.opt_state), new, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(np.any(x != y) for x, y in zip(moments_before, new, strict=True))
    rate = r.base_learning_rates["thickness"]
    assert r._rates()["thickness"] == pytest.approx(rate / 4)
    r.step(1)
    assert r.step_count == 5 and not any("diverged" in m for m in r.messages)
    assert Refinement.load(r.save(tmp_path / "lm")).warmup_step == 4


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one(
    template, tmp_path, monkeypatch
) -> None:
    """The disk fills up while the next checkpoint of a series is written: an EdkitError names
    the file, the previous checkpoint stands and no partial folder is left."""
    r = fresh(template)
    r.step(1)
    first = checkpoints.write_series(r, tmp_path, {"step": 1})
    r.step(1)

    def full_disk(dataset, path, *args, **kwargs) -> None:
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", full_disk)
    with pytest.raises(EdkitError, match=r"data\.nc: could not be written \(No space left"):
        checkpoints.write_series(r, tmp_path, {"step": 2})
    assert checkpoints.series(tmp_path) == [first]
    assert [p.name for p in (tmp_path / checkpoints.SERIES).iterdir()] == [first.name]
    assert json.loads((first / checkpoints.RUN_FILE).read_text()) == {"step": 1}


def test_rejected_levenberg_marquardt_trials_leave_the_state_alone(refined, monkeypatch) -> None:
    """Force every trial shift to look worse: the state must not move."""
    least_squares = refined._structure_least_squares()
    cost, calls = least_squares.cost, []

    def trials_look_worse(params):
        calls.append(1)
        return 10.0 * cost(params) + 1.0

    monkeypatch.setattr(least_squares, "cost", trials_look_worse)
    before = leaves(refined.state)
    wr = refined.refine_structure(1)
    assert len(calls) == 8  # eight rejected trials (damping × 10 each)
    assert len(wr) == 1
    for x, y in zip(leaves(refined.state), before, strict=True):
        np.testing.assert_array_equal(x, y)


def test_write_cif(refined, tmp_path) -> None:
    path = tmp_path / "refined.cif"
    refined.write_cif(path)
    text = path.read_text()
    for tag in ("_refine_ls_R_factor_gt", "_refine_ls_wR_factor_ref", "_refine_ls_number_reflns"):
        assert tag in text
    r_obs = float(text.split("_refine_ls_R_factor_gt")[1].split()[0])
    assert 0 < r_obs < refined.history["r_obs"].values[0]
    atom_lines = [line for line in text.splitlines() if line.split()[:1] in (["Si1"], ["O1"])]
    assert atom_lines and all("(" in line for line in atom_lines)
    crystal, su = refined.crystal, refined.uncertainties()
    back = read_cif(path)
    assert back.labels == crystal.labels and back.space_group == crystal.space_group
    # values are rounded to their s.u. (crystallographic notation): within half of it; the
    # coordinates fixed by symmetry (no s.u.) are written in full
    np.testing.assert_array_less(np.abs(back.fract - crystal.fract), 0.5 * su["fract"] + 1e-10)
    np.testing.assert_allclose(back.fract, crystal.fract, atol=5e-4)
    fixed = su["fract"] < 1e-12
    np.testing.assert_allclose(back.fract[fixed], crystal.fract[fixed], atol=1e-9)


def test_simulated(refined, dataset) -> None:
    simulated = refined.simulated()
    for name in ("I_obs", "sigma", "h", "k", "l", "frame_id"):
        np.testing.assert_array_equal(simulated[name], dataset[name])


def test_one_forward_pass_per_state(template, monkeypatch) -> None:
    """The report, the simulated frames and I_calc of one state cost one forward pass; the start
    (from the spread choice) and a run's best state (from the step that measured it) cost none,
    and what they keep equals a fresh pass."""
    real = core.predict
    calls: list[int] = []

    def counted(params, problem):
        calls.append(1)
        return real(params, problem)

    monkeypatch.setattr(core, "predict", counted)
    r = fresh(template)
    r.remember_i_calc(r.state, template.predict())  # fresh() made new (equal) parameters
    assert calls == []  # the template's start: kept from the spread choice
    np.testing.assert_allclose(r.predict(), real(r.state, r.problem), rtol=1e-10)
    calls.clear()
    r._i_calc_kept = None  # so that the best state's I_calc can only come from its step
    r.step(3)
    r.use_best()
    kept = r.predict()
    r.report(), r.simulated()
    assert calls == []
    np.testing.assert_allclose(kept, real(r.state, r.problem), rtol=1e-10)
    r.step(1)  # a new state: one pass, then none
    r.predict(), r.report(), r.simulated()
    assert calls == [1]


def test_uncertainties_follow_set_enabled(refined) -> None:
    """Fixing positions can only shrink the ADP s.u.'s (a conditional variance is at most the
    marginal one, and the GoF's degrees of freedom grow), and zeroes the position s.u.'s."""
    full = refined.uncertainties()
    try:
        refined.set_enabled("positions", False)
        adp_only = refined.uncertainties()
    finally:
        refined.set_enabled("positions", True)
    np.testing.assert_array_equal(adp_only["fract"], 0.0)
    assert np.all(adp_only["u_cif"] <= full["u_cif"] + 1e-15)
    assert np.any(adp_only["u_cif"] > 0)


# ---------------------------------------------------------------------------------------------
# recovery of a known truth (slow)
# ---------------------------------------------------------------------------------------------


def _rms_distance(crystal, truth) -> float:
    """RMS over the asymmetric unit of the Cartesian distance (Å, minimum image) to the truth."""
    d = crystal.fract - truth.fract
    d -= np.round(d)
    return float(np.sqrt(np.mean(np.sum((d @ np.asarray(truth.real_basis)) ** 2, axis=1))))


@pytest.fixture(scope="module")
def recovery_problem(quartz, experiment):
    """(dataset, start) of the slow tests: 8 frames (α = −40…30°, θ = 2°) made from quartz.cif
    with t(α) = ``profile``; the start has O1 moved by 0.049 Å and every U ×1.3."""
    geometry = rotation_series(
        experiment, alpha_start=-40.0, alpha_step=10.0, n_frames=8, semiangle=2.0
    )
    dataset = make_dataset(quartz, geometry, profile, n_sub=N_SUB, g_max=G_MAX, seed=2)
    start = _displace(quartz, "O1", np.array([0.03, -0.03, 0.025]))
    return dataset, start.replace(u_cif=1.3 * quartz.u_cif)


@pytest.mark.slow
def test_recovers_a_synthetic_truth(quartz, recovery_problem) -> None:
    """Quartz on 8 frames (α = −40…30°, θ = 2°, g_max = 1.2 Å⁻¹, n_sub = 5; 120 reflections),
    t(α) = 400 + 150 cos(3α) Å (325–550 Å), 10⁶ counts for the brightest reflection. Start: the
    truth with O1 moved by 0.049 Å (0.035 Å RMS over Si1, O1) and every U ×1.3. Two rounds of
    40 Adam steps + Levenberg–Marquardt, no divergence (Adam starts again after LM with new
    moments; from the old ones the loss rose ×3.4). Measured 2026-12-03 (2-core CPU, 52 s):
    0.0015 Å RMS, thickness 0.34 % RMS (search 2.5 %), max |ΔU| 7.4e-4 Å² (start 6e-3). The
    thickness bound is 1.5 % and half the search's error (an earlier start ended at 0.97 %)."""
    dataset, start = recovery_problem
    truth_thickness = dataset.attrs["synthetic_thickness"]
    assert 0.03 < _rms_distance(start, quartz) < 0.04
    r = Refinement(
        start,
        dataset,
        g_max=G_MAX,
        n_sub=N_SUB,
        thickness_grid=(100.0, 1000.0, 25.0),
        learning_rates={"thickness": 1e-3},
        # The generating model: every beam to |S| 0.015 exact, exact orientations (refining 24
        # orientation angles on 8 noise-free-geometry frames only absorbs signal).
        sg_max=0.015,
        sg_weak=None,
        refine=("positions", "adp", "thickness"),
    )

    def thickness_error(values) -> float:
        return float(np.sqrt(np.mean(((values - truth_thickness) / truth_thickness) ** 2)))

    grid_error = thickness_error(r.initial_thickness)
    for _ in range(2):
        r.run(40, progress=False)
        r.use_best()
        r.refine_structure(5)
    assert not any("diverged" in m for m in r.messages)
    position_error = _rms_distance(r.crystal, quartz)
    final_error = thickness_error(r.thickness.values)
    adp_error = np.abs(r.crystal.u_cif - quartz.u_cif).max()
    print(
        f"recovery: positions {position_error:.5f} Å RMS, thickness {100 * final_error:.2f} % "
        f"RMS (grid search {100 * grid_error:.2f} %), max |ΔU| {adp_error:.2e} Å²"
    )
    assert position_error < 0.005
    assert final_error < 0.015 and final_error < grid_error / 2
    assert adp_error < 0.3 * np.abs(start.u_cif - quartz.u_cif).max()


@pytest.mark.slow
def test_single_precision_refines_to_the_same_structure(quartz, recovery_problem) -> None:
    """complex64 Bloch solves (``precision="single"``; geometry and structure factors stay
    float64), and the default's complex64 steps with complex128 least squares
    (``precision="auto"``), leave the refined result unchanged within its uncertainties: the
    problem of ``test_recovers_a_synthetic_truth`` with the default beams (exact to 0.005 Å⁻¹,
    Bethe to 0.03 Å⁻¹), refined from the same start by 40 Adam steps + Levenberg–Marquardt in
    each precision. Positions must agree to a tenth of their s.u., ADPs to a tenth of theirs,
    the R-factors to 0.01 % absolute, the thicknesses to 0.1 %."""
    dataset, start = recovery_problem
    results = {}
    for precision in ("double", "single", "auto"):
        r = Refinement(
            start,
            dataset,
            g_max=G_MAX,
            n_sub=N_SUB,
            thickness_grid=(100.0, 1000.0, 25.0),
            learning_rates={"thickness": 1e-3},
            refine=("positions", "adp", "thickness"),
            precision=precision,
        )
        r.run(40, progress=False)
        r.use_best()
        r.refine_structure(5)
        results[precision] = (r.crystal, r.uncertainties(), r.report(), r.thickness.values)
    c64, su, rep64, t64 = results["double"]
    basis = np.asarray(quartz.real_basis)
    su_cart = np.abs(su["fract"] @ basis)  # Å; zero on coordinates fixed by symmetry
    free = su_cart > 0
    u_free = su["u_cif"] > 0
    for precision in ("single", "auto"):
        c32, su32, rep32, t32 = results[precision]
        shift = np.abs((c32.fract - c64.fract) @ basis)  # Å, Cartesian
        su_ratio = su32["fract"][su["fract"] > 0] / su["fract"][su["fract"] > 0]
        print(
            f"{precision} vs double: max position shift {shift.max():.2e} Å (min s.u. "
            f"{su_cart[free].min():.2e} Å), max |ΔU| {np.abs(c32.u_cif - c64.u_cif).max():.2e} "
            f"Å², R_obs {100 * rep64['r_obs']:.4f} vs {100 * rep32['r_obs']:.4f} %, s.u.'s "
            f"within {np.abs(su_ratio - 1).max():.1e}"
        )
        assert np.all(shift[free] < 0.1 * su_cart[free])
        assert np.all(shift[~free] < 1e-6)
        assert np.all(np.abs(c32.u_cif - c64.u_cif)[u_free] < 0.1 * su["u_cif"][u_free])
        for key in ("r_obs", "wr_obs", "r_all", "r_obs_mean_frame"):
            assert abs(rep32[key] - rep64[key]) < 1e-4, key
        np.testing.assert_allclose(t32, t64, rtol=1e-3)
        np.testing.assert_allclose(su32["fract"], su["fract"], rtol=0.01)


@pytest.mark.slow  # ≥ 12 s; runs in CI's test-slow
def test_refine_in_cycles_searches_again_and_keeps_the_best(start, dataset, monkeypatch) -> None:
    """Two cycles (min_gain 0: the second always runs): the second a new refinement (and
    thickness search) from the structure the first refined; the refinement returned is the
    cycle with the lowest mean per-frame R_obs, and its messages say what each cycle did."""
    made: list[Refinement] = []

    class Recorded(Refinement):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cycles, "Refinement", Recorded)
    options = dict(
        g_max=G_MAX, n_sub=N_SUB, thickness_grid=GRID, learning_rates=RATES,
        warmup_steps=0, structure_delay=0,
    )  # fmt: skip
    r = refine_in_cycles(
        start, dataset, cycles=2, min_gain=0.0, max_steps=3, lm_iterations=0, progress=False,
        **options,
    )  # fmt: skip
    assert len(made) == 2 and r in made
    assert made[1].start_crystal is not start
    np.testing.assert_array_equal(made[1].start_crystal.fract, made[0].crystal.fract)
    assert made[1].thickness_search_result is not None  # searched again
    assert r.cycle_reports is not None and len(r.cycle_reports) == 2
    finals = [c["r_obs_mean_frame"] for c in r.cycle_reports]
    assert r.report()["r_obs_mean_frame"] == pytest.approx(min(finals), rel=1e-9)
    assert r.messages[0].startswith("cycle 1: mean per-frame R_obs")
    assert r.messages[1].startswith("cycle 2:") and "2 cycle(s) done" in r.messages[2]


@pytest.mark.parametrize("bad", [dict(cycles=0), dict(cycles=1.5), dict(min_gain=1.0)])
def test_refine_in_cycles_rejects_bad_arguments(start, dataset, bad) -> None:
    with pytest.raises(EdkitError, match=next(iter(bad))):
        refine_in_cycles(start, dataset, **bad)


def test_start_spread_is_the_better_fitting_of_two(template, start, dataset) -> None:
    """Without ``thickness_spread`` the profile network starts at whichever of 1 % and 5 % gives
    the lower training loss; the data here have one thickness per frame, so 1 % fits better."""
    losses = template.start_spread_losses
    assert set(losses) == {0.01, 0.05}
    assert losses[0.01] < losses[0.05]
    relative = template.thickness["spread"].values / template.thickness.values
    np.testing.assert_allclose(relative, 0.01, rtol=0.02)
    assert any(m.startswith("start thickness spread σ/μ = 1 %") for m in template.messages)
    given = Refinement(
        start, dataset, g_max=G_MAX, n_sub=N_SUB, thickness_grid=GRID, thickness_spread=0.03
    )
    assert given.start_spread_losses == {}
    relative = given.thickness["spread"].values / given.thickness.values
    np.testing.assert_allclose(relative, 0.03, rtol=0.02)


def test_start_spreads_of_a_streamed_problem_share_one_solve(start, dataset) -> None:
    """A streamed problem (chunks of 2 frames) scores both start spreads from one solve of each
    orientation (``candidates.candidate_losses``): the same losses and I_calc as one forward pass
    per spread, and the chosen one's I_calc is the start's."""
    streamed = Refinement(
        start, dataset, g_max=G_MAX, n_sub=N_SUB, thickness_grid=GRID, chunk_frames=2
    )
    assert not streamed.problem.fused and len(streamed.problem.chunks) == 2
    model = nnx.clone(streamed.model)  # the refinement's own state must not change
    i_calcs = {}
    for spread, loss in streamed.start_spread_losses.items():
        model.thickness.set_relative_spread(spread)
        alone, i_calcs[spread] = prepare.loss_and_i_calc(
            nnx.state(model, nnx.Param), streamed.problem
        )
        np.testing.assert_allclose(loss, alone, rtol=1e-12)
    chosen = min(streamed.start_spread_losses, key=streamed.start_spread_losses.get)
    kept = streamed.predict()
    np.testing.assert_allclose(kept, i_calcs[chosen], rtol=1e-12)
    np.testing.assert_allclose(kept, core.predict(streamed.state, streamed.problem), rtol=1e-12)
    with pytest.raises(ValueError, match="beyond the thickness model"):
        moved = nnx.clone(streamed.model)
        moved.orientation[...] = moved.orientation[...] + 1e-3
        candidates.candidate_losses(streamed.problem, [streamed.state, nnx.state(moved, nnx.Param)])


def test_no_search_after_a_restart_that_found_nothing_better(template) -> None:
    """After a new start whose steps never beat the best state from before it, the next
    search is not made (it would start from the same best structure again)."""
    r = fresh(template)
    r.restart_step, r.best_step, r.step_count = 5, 3, 9
    assert not r.search_thickness_again(progress=False)
    assert r.messages[-1] == (
        "thickness search from the refined structure (step 9): not made; the new start at "
        "step 5 found no better state (the best is still step 3's)"
    )
    r.best_step = 6  # the new start paid: the search is made (and finds the thickness right)
    assert not r.search_thickness_again(progress=False)
    assert r.messages[-1].endswith("the thickness stands")


def test_thickness_search_again_restarts_only_a_wrong_thickness(
    template, tmp_path, monkeypatch
) -> None:
    """The search from the refined structure leaves a right thickness alone, and gives a
    thickness model that is 40 % off a new start at the searched thickness (the structure and
    every other parameter kept) when the searched thickness fits better by ``MIN_GAIN``."""
    r = fresh(template)
    assert not r.search_thickness_again(progress=False)
    assert r.messages[-1].endswith("0 of 4 frame(s) more than 10 % from the refined thickness; "
                                   "the thickness stands")  # fmt: skip
    model = r.model
    fit_to_thickness(model.thickness, r.features, 1.4 * r.initial_thickness)
    r.state = nnx.state(model, nnx.Param)
    np.testing.assert_allclose(r.thickness.values, 1.4 * r.initial_thickness, rtol=0.01)
    with monkeypatch.context() as patch:  # a gain it cannot reach: the thickness stands
        patch.setattr(research, "MIN_GAIN", 0.99)
        assert not r.search_thickness_again(progress=False)
    assert "4 of 4 frame(s)" in r.messages[-1] and "fits no better" in r.messages[-1]
    np.testing.assert_allclose(r.thickness.values, 1.4 * r.initial_thickness, rtol=0.01)
    before = r.state
    r.best_state = r.state  # as after use_best(): the same object
    best = leaves(r.best_state)
    assert r.search_thickness_again(progress=False)
    for a, b in zip(leaves(r.best_state), best, strict=True):
        np.testing.assert_array_equal(a, b)  # the best state is untouched by the restart
    assert "4 of 4 frame(s)" in r.messages[-1] and "fits better" in r.messages[-1]
    assert "starts again" in r.messages[-1]
    np.testing.assert_allclose(r.thickness.values, r.initial_thickness, rtol=0.02)
    np.testing.assert_array_equal(r.model.positions[...], nnx.merge(r.graphdef, before).positions)
    np.testing.assert_allclose(r.initial_thickness, template.initial_thickness, rtol=0.1)
    np.testing.assert_array_equal(r.model.orientation[...], 0.0)
    assert r.restart_step == r.step_count == 0 and 0 < r.restart_loss < np.inf
    r.step(2)  # the warm-up counts from the restart; the checkpoint keeps where it was
    loaded = Refinement.load(r.save(tmp_path / "restarted"))
    assert (loaded.restart_step, loaded.restart_loss) == (r.restart_step, r.restart_loss)
    assert_trees_equal(loaded.state, r.state)
