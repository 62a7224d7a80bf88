"""Writes that fail: a full disk or a folder that cannot be written gives an ``EdkitError`` that
names the path, and leaves neither a partial file nor a damaged older one (issue 16's failed-write
checks; the checkpoint series' is in test_refinement.py), and observations a refinement cannot
use are refused at its edge.

A read-only folder cannot be tested directly where the tests run as root (root writes anyway), so
the system's refusal is injected where it would happen: in the writer (ENOSPC, full disk) or in
the rename (EACCES, read-only folder).
"""

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from edkit import Refinement, cli
from edkit.errors import EdkitError
from edkit.io import atomic
from edkit.io.cif import read_cif, write_cif
from edkit.io.pets import read_pets, write_pets


def _full_disk(path: Path) -> None:
    """A writer that runs out of space half-way."""
    path.write_text("half of the new content")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch) -> None:
    target = tmp_path / "report.json"
    target.write_text("the old content")
    with pytest.raises(EdkitError, match=r"report\.json: could not be written \(No space left"):
        atomic.write_atomically(target, _full_disk)
    assert target.read_text() == "the old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

    def read_only(source, destination) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(destination))

    monkeypatch.setattr(atomic.os, "replace", read_only)
    with pytest.raises(EdkitError, match=r"report\.json: could not be written \(Permission den"):
        atomic.write_atomically(target, lambda path: path.write_text("new"))
    assert target.read_text() == "the old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_content_error_passes_through_after_the_clean_up(tmp_path) -> None:
    def refuses(path: Path) -> None:
        path.write_text("half")
        raise EdkitError("extra key clashes")

    with pytest.raises(EdkitError, match=r"^extra key clashes$"):
        atomic.write_atomically(tmp_path / "x.cif", refuses)
    assert list(tmp_path.iterdir()) == []


def test_writers_on_a_full_disk(data_dir, tmp_path, monkeypatch) -> None:
    """write_cif and write_pets: a clean error naming the file, nothing left behind."""
    crystal = read_cif(data_dir / "structures" / "quartz.cif")
    dataset = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    real_write_text = Path.write_text

    def full_disk(self: Path, text: str, *args, **kwargs) -> int:
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    for name, write in (("out.cif", write_cif), ("out.cif_pets", write_pets)):
        source = crystal if name == "out.cif" else dataset
        with pytest.raises(EdkitError, match=rf"{name}: could not be written \(No space left"):
            write(source, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_cli_output_folder_that_cannot_be_made(data_dir, tmp_path, capsys) -> None:
    """--out naming a file: exit code 2 and one line naming it, no traceback, before any work."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    code = cli.main(
        [
            "refine",
            "--structure", str(data_dir / "structures" / "quartz.cif"),
            "--data", str(data_dir / "pets" / "quartz_experimental.cif_pets"),
            "--out", str(blocker),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("edkit: error:") and str(blocker) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "value"), [("I_obs", np.nan), ("I_obs", np.inf), ("sigma", -1.0)])
def test_a_bad_observation_is_refused_before_any_work(data_dir, name, value) -> None:
    """An observation changed in Python after reading (the reader refuses them in files): the
    refinement names the file, the field and the reflection, instead of a NaN loss later."""
    crystal = read_cif(data_dir / "structures" / "quartz.cif")
    dataset = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets").copy(deep=True)
    dataset[name].values[7] = value
    pattern = rf"quartz_experimental\.cif_pets: {name} of reflection 7 \(hkl -?\d+ -?\d+ -?\d+, "
    with pytest.raises(EdkitError, match=pattern + r"frame \d+\) is .*; 1 reflection\(s\)"):
        Refinement(crystal, dataset, progress=False)


def _edge_cases(crystal, dataset) -> dict:
    return {
        "crystal": (("quartz.cif", dataset), {}, r"crystal: expected an edkit Crystal .* got str"),
        "dataset": ((crystal, {"I_obs": [1.0]}), {}, r"dataset: expected an xarray\.Dataset"),
        "field": (
            (crystal, dataset.drop_vars("sigma")), {},
            r"quartz_experimental\.cif_pets: no sigma; a refinement needs",
        ),
        "x-ray": (
            (crystal, dataset.assign(wavelength=1.5406, voltage=62.0)), {},
            r"wavelength 1\.5406 Å, voltage 62 V is not an electron microscope's",
        ),
        "option": (
            (crystal, dataset), {"thickness": np.ones(7)}, r"thickness = array\(.*expected one of"
        ),
        "no scored": ((crystal, dataset), {"g_max": 0.05}, r"no reflection of .* is scored"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["crystal", "dataset", "field", "x-ray", "option", "no scored"])
def test_wrong_inputs_at_the_api_edge(data_dir, case) -> None:
    """Arguments of the wrong type, a dataset without a needed field, X-ray data (its wavelength
    read as electrons'), an array where a model name belongs, and nothing scored: an EdkitError
    naming the argument or field and what was expected, before any heavy work."""
    crystal = read_cif(data_dir / "structures" / "quartz.cif")
    dataset = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    args, options, match = _edge_cases(crystal, dataset)[case]
    with pytest.raises(EdkitError, match=match):
        Refinement(*args, progress=False, n_sub=3, **options)
