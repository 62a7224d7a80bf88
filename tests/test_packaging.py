"""A plain ``pip install`` (no extras) in a fresh virtual environment: the library and the
``edkit`` command work without the Jupyter stack (issue 15's lean core).

The checkout's package files are copied to a temporary folder, built into a wheel there and
the wheel installed (no build files left in the checkout); pip takes the dependencies from its
cache when the main environment was installed on this machine (CI: ``make test`` just did), so
the test costs about two minutes. The refinement is test_cli.py's tiny one with two steps.
"""

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What only the jupyter extra brings (edkit.widgets; its pandas comes with xarray anyway).
JUPYTER_ONLY = ("holoviews", "bokeh", "panel", "jupyter_bokeh", "ipywidgets", "IPython")


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs
    )


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain")
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "edkit", source / "edkit", ignore=shutil.ignore_patterns("__pycache__"))
    venv = folder / "venv"
    done = _run([sys.executable, "-m", "venv", venv])
    assert done.returncode == 0, done.stderr
    # A built wheel, as an index would serve it (not the source tree): its package data (the
    # bundled examples) and subpackages (edkit.cli, …) must be inside it.
    wheels = folder / "wheels"
    pip = [venv / "bin" / "python", "-m", "pip"]
    done = _run([*pip, "wheel", "-q", "--no-deps", "-w", wheels, source])
    assert done.returncode == 0, done.stderr
    (wheel,) = wheels.glob("edkit-*.whl")
    done = _run([*pip, "install", "-q", wheel])
    assert done.returncode == 0, done.stderr
    return venv


@pytest.mark.slow  # a fresh environment: about two minutes
def test_plain_install_has_no_jupyter_stack_and_a_version(plain_venv) -> None:
    python = plain_venv / "bin" / "python"
    found = _run([
        python, "-c",
        "import importlib.util, sys, edkit; "
        f"print([m for m in {JUPYTER_ONLY!r} if importlib.util.find_spec(m)]); "
        "print(edkit.__version__); import matplotlib",
    ])  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines() == ["[]", version("edkit")]
    shown = _run([plain_venv / "bin" / "edkit", "--version"])
    assert shown.returncode == 0 and shown.stdout.strip() == f"edkit {version('edkit')}"
    widgets = _run([python, "-c", "import edkit.widgets as w; w.RefinementPanel"])
    assert widgets.returncode == 1
    assert "needs the jupyter extra" in widgets.stderr
    assert "pip install 'edkit[jupyter]'" in widgets.stderr


@pytest.mark.slow  # a fresh environment: about two minutes
def test_plain_install_refines_from_the_command_line(plain_venv, data_dir, tmp_path) -> None:
    out = tmp_path / "out"
    checked = _run([
        plain_venv / "bin" / "edkit", "validate",
        "--structure", data_dir / "structures" / "quartz_kinematical.cif",
        "--data", data_dir / "pets" / "quartz_experimental.cif_pets", "--every", "33",
    ])  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "memory plan" in checked.stdout and "would start" in checked.stdout
    done = _run([
        plain_venv / "bin" / "edkit", "refine",
        "--structure", data_dir / "structures" / "quartz_kinematical.cif",
        "--data", data_dir / "pets" / "quartz_experimental.cif_pets", "--out", out,
        "--steps", "2", "--every", "33", "--n-sub", "5", "--g-max", "1.0",
        "--lm-rounds", "0", "--polish-steps", "0", "--quiet",
    ])  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and (out / "refined.cif").exists()
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
