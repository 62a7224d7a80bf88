"""The ``edkit`` command line (edkit.cli.main): ``edkit refine`` on the real quartz data.

A tiny run: every 33rd frame of quartz_experimental.cif_pets (3 frames), g_max = 1.0 Å⁻¹,
n_sub = 5, 2 Adam steps and one Levenberg–Marquardt iteration from quartz_kinematical.cif. It
checks the files and their layout, not the quality of so short a refinement.
"""

import contextlib
import io
import json

import gemmi
import numpy as np
import pytest
import xarray as xr

from edkit.cli import main
from edkit.io.cif import read_cif, write_cif
from edkit.plot import FIGURES

REPORT_KEYS = (
    "r_obs_mean_frame", "r_obs", "r_all", "wr_obs", "wr_all", "gof",
    "n_obs", "n_all", "n_frames", "steps", "seconds", "thickness",
)  # fmt: skip


@pytest.fixture(scope="module")
def files(data_dir):
    return {
        "structure": data_dir / "structures" / "quartz_kinematical.cif",
        "data": data_dir / "pets" / "quartz_experimental.cif_pets",
    }


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    argv = [
        "refine", "--structure", str(files["structure"]), "--data", str(files["data"]),
        "--out", str(out), "--steps", "2", "--every", "33", "--n-sub", "5", "--g-max", "1.0",
        "--lm-rounds", "1", "--lm-iterations", "1", "--polish-steps", "0", "--quiet",
    ]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, out, stdout.getvalue(), stderr.getvalue()


def test_refine_exit_code_and_console(run) -> None:
    code, out, stdout, stderr = run
    assert code == 0, stderr
    assert stdout.startswith("3 frames, ")
    assert "start: mean per-frame R_obs" in stdout
    assert f"wrote {out / 'refined.cif'}" in stdout
    assert stderr == ""


def test_refine_report(run, files) -> None:
    _, out, _, _ = run
    report = json.loads((out / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(report)
    assert report["n_frames"] == 3 and len(report["thickness"]) == 3
    assert all(20.0 <= t <= 5000.0 for t in report["thickness"])  # the model's bounds, Å
    assert report["steps"] == 3  # 2 Adam steps and one Levenberg–Marquardt round
    assert 0 < report["n_obs"] <= report["n_all"]
    for key in ("r_obs_mean_frame", "r_obs", "r_all", "wr_obs", "wr_all"):
        assert 0 <= report[key] < 1, key
    assert report["seconds"] > 0
    if report["n_obs"] > report["n_parameters"]:
        assert report["gof"] > 0
    else:  # Jana's GoF divides by N_obs − N_par: undefined, written as JSON null
        assert report["gof"] is None
    assert report["structure"] == str(files["structure"])
    # the start spread the refinement chose, with the losses it chose by (it shapes the result)
    assert any(s.startswith("start thickness spread σ/μ = ") for s in report["stages"])
    # the refinement does not end worse than it started in the figure it minimises (Jana wR;
    # R_obs may rise: 7 scored reflections for 14 structural parameters)
    with xr.open_dataset(out / "refinement.nc", group="history", engine="h5netcdf") as history:
        assert report["wr_all"] <= history["wr_all"].values[0]
        np.testing.assert_allclose(report["wr_all"], history["wr_all"].values[-1], rtol=1e-12)


def test_refine_writes_a_cif_and_netcdf(run) -> None:
    _, out, _, _ = run
    refined = read_cif(out / "refined.cif")
    assert refined.labels == ("Si1", "O1")
    assert "_refine_ls_R_factor_gt" in (out / "refined.cif").read_text()
    with xr.open_dataset(out / "refinement.nc", group="history", engine="h5netcdf") as history:
        assert history.sizes["step"] == 3 and history.sizes["frame"] == 3
        assert history["fract"].dims == ("step", "atom", "xyz")
        np.testing.assert_allclose(history["fract"].values[-1], refined.fract, atol=5e-4)
    with xr.open_dataset(out / "refinement.nc", group="simulated", engine="h5netcdf") as simulated:
        for name in ("I_obs", "sigma", "h", "k", "l", "frame_id"):
            assert name in simulated
        assert simulated.sizes["frame"] == 3
    for name in FIGURES:  # the figures of edkit.plot beside the report
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_refine_writes_a_self_contained_html_report(run) -> None:
    _, out, stdout, _ = run
    page = (out / "report.html").read_text(encoding="utf-8")
    report = json.loads((out / "report.json").read_text())
    assert str(out / "report.html") in stdout
    # Figures of merit in per cent, the same numbers as report.json.
    assert f"{100 * report['r_obs']:.2f} %" in page
    assert f"{100 * report['r_obs_mean_frame']:.2f} %" in page
    # Every figure embedded, nothing fetched: no external URL, no script.
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # The refined parameters with their s.u.'s as in refined.cif, and the settings.
    refined = read_cif(out / "refined.cif")
    for label in refined.labels:
        assert f"<td>{label}</td>" in page
    # Each coordinate as refined.cif writes it: with its s.u., or bare where the s.u. is
    # unbounded (here 7 reflections on 3 frames for 29 parameters: each frame's scale,
    # thickness and angles can absorb its reflections, so none is determined).
    block = gemmi.cif.read(str(out / "refined.cif")).sole_block()
    for tag in ("_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"):
        for value in block.find_loop(tag):
            assert f'<td class="n">{value}</td>' in page, (tag, value)
    assert "<td>g_max</td>" in page and "<td>1.0</td>" in page


def test_wrong_cell_exit_code_2(files, tmp_path, capsys) -> None:
    crystal = read_cif(files["structure"])
    a, b, c, alpha, beta, gamma = crystal.cell
    wrong = tmp_path / "wrong_cell.cif"
    write_cif(crystal.replace(cell=(a, b, 1.05 * c, alpha, beta, gamma), source=""), wrong)
    argv = ["refine", "--structure", str(wrong), "--data", str(files["data"])]
    code = main([*argv, "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("edkit: error: ")
    assert "wrong_cell.cif" in err and "quartz_experimental.cif_pets" in err
    assert "cell c" in err


def test_missing_arguments_exit_code_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["refine", "--structure", "x.cif"])
    assert exit_.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_every_output_variable_labels_itself(run) -> None:
    """CF attributes on refinement.nc: every float variable and coordinate has ``units`` and
    ``long_name`` (xarray's .plot() labels its axes from them); integers, flags and labels a
    ``long_name``."""
    _, out, _, _ = run
    for group in ("history", "simulated"):
        with xr.open_dataset(out / "refinement.nc", group=group, engine="h5netcdf") as data:
            for name, variable in [*data.data_vars.items(), *data.coords.items()]:
                assert "long_name" in variable.attrs, (group, name)
                if variable.dtype.kind == "f":
                    assert "units" in variable.attrs, (group, name)


def test_a_run_that_diverged_and_did_not_improve_exits_3(monkeypatch, tmp_path, capsys) -> None:
    """The exit code of a finished run that diverged and ended no better than its start (the
    refinement itself is test_refinement's divergence test; here only the mapping to 3)."""
    import edkit.cli as cli

    report = {key: 0.1 for key in REPORT_KEYS} | {"n_obs": 1, "n_all": 2, "stages": []}

    def finished(args):
        return {**report, "divergences": divergences, "improved": improved}, tmp_path

    monkeypatch.setattr(cli, "_refine", finished)
    argv = ["refine", "--structure", "s.cif", "--data", "d.cif_pets", "--quiet"]
    for divergences, improved, code in ((1, False, 3), (1, True, 0), (0, False, 0)):
        assert cli.main(argv) == code, (divergences, improved)
        err = capsys.readouterr().err
        assert ("exit code 3" in err) == (code == 3)


def test_demo_refines_the_bundled_quartz(monkeypatch, tmp_path, capsys) -> None:
    """``edkit demo`` (the README's main command; it has no --data flag) reaches the refinement
    with the bundled files and every 3rd frame (the refinement replaced by a finished report)."""
    import edkit.cli as cli

    seen = {}
    report = {key: 0.1 for key in REPORT_KEYS} | {"n_obs": 1, "n_all": 2, "stages": []}

    def finished(args):
        seen.update(vars(args))
        return {**report, "divergences": 0, "improved": True}, tmp_path

    monkeypatch.setattr(cli, "_refine", finished)
    assert cli.main(["demo", "--quiet"]) == 0
    assert seen["structure"].name == "quartz_kinematical.cif" and seen["structure"].is_file()
    assert seen["data"].name == "quartz_experimental.cif_pets" and seen["data"].is_file()
    assert seen["every"] == 3
    assert "edkit demo: quartz_kinematical.cif against" in capsys.readouterr().out


@pytest.mark.slow  # ≈ 35 s: two Adam steps on 3 frames, the outputs
def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--every", "33", "--lm-rounds", "0", "--out", str(out)]
    assert main(argv) == 0
    assert read_cif(out / "refined.cif").labels
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] >= 2 and 0 < report["r_obs"] < 0.2


@pytest.mark.slow  # 67 s, two refinements; hand statistics: test_absolute_structure.py
def test_absolute_structure_flag(files, tmp_path) -> None:
    out = tmp_path / "out"
    argv = [
        "refine", "--structure", str(files["structure"]), "--data", str(files["data"]),
        "--out", str(out), "--steps", "2", "--max-steps", "2", "--every", "33", "--n-sub", "5",
        "--g-max", "1.0", "--lm-rounds", "1", "--lm-iterations", "1", "--quiet",
        "--absolute-structure",
    ]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    assert "absolute structure: " in stdout.getvalue()
    hands = json.loads((out / "report.json").read_text())["absolute_structure"]
    assert hands["preferred"] in ("given", "inverted") and hands["frames"] == 3
    assert hands["r_obs_given"] > 0 and hands["r_obs_inverted"] > 0
    assert "_edkit_absolute_structure_z_score" in (out / "refined.cif").read_text()
