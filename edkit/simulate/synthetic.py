"""Synthetic 3D-ED datasets: a generated rotation geometry and Poisson-noisy simulated frames.

:func:`rotation_series` makes the frames of an ideal continuous-rotation experiment (no
reflections yet) in the layout of :func:`edkit.io.pets.read_pets`; :func:`make_dataset` simulates
every frame of a geometry with a known structure and thickness, adds Poisson noise and returns a
dataset that :func:`edkit.io.pets.write_pets` writes and ``read_pets`` reads back identically
(except for the ``synthetic_*`` attrs, which only netCDF keeps). The truth (structure source,
thickness per frame, counts, seed, simulation settings) is recorded in netCDF-safe attrs, so the
same settings re-simulate the noiseless intensities exactly.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit import schema
from edkit.constants import electron_wavelength, voltage_from_wavelength
from edkit.crystal import Crystal, real_basis_of
from edkit.errors import EdkitError
from edkit.physics.geometry import frame_orientations
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import (
    DEFAULT_DSG,
    DEFAULT_G_MAX,
    DEFAULT_RSG,
    DEFAULT_SG_MAX,
    build_frame_setup,
    frame_intensity_stack,
    klar_selection,
    thickness_nodes,
)

__all__ = ["make_dataset", "rotation_series"]

#: Default recording threshold of :func:`make_dataset`: reflections expected below this many
#: counts (before noise) are not recorded, as a detector floor would lose them.
DEFAULT_MIN_INTENSITY = 1.0
_PROVENANCE = ("source_file", "read_notes")


def _empty_reflections() -> dict[str, tuple]:
    ints = np.zeros(0, dtype=np.int64)
    floats = np.zeros(0, dtype=np.float64)
    return {
        "h": ((schema.REFL,), ints),
        "k": ((schema.REFL,), ints.copy()),
        "l": ((schema.REFL,), ints.copy()),
        "frame_id": ((schema.REFL,), ints.copy()),
        "I_obs": ((schema.REFL,), floats),
        "sigma": ((schema.REFL,), floats.copy()),
    }


def rotation_series(
    dataset_like: xr.Dataset | None = None,
    *,
    cell: Any = None,
    ub: Any = None,
    alpha_start: float | None = None,
    alpha_step: float | None = None,
    n_frames: int | None = None,
    semiangle: float | None = None,
    voltage: float | None = None,
    rotation_axis_position: float | None = None,
    mosaicity: float | None = None,
    dstarmax: float | None = None,
) -> xr.Dataset:
    """The frames of an ideal continuous-rotation dataset, in the layout of ``read_pets``.

    Frame i (id i + 1) sits at α_i = alpha_start + i·alpha_step, β = ω = 0; its zone axis is the
    real-space direction that :func:`edkit.physics.geometry.frame_orientations` maps to lab +z,
    O_iᵀ ẑ written in the a, b, c basis and normalised so that its largest |component| is 1
    (so ``zone_axes_lab`` returns (0, 0, 1) for every frame). The ``refl`` dimension is present
    and empty; :func:`make_dataset` fills it.

    Every keyword left as None comes from ``dataset_like`` (a ``read_pets`` dataset: its cell, UB,
    voltage, rotation axis position, mosaicity, d*max, first α, median α step, frame count and
    median semi-angle), else from the defaults below.

    Args:
      dataset_like: a dataset to borrow the experiment from, or None.
      cell: (a, b, c, α, β, γ), Å and degrees. Required without ``dataset_like``.
      ub: PETS UB, g_lab = UB @ hkl at zero goniometer angles, Å⁻¹, (3, 3); default B = inv(real)
        (crystal-Cartesian axes = lab axes: a along x).
      alpha_start: α of the first frame, degrees.
      alpha_step: α increment per frame, degrees (may be negative).
      n_frames: number of frames, ≥ 1.
      semiangle: rocking semi-angle θ of every frame, degrees, > 0.
      voltage: accelerating voltage, V (default 200 kV). The dataset stores the wavelength and
        ``voltage_from_wavelength`` of it, as ``read_pets`` would.
      rotation_axis_position: φ, degrees (default 0).
      mosaicity: Gaussian mosaic spread, degrees (default 0).
      dstarmax: resolution limit, Å⁻¹ (default ``edkit.simulate.frames.DEFAULT_G_MAX``).

    Returns:
      Dataset with dims frame, uvw, ub_row, ub_col and an empty refl; attrs
      ``geometry = "continuous rotation"``.

    Raises:
      EdkitError: a required value is missing, or a value is not usable (message names it).
    """
    given = {
        "cell": cell,
        "ub": ub,
        "alpha_start": alpha_start,
        "alpha_step": alpha_step,
        "n_frames": n_frames,
        "semiangle": semiangle,
        "voltage": voltage,
        "rotation_axis_position": rotation_axis_position,
        "mosaicity": mosaicity,
        "dstarmax": dstarmax,
    }
    like = dataset_like
    if like is not None:
        alphas = np.asarray(like["alpha"].values, dtype=float)
        defaults: dict[str, Any] = {
            "cell": [float(like[name]) for name in schema.CELL_VARIABLES],
            "ub": np.asarray(like["UB"].values, dtype=float),
            "alpha_start": float(alphas[0]),
            "alpha_step": float(np.median(np.diff(alphas))) if alphas.size > 1 else 1.0,
            "n_frames": int(alphas.size),
            "semiangle": float(np.median(like["semiangle"].values)),
            "voltage": float(like["voltage"]),
            "rotation_axis_position": float(like["rotation_axis_position"]),
            "mosaicity": float(like["mosaicity"]) if "mosaicity" in like else 0.0,
            "dstarmax": float(like["dstarmax"]) if "dstarmax" in like else DEFAULT_G_MAX,
        }
    else:  # None for ub means B itself; the four geometry numbers and the cell are required
        defaults = {
            "ub": None,
            "voltage": 200e3,
            "rotation_axis_position": 0.0,
            "mosaicity": 0.0,
            "dstarmax": DEFAULT_G_MAX,
        }
    value: dict[str, Any] = {}
    for name, v in given.items():
        if v is not None:
            value[name] = v
        elif name in defaults:
            value[name] = defaults[name]
        else:
            raise EdkitError(
                f"rotation_series: {name} is required (pass it, or a dataset_like to take it from)"
            )

    cell_values = np.asarray(value["cell"], dtype=float)
    if cell_values.shape != (6,):
        raise EdkitError(
            f"rotation_series: cell has shape {cell_values.shape}; expected (a, b, c, α, β, γ)"
        )
    real = real_basis_of(cell_values)  # validates the cell
    ub_matrix = np.linalg.inv(real) if value["ub"] is None else np.asarray(value["ub"], float)
    if ub_matrix.shape != (3, 3) or not np.all(np.isfinite(ub_matrix)):
        raise EdkitError(f"rotation_series: ub = {value['ub']!r}; expected a finite (3, 3) matrix")
    if not abs(np.linalg.det(ub_matrix)) > 1e-12 * np.abs(ub_matrix).max() ** 3:
        raise EdkitError("rotation_series: ub is singular; expected UB = U·B (Å⁻¹)")
    n = value["n_frames"]
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise EdkitError(f"rotation_series: n_frames = {n!r}; expected an integer ≥ 1")
    scalars = {}
    for name in (
        "alpha_start",
        "alpha_step",
        "semiangle",
        "voltage",
        "rotation_axis_position",
        "mosaicity",
        "dstarmax",
    ):
        x = float(value[name])
        if not np.isfinite(x):
            raise EdkitError(f"rotation_series: {name} = {value[name]!r}; expected a finite number")
        scalars[name] = x
    for name in ("semiangle", "voltage", "dstarmax"):
        if scalars[name] <= 0:
            raise EdkitError(f"rotation_series: {name} = {scalars[name]!r}; expected > 0")
    if scalars["mosaicity"] < 0:
        raise EdkitError(f"rotation_series: mosaicity = {scalars['mosaicity']!r}; expected ≥ 0")

    n = int(n)
    wavelength = electron_wavelength(scalars["voltage"])
    alpha = scalars["alpha_start"] + scalars["alpha_step"] * np.arange(n, dtype=float)
    data_vars: dict[str, tuple] = {
        **_empty_reflections(),
        "alpha": ((schema.FRAME,), alpha),
        "beta": ((schema.FRAME,), np.zeros(n)),
        "omega": ((schema.FRAME,), np.zeros(n)),
        "zone_axis": ((schema.FRAME, schema.UVW), np.zeros((n, 3))),
        "semiangle": ((schema.FRAME,), np.full(n, scalars["semiangle"])),
        "pets_scale": ((schema.FRAME,), np.ones(n)),
        "wavelength": ((), np.float64(wavelength)),
        "voltage": ((), np.float64(voltage_from_wavelength(wavelength))),
        **{
            name: ((), np.float64(v))
            for name, v in zip(schema.CELL_VARIABLES, cell_values, strict=True)
        },
        "UB": ((schema.UB_ROW, schema.UB_COL), ub_matrix),
        "dstarmax": ((), np.float64(scalars["dstarmax"])),
        "mosaicity": ((), np.float64(scalars["mosaicity"])),
        "rotation_axis_position": ((), np.float64(scalars["rotation_axis_position"])),
    }
    dataset = xr.Dataset(
        data_vars,
        coords={
            "frame": ((schema.FRAME,), np.arange(1, n + 1, dtype=np.int64)),
            "uvw": ((schema.UVW,), ["u", "v", "w"]),
        },
        attrs={"geometry": "continuous rotation"},
    )
    # Zone axis: the crystal direction d = O_iᵀ ẑ, written as u a + v b + w c (d = realᵀ uvw).
    rotations = frame_orientations(dataset).values
    directions = rotations[:, 2, :]  # rows of O_iᵀ ẑ, i.e. the third row of each O_i
    uvw = np.linalg.solve(real.T, directions.T).T
    uvw /= np.max(np.abs(uvw), axis=1, keepdims=True)
    dataset["zone_axis"] = ((schema.FRAME, schema.UVW), uvw)
    return schema.apply_attrs(dataset)


def _frame_geometry(geometry: xr.Dataset) -> xr.Dataset:
    """``geometry`` without its reflections (an empty refl dimension) and provenance attrs."""
    frames_only = geometry.drop_dims(schema.REFL) if schema.REFL in geometry.dims else geometry
    frames_only = frames_only.drop_vars(
        [v for v in ("h", "k", "l", "frame_id", "I_obs", "sigma") if v in frames_only.variables]
    )
    frames_only = frames_only.assign(_empty_reflections())
    frames_only.attrs = {k: v for k, v in geometry.attrs.items() if k not in _PROVENANCE}
    return schema.apply_attrs(frames_only)


def _thickness_spec(thickness_model: Any, alpha: np.ndarray) -> tuple[Any, str]:
    """The model as ``thickness_nodes`` accepts it, and a one-line description."""
    if callable(thickness_model):
        name = getattr(thickness_model, "__name__", type(thickness_model).__name__)
        return thickness_model(alpha.copy()), f"callable {name}(alpha in degrees)"
    if isinstance(thickness_model, tuple) and len(thickness_model) == 2:
        return thickness_model, "distribution (values, weights)"
    if np.ndim(thickness_model) == 0:
        return thickness_model, f"constant {float(thickness_model)!r} angstrom"
    return thickness_model, "per-frame values"


def make_dataset(
    crystal: Crystal,
    geometry: xr.Dataset,
    thickness_model: float | np.ndarray | Callable[[np.ndarray], Any] | tuple,
    *,
    counts: float = 1e6,
    seed: int = 0,
    g_max: float = DEFAULT_G_MAX,
    sg_max: float = DEFAULT_SG_MAX,
    n_sub: int | None = None,
    absorption: float | None = None,
    min_intensity: float = DEFAULT_MIN_INTENSITY,
    rsg: float = DEFAULT_RSG,
    dsg: float = DEFAULT_DSG,
) -> xr.Dataset:
    """Simulate every frame of ``geometry`` with ``crystal``, add Poisson noise: a dataset.

    Simulation: the beams of each frame and its rocking curve exactly as
    :func:`~edkit.simulate.frames.build_frame_setup` plans them (``g_max``, ``sg_max``,
    ``n_sub``, the geometry's mosaicity), intensities from
    :func:`edkit.simulate.frames.frame_intensity_stack`.

    Reflections recorded: every simulated non-000 beam of a frame that passes Klar's test at the
    frame centre (|S_g| < rsg·ΔS and ΔS − |S_g| > dsg, ΔS = |(g_y, g_z)|·θ; the same test and
    numbers ``build_frame_setup`` applies), and whose expected count is at least
    ``min_intensity``. So every recorded reflection is scored when the written file is read back
    and planned with the same settings, and each is a fully recorded rocking curve. Order: by
    frame, then by |g|.

    Counts: intensities are scaled so that the brightest Klar-passing beam of the whole dataset
    expects ``counts`` counts; I_obs is a Poisson draw (``numpy.random.default_rng(seed)``) and
    σ = √max(I_obs, 1). One scale for all frames (``pets_scale`` stays 1).

    Args:
      crystal: the true structure; its cell must match the geometry's within 1 %.
      geometry: a ``read_pets`` or :func:`rotation_series` dataset; its reflections are ignored.
      thickness_model: Å: a scalar, one value per frame (n_f,), a callable
        f(alpha in degrees, (n_f,)) returning either of those (or a distribution), or a
        distribution ``(values, weights)`` as :func:`edkit.simulate.frames.thickness_nodes` accepts.
      counts: expected counts of the brightest reflection, > 0.
      seed: seed of the noise generator.
      g_max, sg_max, n_sub: beam and rocking-curve settings (``build_frame_setup``).
      absorption: κ of the proportional absorption model U' = κU, or None.
      min_intensity: expected counts below which a reflection is not recorded (≥ 0).
      rsg, dsg: Klar selection parameters.

    Returns:
      Dataset in the ``read_pets`` layout (refl variables h, k, l, frame_id, I_obs, sigma;
      ``dstarmax`` = g_max). attrs: the geometry's non-provenance attrs, ``comments`` (a
      ``# edkit synthetic …`` line that survives ``write_pets``) and the truth:
      ``synthetic_structure`` (str), ``synthetic_thickness`` (mean per frame, Å, float64 (n_f,)),
      ``synthetic_thickness_std`` (spread per frame, Å, (n_f,)), ``synthetic_thickness_model``
      (str), ``synthetic_counts``, ``synthetic_seed``, ``synthetic_g_max``, ``synthetic_sg_max``,
      ``synthetic_n_sub``, ``synthetic_mosaicity``, ``synthetic_rsg``, ``synthetic_dsg``,
      ``synthetic_absorption`` (κ; 0 for none), ``synthetic_min_intensity``,
      ``synthetic_scale`` (counts per unit calculated intensity).

    Raises:
      EdkitError: bad counts, thickness, absorption or threshold; a cell mismatch; no reflection
        passes the selection.
    """
    if not (np.isfinite(counts) and counts > 0):
        raise EdkitError(f"make_dataset: counts = {counts!r}; expected a positive number")
    if not (np.isfinite(min_intensity) and min_intensity >= 0):
        raise EdkitError(f"make_dataset: min_intensity = {min_intensity!r}; expected ≥ 0 counts")
    if absorption is not None and not (np.isfinite(absorption) and absorption >= 0):
        raise EdkitError(f"make_dataset: absorption = {absorption!r}; expected κ ≥ 0 or None")
    frames_only = _frame_geometry(geometry)
    setup = build_frame_setup(
        crystal, frames_only, g_max=g_max, sg_max=sg_max, n_sub=n_sub, rsg=rsg, dsg=dsg
    )
    alpha = np.asarray(frames_only["alpha"].values, dtype=float)
    spec, description = _thickness_spec(thickness_model, alpha)
    values, weights = thickness_nodes(spec, setup.n_frames)

    tables = structure_tables(crystal)
    with jax.enable_x64(True):
        stack = jax.jit(
            lambda p, t: frame_intensity_stack(p, tables, setup, t, absorption=absorption)
        )(structure_params(crystal), jnp.asarray(values))
        intensity = np.asarray(jnp.einsum("ft,ftn->fn", jnp.asarray(weights), stack))
    if not np.all(np.isfinite(intensity)):
        raise EdkitError("make_dataset: the simulation gave non-finite intensities")

    # Klar's test at the frame centre, as build_frame_setup computes it for observed reflections.
    reciprocal = np.asarray(crystal.reciprocal_basis)
    semiangles = np.deg2rad(frames_only["semiangle"].values)
    candidate = setup.valid.copy()
    candidate[:, 0] = False  # 000
    frame_pos, beam_pos = np.nonzero(candidate)
    hkl = setup.hkl[frame_pos, beam_pos]
    g_lab = np.einsum("rij,rj->ri", setup.rotations[frame_pos], hkl @ reciprocal)
    _, klar = klar_selection(g_lab, semiangles[frame_pos], setup.wave_number, rsg=rsg, dsg=dsg)
    if not np.any(klar):
        raise EdkitError(
            "make_dataset: no simulated beam passes Klar's selection; widen the semi-angle or g_max"
        )
    ideal = intensity[frame_pos, beam_pos]
    scale = counts / float(np.max(ideal[klar]))
    expected = scale * ideal
    keep = klar & (expected >= min_intensity)
    if not np.any(keep):
        raise EdkitError(
            f"make_dataset: no reflection expects ≥ min_intensity = {min_intensity!r} counts"
        )
    rng = np.random.default_rng(seed)
    i_obs = rng.poisson(expected[keep]).astype(np.float64)
    sigma = np.sqrt(np.maximum(i_obs, 1.0))

    dataset = frames_only.drop_vars(["h", "k", "l", "frame_id", "I_obs", "sigma"])
    frame_ids = setup.frame[frame_pos[keep]].astype(np.int64)
    hkl = hkl[keep].astype(np.int64)
    dataset = dataset.assign(
        {
            "h": ((schema.REFL,), hkl[:, 0]),
            "k": ((schema.REFL,), hkl[:, 1]),
            "l": ((schema.REFL,), hkl[:, 2]),
            "frame_id": ((schema.REFL,), frame_ids),
            "I_obs": ((schema.REFL,), i_obs),
            "sigma": ((schema.REFL,), sigma),
            "dstarmax": ((), np.float64(g_max)),
        }
    )
    mean_t = np.sum(values * weights, axis=1)
    std_t = np.sqrt(np.sum(weights * (values - mean_t[:, None]) ** 2, axis=1))
    source = crystal.source or "crystal"
    note = (
        f"# edkit synthetic: structure {source}, thickness {description}, counts {counts:g}, "
        f"seed {seed}, g_max {g_max:g}, sg_max {sg_max:g}, n_sub {setup.settings['n_sub']}"
    )
    comments = str(dataset.attrs.get("comments", ""))
    dataset.attrs.update(
        {
            "comments": note + ("\n" + comments if comments else ""),
            "synthetic_structure": source,
            "synthetic_thickness": mean_t,
            "synthetic_thickness_std": std_t,
            "synthetic_thickness_model": description,
            "synthetic_counts": float(counts),
            "synthetic_seed": int(seed),
            "synthetic_g_max": float(g_max),
            "synthetic_sg_max": float(sg_max),
            "synthetic_n_sub": int(setup.settings["n_sub"]),
            "synthetic_mosaicity": float(setup.settings["mosaicity"]),
            "synthetic_rsg": float(rsg),
            "synthetic_dsg": float(dsg),
            "synthetic_absorption": float(absorption or 0.0),
            "synthetic_min_intensity": float(min_intensity),
            "synthetic_scale": float(scale),
        }
    )
    return schema.apply_attrs(dataset)
