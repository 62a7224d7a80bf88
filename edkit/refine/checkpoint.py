"""Checkpoints of a refinement: a folder with the start, the data, the options and the state.

Files: ``start.cif`` (readable) and ``start.npz`` (the exact starting arrays), ``data.nc``,
``config.json`` (format version, options, counters, learning rates), ``state.npz`` (every leaf
of the parameters, the optimiser state and the best parameters; no pickle) and ``history.nc``.
Each file is written to a temporary name and renamed, so a checkpoint is never half-written;
``checksums.json``, written last, holds every file's SHA-256, and loading checks them (a file
changed or damaged since is named). ``config.json`` also holds a fingerprint of the data
the state was made for, so a folder whose ``data.nc`` comes from another dataset is refused.

A *series* of checkpoints (what ``edkit refine`` writes into ``OUT/checkpoints/``) adds
``run.json`` (the command line's schedule and position) and is atomic as a whole: each one is
written into a hidden ``.NAME.partial`` folder, flushed to disk and renamed to
``NNNN-stepSSSSSS`` (a sequence number and the step count), so a process killed mid-write leaves
the previous checkpoint intact; the newest :data:`KEEP` are kept.
"""

import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.io.atomic import write_atomically
from edkit.io.cif import read_cif, write_cif
from edkit.refine.options import RefinementOptions, options_from, options_json
from edkit.refine.results import records_from_history

if TYPE_CHECKING:
    from edkit.refine.refinement import Refinement

#: Version 2: the streamed core's optimiser state (apply_if_finite, per-group schedules).
CHECKPOINT_VERSION = 2
_BAD_FILE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
#: The SHA-256 of every file of a checkpoint, written after them.
CHECKSUMS = "checksums.json"
_HASHED = ("start.cif", "start.npz", "data.nc", "config.json", "state.npz", "history.nc")
#: What ``config.json`` must hold besides the version.
_CONFIG_KEYS = (
    "options", "step_count", "seconds", "best_step", "best_loss", "base_learning_rates",
    "enabled", "messages", "initial_thickness",
)  # fmt: skip
#: The dataset's variables a refinement's state depends on (its frames, reflections, data, UB).
_DATA_FIELDS = ("frame", "frame_id", "h", "k", "l", "I_obs", "sigma", "UB")


def data_fingerprint(dataset: xr.Dataset) -> dict[str, Any]:
    """Frames, reflections and a SHA-256 of the values a refinement's state depends on; the
    same after a netCDF round trip (values compared as float64)."""
    digest = hashlib.sha256()
    for name in _DATA_FIELDS:
        if name in dataset.variables:
            values = np.ascontiguousarray(dataset[name].values, dtype=np.float64)
            digest.update(f"{name}{values.shape}".encode())
            digest.update(values.tobytes())
    return {
        "frames": int(dataset.sizes.get("frame", 0)),
        "reflections": int(dataset.sizes.get("refl", 0)),
        "sha256": digest.hexdigest(),
    }


def save(refinement: "Refinement", folder: Path) -> Path:
    """Write ``refinement`` into ``folder`` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = refinement.start_crystal
    write_atomically(folder / "start.cif", lambda p: write_cif(start, p))

    def start_arrays(p: Path) -> None:
        with open(p, "wb") as handle:
            np.savez(handle, fract=np.asarray(start.fract), u_cif=np.asarray(start.u_cif),
                     occupancy=np.asarray(start.occupancy))  # fmt: skip

    write_atomically(folder / "start.npz", start_arrays)
    write_atomically(
        folder / "data.nc", lambda p: refinement.dataset.to_netcdf(p, engine="h5netcdf")
    )
    config: dict[str, Any] = {
        "version": CHECKPOINT_VERSION,
        "options": options_json(refinement.options),
        "step_count": refinement.step_count,
        "seconds": refinement.seconds,
        "best_step": refinement.best_step,
        "best_loss": refinement.best_loss,
        "base_learning_rates": refinement.base_learning_rates,
        "enabled": refinement.enabled,
        "messages": refinement.messages,
        "initial_thickness": [float(t) for t in refinement.initial_thickness],
        "restart_step": refinement.restart_step,
        "restart_loss": refinement.restart_loss,
        "warmup_step": refinement.warmup_step,
        "data": data_fingerprint(refinement.dataset),
    }
    write_atomically(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=1)))
    arrays: dict[str, Any] = {}
    trees = (
        ("state", refinement.state),
        ("opt", refinement.opt_state),
        ("best", refinement.best_state),
    )
    for name, tree in trees:
        for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
            arrays[f"{name}_{i}"] = np.asarray(leaf)

    def state_arrays(p: Path) -> None:
        with open(p, "wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(folder / "state.npz", state_arrays)
    if refinement._records:
        history = refinement.history
        write_atomically(folder / "history.nc", lambda p: history.to_netcdf(p, engine="h5netcdf"))
    # Last: a checkpoint whose checksums are there is complete, and each file is as written.
    sums = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name in _HASHED}
    write_atomically(folder / CHECKSUMS, lambda p: p.write_text(json.dumps(sums, indent=1)))
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(folder: Path) -> None:
    """Check every file against ``checksums.json`` (absent in checkpoints written before it)."""
    path = folder / CHECKSUMS
    if not path.exists():
        return
    try:
        sums = json.loads(path.read_text())
        if not isinstance(sums, dict) or not set(sums) <= set(_HASHED):
            raise ValueError(f"expected {{file: SHA-256}} of {', '.join(_HASHED)}")
        actual = {name: _sha256(folder / name) for name in sums}
    except (OSError, ValueError) as error:
        raise EdkitError(f"{path}: corrupted checkpoint ({error})") from None
    for name, expected in sums.items():
        if actual[name] != expected:
            raise EdkitError(
                f"{folder / name}: corrupted checkpoint (its SHA-256 is not the one in "
                f"{CHECKSUMS}: changed or damaged after it was written)"
            )


def read(
    folder: Path,
) -> tuple[Crystal, xr.Dataset, RefinementOptions, dict[str, Any], dict[str, np.ndarray]]:
    """The start, data, options, config and state arrays of a checkpoint (EdkitError if not one,
    of another version, or corrupted)."""
    _verify(folder)
    try:
        text = (folder / "config.json").read_text()
    except OSError as error:
        raise EdkitError(f"{folder}: not an edkit checkpoint ({error})") from None
    try:
        config = json.loads(text)
    except ValueError as error:
        raise EdkitError(f"{folder / 'config.json'}: corrupted checkpoint ({error})") from None
    if not isinstance(config, dict) or config.get("version") != CHECKPOINT_VERSION:
        version = config.get("version") if isinstance(config, dict) else None
        raise EdkitError(
            f"{folder / 'config.json'}: checkpoint version {version!r}; this "
            f"edkit reads version {CHECKPOINT_VERSION}"
        )
    missing = sorted(set(_CONFIG_KEYS) - set(config))
    if missing:
        raise EdkitError(
            f"{folder / 'config.json'}: corrupted checkpoint (no {', '.join(missing)})"
        )
    current = folder / "start.cif"
    try:
        crystal = read_cif(current)
        # The CIF rounds numbers; the exact starting arrays travel beside it.
        current = folder / "start.npz"
        with open(current, "rb") as handle, np.load(handle) as exact:
            crystal = crystal.replace(
                fract=exact["fract"], u_cif=exact["u_cif"], occupancy=exact["occupancy"]
            )
        current = folder / "data.nc"
        dataset = xr.load_dataset(current, engine="h5netcdf")
        current = folder / "state.npz"
        with open(current, "rb") as handle, np.load(handle) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except _BAD_FILE as error:
        raise EdkitError(f"{current}: corrupted checkpoint ({error})") from None
    _check_data(folder, config, dataset)
    try:
        options = options_from(**config["options"])
    except (EdkitError, TypeError) as error:
        raise EdkitError(f"{folder / 'config.json'}: {error}") from None
    return crystal, dataset, options, config, arrays


def _check_data(folder: Path, config: dict[str, Any], dataset: xr.Dataset) -> None:
    """EdkitError when ``data.nc`` is not the dataset the state was saved with (checkpoints
    written before the fingerprint have none: not checked)."""
    saved = config.get("data")
    if saved is None:
        return
    found = data_fingerprint(dataset)
    if saved != found:

        def describe(d: Any) -> str:
            if not isinstance(d, dict):
                return repr(d)
            sha = str(d.get("sha256", ""))[:12]
            return f"{d.get('frames')} frames, {d.get('reflections')} reflections, data {sha}"

        raise EdkitError(
            f"{folder / 'data.nc'}: a checkpoint of another dataset: its state was saved for "
            f"{describe(saved)}, but data.nc holds {describe(found)} (files of two runs mixed?)"
        )


def restore(
    refinement: "Refinement", config: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path
) -> None:
    """Put a checkpoint's state and counters into a freshly set-up ``refinement``."""
    try:
        refinement.state = _fill(refinement.state, arrays, "state")
        refinement.opt_state = _fill(refinement.opt_state, arrays, "opt")
        refinement.best_state = _fill(refinement.state, arrays, "best")
    except _BAD_FILE as error:
        raise EdkitError(f"{folder / 'state.npz'}: corrupted checkpoint ({error})") from None
    refinement.base_learning_rates = {k: float(v) for k, v in config["base_learning_rates"].items()}
    refinement.enabled = {k: bool(v) for k, v in config["enabled"].items()}
    refinement.step_count = int(config["step_count"])
    refinement.seconds = float(config["seconds"])
    refinement.best_step = int(config["best_step"])
    refinement.best_loss = float(config["best_loss"])
    refinement.messages = list(config["messages"])
    # Both new with the thickness search again; older checkpoints never restarted.
    refinement.restart_step = int(config.get("restart_step", 0))
    refinement.restart_loss = float(config.get("restart_loss", 0.0))
    refinement.warmup_step = int(config.get("warmup_step", 0))  # new with LM's fresh moments
    try:
        refinement._records = records_from_history(folder / "history.nc")
    except (*_BAD_FILE, TypeError) as error:
        raise EdkitError(f"{folder / 'history.nc'}: corrupted checkpoint ({error})") from None


def _fill(template: Any, arrays: dict[str, np.ndarray], prefix: str) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    new = []
    for i, leaf in enumerate(leaves):
        value = arrays[f"{prefix}_{i}"]
        if np.shape(value) != np.shape(leaf):
            raise ValueError(
                f"array {prefix}_{i} has shape {np.shape(value)}, expected {np.shape(leaf)}"
            )
        new.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


# ---------------------------------------------------------------------------------- a series
#: The folder of a series inside an output folder, and how many of its checkpoints are kept.
SERIES = "checkpoints"
KEEP = 2
#: ``run.json``: what a series adds to :func:`save`'s files (the caller's schedule, position).
RUN_FILE = "run.json"
_NAME = re.compile(r"(\d+)-step(\d+)")


def series(out: Path) -> list[Path]:
    """The complete checkpoints in ``out/checkpoints``, oldest first (none: an empty list).

    Hidden ``.*.partial`` folders (a write that was killed) are never listed.
    """
    folder = out / SERIES
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.fullmatch(p.name)), key=_number)


def _number(path: Path) -> int:
    match = _NAME.fullmatch(path.name)
    return int(match[1]) if match else 0


def write_series(
    refinement: Any,
    out: Path,
    run: dict[str, Any],
    saver: Callable[[Any, Path], Any] | None = None,
) -> Path:
    """Add a checkpoint of ``refinement`` with ``run`` (JSON) as ``run.json`` to
    ``out/checkpoints`` atomically as a whole (see the module docstring); returns its folder.
    ``saver(refinement, folder)`` writes the refinement (default :func:`save`; a joint
    refinement's is :func:`edkit.refine.joint_checkpoint.save_joint`).

    Only the newest :data:`KEEP` checkpoints are kept, and the older ones are removed only after
    the new one is in place, so at every instant one complete checkpoint exists.
    """
    folder = out / SERIES
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.partial"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    existing = series(out)
    number = _number(existing[-1]) + 1 if existing else 1
    name = f"{number:04d}-step{refinement.step_count:06d}"
    partial = folder / f".{name}.partial"
    try:
        (saver or save)(refinement, partial)
        write_atomically(partial / RUN_FILE, lambda p: p.write_text(json.dumps(run, indent=1)))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing partial left; the last one stands
        raise
    # Flushed before the rename: after a power cut too the renamed folder holds whole files.
    for path in partial.iterdir():
        _fsync(path)
    _fsync(partial)
    final = folder / name
    os.rename(partial, final)
    _fsync(folder)
    for old in existing[: max(0, len(existing) - (KEEP - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def latest(path: Path) -> Path:
    """The checkpoint to resume from: the newest one in ``path/checkpoints``, or ``path`` itself
    when it is a checkpoint folder. EdkitError naming ``path`` if there is none."""
    if not path.is_dir():
        raise EdkitError(f"{path}: no such folder (expected an edkit refine --out folder)")
    found = series(path)
    if found:
        return found[-1]
    if (path / "config.json").is_file() or (path / "joint.json").is_file():
        return path
    raise EdkitError(
        f"{path}: no checkpoint in it (edkit refine writes them into {path / SERIES}; none was "
        "complete)"
    )


def read_run(folder: Path) -> dict[str, Any]:
    """A series checkpoint's ``run.json`` (EdkitError naming the file if missing or corrupt)."""
    path = folder / RUN_FILE
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdkitError(
            f"{path}: no such file; {folder} was not written by edkit refine (a folder of "
            "Refinement.save resumes in Python with Refinement.load)"
        ) from None
    except (OSError, ValueError) as error:
        raise EdkitError(f"{path}: corrupted checkpoint ({error})") from None
    if not isinstance(run, dict):
        raise EdkitError(f"{path}: corrupted checkpoint (not a JSON object)")
    return run
