"""The Binder set-up and the stored notebooks (fast checks; ``make test-binder`` builds the
environment itself and executes the notebooks in it, ``make test-notebooks`` runs them here).

- binder/requirements.txt pins every runtime dependency of pyproject.toml with ``==``, inside
  the range pyproject allows; binder/runtime.txt names a Python that requires-python allows;
  binder/postBuild installs this checkout.
- The notebooks are stored without outputs, and the README links to each of them.
"""

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STORED_NOTEBOOKS = [*NOTEBOOKS, ROOT / "tests" / "browser_panel.ipynb"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, Version]:
    """binder/requirements.txt as {canonical name: pinned version}; every line must be a pin."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate((BINDER / "requirements.txt").read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", (
            f"binder/requirements.txt:{number}: {line!r} is not an exact pin (name==version)"
        )
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"binder/requirements.txt:{number}: {name} is pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def test_binder_pins_every_runtime_dependency_within_its_range():
    """The core and the jupyter extra (the notebooks need both)."""
    pins = _pins()
    project = _pyproject()["project"]
    for dependency in project["dependencies"] + project["optional-dependencies"]["jupyter"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} (pyproject) is not pinned in binder/"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"binder/requirements.txt pins {name}=={pins[name]}, outside pyproject's "
            f"{requirement.specifier}"
        )


def test_binder_pins_the_notebook_front_ends():
    pins = _pins()
    for name in ("jupyterlab", "ipykernel", "ipywidgets", "jupyter-bokeh", "voila"):
        assert name in pins, f"{name} is not pinned in binder/requirements.txt"
    # The browser extra's Voila range holds the pinned Voila too.
    extra = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["browser"]]
    voila = next(r for r in extra if canonicalize_name(r.name) == "voila")
    assert voila.specifier.contains(pins["voila"])


def test_binder_python_is_allowed_by_requires_python():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(\d+\.\d+)", runtime)
    assert match, f"binder/runtime.txt: {runtime!r}; expected e.g. 'python-3.12'"
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires.contains(Version(match.group(1)))


def test_binder_post_build_installs_this_checkout():
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
    text = post_build.read_text()
    assert text.startswith("#!"), "binder/postBuild needs a shebang line"
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    installs = [line for line in commands if "pip install" in line]
    assert len(installs) == 1 and re.search(r"-e \.(\s|$)", installs[0]), installs


@pytest.mark.parametrize("path", STORED_NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, f"{path.name} has no code"
    for index, cell in enumerate(code):
        assert cell["outputs"] == [], f"{path.name}: code cell {index} has stored outputs"
        assert cell["execution_count"] is None, f"{path.name}: code cell {index} was executed"


def test_the_eight_notebooks_exist_and_the_readme_links_them():
    names = [path.name for path in NOTEBOOKS]
    assert names == [
        "01_quick_start.ipynb",
        "02_bloch_waves.ipynb",
        "03_synthetic_benchmark.ipynb",
        "04_real_data_thickness.ipynb",
        "05_bring_your_own_data.ipynb",
        "06_performance.ipynb",
        "07_paper_benchmarks.ipynb",
        "08_difference_maps.ipynb",
    ]
    readme = (ROOT / "README.md").read_text()
    for name in names:
        assert f"(notebooks/{name})" in readme, f"README does not link notebooks/{name}"
    assert "mybinder.org/v2/" in readme and "(docs/panel.png)" in readme
    assert (ROOT / "docs" / "panel.png").stat().st_size > 10_000


def test_binder_badge_follows_the_git_remote(tmp_path) -> None:
    """scripts/binder_badge.py reads a GitHub remote in both URL forms and rewrites only the
    badge; without a GitHub remote it leaves the README alone."""
    import importlib.util
    import shutil
    import subprocess

    spec = importlib.util.spec_from_file_location(
        "binder_badge", ROOT / "scripts" / "binder_badge.py"
    )
    badge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(badge)
    for remote in (
        "https://github.com/ed-lab/edkit.git",
        "git@github.com:ed-lab/edkit.git",
        "https://github.com/ed-lab/edkit",
    ):
        assert badge.github_repository(remote) == ("ed-lab", "edkit"), remote
    assert badge.github_repository("https://gitlab.com/ed-lab/edkit.git") is None
    # A copy of the project with a remote: the badge follows it, the rest of the README stays.
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "binder_badge.py", copy / "scripts")
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    (copy / "README.md").write_text(original, encoding="utf-8")
    run = lambda *a: subprocess.run(a, cwd=copy, capture_output=True, text=True, check=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "remote", "add", "origin", "git@github.com:ed-lab/edkit.git")
    run("python3", "scripts/binder_badge.py")
    updated = (copy / "README.md").read_text(encoding="utf-8")
    assert "https://mybinder.org/v2/gh/ed-lab/edkit/HEAD?urlpath=lab/tree/notebooks/" in updated
    assert badge.BADGE.sub("X", updated) == badge.BADGE.sub("X", original)
    run("python3", "scripts/binder_badge.py", "--check")
