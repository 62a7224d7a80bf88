"""Checkpoints of a refinement: a folder with the start, the data, the options and the state.

Files: ``start.cif`` (readable) and ``start.npz`` (the exact starting arrays), ``data.nc``,
``config.json`` (format version, options, counters, learning rates), ``state.npz`` (every leaf
of the parameters, the optimiser state and the best parameters; no pickle) and ``history.nc``.
Each file is written to a temporary name and renamed, so a checkpoint is never half-written.
"""

import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.io.cif import read_cif, write_cif
from edkit.refine.options import RefinementOptions, options_from, options_json
from edkit.refine.results import records_from_history

if TYPE_CHECKING:
    from edkit.refine.refinement import Refinement

#: Version 2: the streamed core's optimiser state (apply_if_finite, per-group schedules).
CHECKPOINT_VERSION = 2
_BAD_FILE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _atomic(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".partial")
    write(temporary)
    os.replace(temporary, path)


def save(refinement: "Refinement", folder: Path) -> Path:
    """Write ``refinement`` into ``folder`` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = refinement.start_crystal
    _atomic(folder / "start.cif", lambda p: write_cif(start, p))

    def start_arrays(p: Path) -> None:
        with open(p, "wb") as handle:
            np.savez(handle, fract=np.asarray(start.fract), u_cif=np.asarray(start.u_cif),
                     occupancy=np.asarray(start.occupancy))  # fmt: skip

    _atomic(folder / "start.npz", start_arrays)
    _atomic(folder / "data.nc", lambda p: refinement.dataset.to_netcdf(p, engine="h5netcdf"))
    config = {
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
    }
    _atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=1)))
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

    _atomic(folder / "state.npz", state_arrays)
    if refinement._records:
        history = refinement.history
        _atomic(folder / "history.nc", lambda p: history.to_netcdf(p, engine="h5netcdf"))
    return folder


def read(
    folder: Path,
) -> tuple[Crystal, xr.Dataset, RefinementOptions, dict[str, Any], dict[str, np.ndarray]]:
    """The start, data, options, config and state arrays of a checkpoint (EdkitError if not one,
    of another version, or corrupted)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise EdkitError(f"{folder}: not an edkit checkpoint ({error})") from None
    if config.get("version") != CHECKPOINT_VERSION:
        raise EdkitError(
            f"{folder / 'config.json'}: checkpoint version {config.get('version')!r}; this "
            f"edkit reads version {CHECKPOINT_VERSION}"
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
    return crystal, dataset, options_from(**config["options"]), config, arrays


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
    refinement._records = records_from_history(folder / "history.nc")


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
