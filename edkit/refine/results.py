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
    ``mask``, each frame scaled in closed form (fractions; counts as ``n_obs``, ``n_all``).

    The Jana figures take Jana's amplitude scale per frame (:func:`edkit.metrics.
    jana_scale_per_frame`), the one the refinement's objective and least squares use, so wR_all
    is the wR they minimise; the mean per-frame R_obs keeps diffBloch's inverse-variance scale.
    """
    scale = metrics.jana_scale_per_frame(
        i_obs[mask], np.maximum(sigma[mask], 1e-12), i_calc[mask], refl_frame[mask], n_frames
    )
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
    coords = {
        "step": ("step", steps, {"long_name": "refinement step"}),
        "atom": ("atom", list(labels), {"long_name": "atom label"}),
        "xyz": ("xyz", ["x", "y", "z"], {"long_name": "fractional axis"}),
        "frame": ("frame", frames, {"long_name": "PETS frame id"}),
    }
    history = xr.Dataset(data, coords=coords, attrs=attrs)
    for name, (units, long_name) in SCALAR_LABELS.items():
        history[name].attrs.update(units=units, long_name=long_name)
    return history


#: CF units and long names of the per-step figures (fractions, as the report keeps them).
SCALAR_LABELS = {
    "loss": ("1", "loss (the objective minimised)"),
    "validation_loss": ("1", "loss on the validation frames"),
    "r_obs": ("1", "Jana R_obs on |F|"),
    "r_all": ("1", "Jana R_all on |F|"),
    "wr_obs": ("1", "Jana wR_obs on |F|"),
    "wr_all": ("1", "Jana wR_all on |F|"),
    "gof": ("1", "Jana goodness of fit"),
    "r_obs_mean_frame": ("1", "mean per-frame R_obs (diffBloch)"),
    "seconds": ("s", "seconds of refinement work"),
}


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


def thickness_array(
    values: np.ndarray,
    weights: np.ndarray,
    frames: np.ndarray,
    alpha: np.ndarray,
    grid_search: np.ndarray,
    model: str,
) -> xr.DataArray:
    """Mean thickness per frame (Å) from nodes and weights (n_f, n_t), with the spread, α and
    the grid-search values as coords."""
    mean = np.sum(values * weights, axis=1)
    spread = np.sqrt(np.maximum(np.sum(weights * (values - mean[:, None]) ** 2, axis=1), 0))
    return xr.DataArray(
        mean,
        dims=("frame",),
        coords={
            "frame": ("frame", frames, {"long_name": "PETS frame id"}),
            "alpha": ("frame", alpha, {"units": "degree", "long_name": "goniometer α"}),
            "spread": ("frame", spread, {"units": "angstrom", "long_name": "thickness spread σ"}),
            "grid_search": (
                "frame",
                grid_search,
                {"units": "angstrom", "long_name": "thickness from the grid search"},
            ),
        },
        name="thickness",
        attrs={"units": "angstrom", "long_name": "mean thickness", "model": model},
    )


def thickness_map_array(x: Any, y: Any, h: Any) -> xr.DataArray:
    """A learned thickness map h(x, y), Å, as a DataArray over (y, x)."""
    return xr.DataArray(
        np.asarray(h),
        dims=("y", "x"),
        coords={"x": np.asarray(x)[0] if np.ndim(x) == 2 else np.asarray(x),
                "y": np.asarray(y)[:, 0] if np.ndim(y) == 2 else np.asarray(y)},
        name="thickness_map",
        attrs={"units": "angstrom", "long_name": "thickness along the platelet normal"},
    )  # fmt: skip


def finite_or_none(report: dict[str, Any]) -> dict[str, Any]:
    """NaN (an undefined figure, e.g. GoF with N_obs ≤ N_par) as JSON null, not invalid NaN."""
    return {
        key: None if isinstance(value, float) and value != value else value
        for key, value in report.items()
    }


def cif_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The refined CIF's figures of merit from :meth:`Refinement.report`."""
    return {
        "_refine_ls_R_factor_gt": round(report["r_obs"], 5),
        "_refine_ls_R_factor_all": round(report["r_all"], 5),
        "_refine_ls_wR_factor_gt": round(report["wr_obs"], 5),
        "_refine_ls_wR_factor_ref": round(report["wr_all"], 5),
        "_refine_ls_goodness_of_fit_ref": round(report["gof"], 4),
        "_refine_ls_number_reflns": report["n_all"],
        "_refine_ls_number_parameters": report["n_parameters"],
        "_refine_special_details": "edkit hybrid Bloch-wave refinement; "
        f"mean per-frame R_obs (diffBloch) {report['r_obs_mean_frame']:.4f}",
    }
