"""Results of a refinement as data: per-step records, the history Dataset, figures of merit."""

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from edkit import metrics

#: Scalar figures recorded at every step (fractions, seconds).
SCALARS = (
    "loss", "validation_loss", "r_obs", "r_all", "wr_obs", "wr_all", "gof", "r_obs_mean_frame",
    "seconds",
)  # fmt: skip


def figures(
    i_obs: np.ndarray,
    sigma: np.ndarray,
    i_calc: np.ndarray,
    mask: np.ndarray,
    refl_frame: np.ndarray,
    n_frames: int,
    n_params: int = 0,
) -> dict[str, float]:
    """Jana2020 R_obs, R_all, wR_obs, wR_all, GoF and diffBloch's mean per-frame R_obs over
    ``mask``, each frame scaled in closed form (fractions; counts as ``n_obs``, ``n_all``)."""
    weights = np.where(mask, 1.0 / np.maximum(sigma, 1e-12), 0.0)
    scale = metrics.scale_per_frame(i_obs, i_calc, refl_frame, n_frames, weights)
    jana = metrics.jana_figures(
        i_obs[mask], sigma[mask], (i_calc * scale[refl_frame])[mask], n_params=n_params
    )
    mean_frame = metrics.mean_frame_r_obs(
        i_obs[mask], sigma[mask], i_calc[mask], refl_frame[mask], n_frames
    )
    names = ("r_obs", "r_all", "wr_obs", "wr_all", "gof", "n_obs", "n_all")
    return {**{k: jana[k] for k in names}, "r_obs_mean_frame": mean_frame}


def history_dataset(
    records: list[dict[str, Any]],
    labels: tuple[str, ...],
    frames: np.ndarray,
    attrs: dict[str, Any],
) -> xr.Dataset:
    """Per-step records as a Dataset over ``step`` (figures, fract, ueq, thickness)."""
    n_atoms, n_frames = len(labels), len(frames)
    steps = np.array([r["step"] for r in records], dtype=np.int64)
    data: dict[str, Any] = {
        name: ("step", np.array([r[name] for r in records], dtype=np.float64)) for name in SCALARS
    }
    data["fract"] = (
        ("step", "atom", "xyz"),
        np.array([r["fract"] for r in records]).reshape(-1, n_atoms, 3),
        {"units": "1", "long_name": "fractional coordinates"},
    )
    data["ueq"] = (
        ("step", "atom"),
        np.array([r["ueq"] for r in records]).reshape(-1, n_atoms),
        {"units": "angstrom**2", "long_name": "U_eq"},
    )
    data["thickness"] = (
        ("step", "frame"),
        np.array([r["thickness"] for r in records]).reshape(-1, n_frames),
        {"units": "angstrom", "long_name": "mean thickness"},
    )
    history = xr.Dataset(
        data,
        coords={"step": steps, "atom": list(labels), "xyz": ["x", "y", "z"], "frame": frames},
        attrs=attrs,
    )
    for name in ("loss", "validation_loss", "r_obs", "r_all", "wr_obs", "wr_all"):
        history[name].attrs["units"] = "1"
    history["seconds"].attrs["units"] = "s"
    return history


def records_from_history(path: Path) -> list[dict[str, Any]]:
    """The records of a saved history (empty if the file does not exist)."""
    if not path.exists():
        return []
    history = xr.load_dataset(path, engine="h5netcdf")
    records = []
    for i, step in enumerate(history["step"].values):
        record: dict[str, Any] = {"step": int(step)}
        for name in SCALARS:
            record[name] = float(history[name].values[i])
        for name in ("fract", "ueq", "thickness"):
            record[name] = history[name].values[i]
        records.append(record)
    return records
