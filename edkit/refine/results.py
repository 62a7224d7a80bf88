"""Results of a refinement as data: per-step records, the history Dataset, figures of merit."""

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from edkit import metrics
from edkit.version import __version__

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


def joint_history_dataset(
    records: list[dict[str, Any]], names: list[str], histories: list[xr.Dataset]
) -> xr.Dataset:
    """A joint refinement's history over ``step``: its own per-step figures (``records``),
    each dataset's loss and R's as ``<name>_by_dataset`` over (``dataset``, ``step``) from
    their ``histories``, and the shared structure (``fract``, ``ueq``) from the first."""
    steps = np.array([r["step"] for r in records], dtype=np.int64)
    joint = xr.Dataset(
        {name: ("step", np.array([r[name] for r in records], dtype=np.float64),
                {"units": units, "long_name": long_name})
         for name, (units, long_name) in SCALAR_LABELS.items()},
        coords={"step": ("step", steps, {"long_name": "refinement step"})},
    )  # fmt: skip
    dataset = xr.DataArray(names, dims="dataset", attrs={"long_name": "dataset"})
    for name in ("loss", "r_obs", "wr_obs", "r_obs_mean_frame"):
        joint[f"{name}_by_dataset"] = xr.concat([h[name] for h in histories], dim=dataset)
        joint[f"{name}_by_dataset"].attrs.update(histories[0][name].attrs)
    structure = histories[0][["fract", "ueq"]].sel(step=steps)
    return xr.merge([joint, structure], combine_attrs="drop_conflicts")


def joint_cif_items(
    report: dict[str, Any],
    wavelength: float,
    n_parameters: int,
    gof: float | None,
    names: list[str],
) -> dict[str, object]:
    """A joint refinement's CIF items: electron radiation of ``wavelength`` Å, the joint R's
    and reflection count of ``report``, every refined parameter (``n_parameters``), the GoF of
    the joint full normal matrix (None: not computed) and the datasets' file ``names``."""
    items: dict[str, object] = {
        "_diffrn_radiation_probe": "electron",
        "_diffrn_radiation_type": "electron",
        "_diffrn_radiation_wavelength": round(wavelength, 6),
        "_refine_ls_structure_factor_coef": "F",
        "_refine_ls_matrix_type": "full",
        "_refine_ls_weighting_scheme": "sigma",
        "_refine_ls_number_reflns": report["n_all"],
        "_refine_ls_number_parameters": n_parameters,
        "_refine_ls_R_factor_gt": _rounded(report["r_obs"], 5),
        "_refine_ls_R_factor_all": _rounded(report["r_all"], 5),
        "_refine_ls_wR_factor_gt": _rounded(report["wr_obs"], 5),
        "_refine_ls_wR_factor_ref": _rounded(report["wr_all"], 5),
        "_refine_special_details": "edkit joint refinement against " + ", ".join(names),
    }
    if gof is not None:
        items["_refine_ls_goodness_of_fit_ref"] = gof
    return items


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


def goodness_of_fit_ref(
    i_obs: np.ndarray,
    sigma: np.ndarray,
    i_calc: np.ndarray,
    mask: np.ndarray,
    refl_frame: np.ndarray,
    n_frames: int,
    n_params: int,
) -> float:
    """sqrt(Σ w (F_o − k_f F_c)² / (N_ref − N_par)) over every reflection of ``mask`` (N_ref of
    them), Jana's weights and scales as in :func:`figures`: the CIF's
    ``_refine_ls_goodness_of_fit_ref`` with N_par every refined parameter. NaN when
    N_ref ≤ N_par."""
    scale = metrics.jana_scale_per_frame(
        i_obs[mask], np.maximum(sigma[mask], 1e-12), i_calc[mask], refl_frame[mask], n_frames
    )
    jana = metrics.jana_figures(
        i_obs[mask], sigma[mask], (i_calc * scale[refl_frame])[mask], n_params=n_params
    )
    return float(jana["gof_all"])


#: Jana2020's weights on |F| (:func:`edkit.metrics.jana_weights`) in CIF text.
WEIGHTING_DETAILS = (
    "w = 1/[\\s^2^(Fo) + (0.01Fo)^2^], \\s(Fo) = \\s(Io)/(2Fo), or 5\\s(Io)^1/2^ where "
    "Io < 0.01\\s(Io) (Jana2020); Fo = Io^1/2^, each frame scaled in closed form"
)
#: Jana's "observed" threshold (:func:`edkit.metrics.jana_figures`).
THRESHOLD_EXPRESSION = "I>3\\s(I)"


def _rounded(value: float | None, digits: int) -> float:
    """``value`` rounded, NaN (written "?") when unknown."""
    if value is None or not np.isfinite(value):
        return float("nan")
    return round(float(value), digits)


def cif_items(
    report: dict[str, Any],
    *,
    wavelength: float,
    voltage: float,
    reflections: dict[str, int],
    shift_su: tuple[float, float],
    thickness_model: str,
    restraints: int = 0,
    with_uncertainties: bool = True,
    undetermined: int = 0,
) -> dict[str, Any]:
    """The refinement's items of the refined CIF, tag → value (numbers, strings, and one loop:
    a mapping column → values), from :meth:`Refinement.report` and what it does not hold.

    Args:
      report: the refinement's report (with "parameters", "n_parameters_all", "gof_ref").
      wavelength: electron wavelength, Å.
      voltage: accelerating voltage, V (written in kV).
      reflections: "measured" (every reflection of the dataset, frames not merged), "total"
        (the scored ones, training and validation frames) and "gt" (of those, I > 3σ(I)).
      shift_su: (max, mean) |shift|/s.u. of the structural parameters (NaN: not computed).
      thickness_model: the thickness model's name.
      restraints: number of restraints.
      with_uncertainties: whether the s.u.'s were computed (the special details say how).
      undetermined: structural parameters the data leave undetermined once the nuisance
        parameters are refined (written without s.u.; the special details say so).
    """
    counts = {group: int(n) for group, n in report["parameters"].items()}
    thickness = np.asarray(report["thickness"], dtype=np.float64)
    described = ", ".join(f"{n} {group}" for group, n in counts.items() if n)
    su_text = (
        "S.u.'s from the inverse of the full normal matrix over every refined parameter "
        "(the thickness, orientation and absorption parameters included, the frame scales "
        "eliminated in closed form), scaled by the GoF; shift/s.u.: the Gauss-Newton step "
        "from the final state."
        if with_uncertainties
        else "No s.u.'s were computed."
    )
    if undetermined:
        su_text += (
            f" {undetermined} structural parameters are not determined once the nuisance "
            "parameters are refined (too few reflections per frame): written without s.u."
        )
    details = (
        f"Dynamical refinement (Bloch waves) of 3D ED data with edkit {__version__}: least "
        "squares on |F| with Jana2020's weights, one scale per frame in closed form. "
        f"Thickness model '{thickness_model}': mean {thickness.mean():.1f} A, "
        f"{thickness.min():.1f}-{thickness.max():.1f} A over {thickness.size} frames. "
        f"Refined parameters ({report['n_parameters_all']}): {described}; a thickness network "
        "counts one parameter per fitted frame (the thickness it gives each frame). "
        f"{su_text} Mean per-frame R_obs (diffBloch) {report['r_obs_mean_frame']:.4f}."
    )
    # A text field of short lines (CIF keeps lines under 80 characters).
    details = "\n".join(textwrap.wrap(details, 78, break_on_hyphens=False))
    return {
        "_computing_structure_refinement": f"edkit {__version__}",
        "_diffrn_radiation_probe": "electron",
        "_diffrn_radiation_type": "electron",
        "_diffrn_radiation_wavelength": round(float(wavelength), 6),
        "_diffrn_source_voltage": round(float(voltage) / 1000.0, 3),
        "_diffrn_reflns_number": int(reflections["measured"]),
        "_reflns_number_total": int(reflections["total"]),
        "_reflns_number_gt": int(reflections["gt"]),
        "_reflns_threshold_expression": THRESHOLD_EXPRESSION,
        "_refine_ls_structure_factor_coef": "F",
        "_refine_ls_matrix_type": "full",
        "_refine_ls_weighting_scheme": "sigma",
        "_refine_ls_weighting_details": WEIGHTING_DETAILS,
        "_refine_ls_number_reflns": int(report["n_all"]),
        "_refine_ls_number_parameters": int(report["n_parameters_all"]),
        "_refine_ls_number_restraints": int(restraints),
        "_refine_ls_R_factor_gt": _rounded(report["r_obs"], 5),
        "_refine_ls_R_factor_all": _rounded(report["r_all"], 5),
        "_refine_ls_wR_factor_gt": _rounded(report["wr_obs"], 5),
        "_refine_ls_wR_factor_ref": _rounded(report["wr_all"], 5),
        "_refine_ls_goodness_of_fit_ref": _rounded(report["gof_ref"], 4),
        "_refine_ls_shift/su_max": _rounded(shift_su[0], 4),
        "_refine_ls_shift/su_mean": _rounded(shift_su[1], 4),
        "_edkit_thickness_model": thickness_model,
        "_edkit_thickness_mean": round(float(thickness.mean()), 1),
        "_edkit_thickness_min": round(float(thickness.min()), 1),
        "_edkit_thickness_max": round(float(thickness.max()), 1),
        "_edkit_refine_ls_parameters": {
            "group": list(counts),
            "number": list(counts.values()),
        },
        "_refine_special_details": details,
    }
