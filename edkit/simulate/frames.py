"""Simulate every frame of a dataset and compare with its observations; thickness search.

The public face of the simulation layer: :func:`simulate_frames`, :func:`frame_comparison` and
:func:`thickness_search` (from :mod:`edkit.simulate.thickness_search`) over the set-up of
:mod:`edkit.simulate.setup` and the frame stack of :mod:`edkit.simulate.stack` (whose names are
re-exported here for existing imports). Both stream the frames chunk by chunk, so their memory
is that of a chunk, not of the dataset.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit import metrics
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.physics import bloch
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.setup import (
    CELL_MISMATCH,
    DEFAULT_DSG,
    DEFAULT_G_MAX,
    DEFAULT_RSG,
    DEFAULT_SG_MAX,
    DEFAULT_SUB_STEP,
    FrameSetup,
    bucket_size,
    build_frame_setup,
    check_cell,
    klar_selection,
)
from edkit.simulate.stack import (
    WORKING_ELEMENTS,
    FrameArrays,
    Potentials,
    StackConfig,
    frame_intensity_stack,
    potentials,
    reflection_intensities,
    small_rotation,
    stack_config,
)
from edkit.simulate.stream import chunk_layout, stream_frames
from edkit.simulate.thickness_search import DEFAULT_THICKNESS_GRID, thickness_search

__all__ = [
    "CELL_MISMATCH",
    "DEFAULT_DSG",
    "DEFAULT_G_MAX",
    "DEFAULT_RSG",
    "DEFAULT_SG_MAX",
    "DEFAULT_SUB_STEP",
    "DEFAULT_THICKNESS_GRID",
    "WORKING_ELEMENTS",
    "FrameArrays",
    "FrameSetup",
    "Potentials",
    "StackConfig",
    "bucket_size",
    "build_frame_setup",
    "check_cell",
    "chunk_layout",
    "frame_comparison",
    "frame_intensity_stack",
    "klar_selection",
    "potentials",
    "reflection_intensities",
    "simulate_frames",
    "small_rotation",
    "stack_config",
    "stream_frames",
    "thickness_nodes",
    "thickness_search",
]


def thickness_nodes(thickness: Any, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a thickness specification to per-frame nodes and weights, each (n_f, n_t).

    Accepts a scalar (Å), a per-frame array (n_f,), or a distribution ``(values, weights)`` with
    values (n_f, n_t) or (n_t,) and matching weights (normalised per frame).
    """
    if isinstance(thickness, tuple) and len(thickness) == 2:
        values = np.asarray(thickness[0], dtype=float)
        weights = np.asarray(thickness[1], dtype=float)
        values = np.broadcast_to(np.atleast_2d(values), (n_frames, np.atleast_2d(values).shape[-1]))
        weights = np.broadcast_to(np.atleast_2d(weights), values.shape)
    else:
        values = np.asarray(thickness, dtype=float)
        if values.ndim == 0:
            values = np.full((n_frames, 1), float(values))
        elif values.shape == (n_frames,):
            values = values[:, None]
        else:
            raise EdkitError(
                f"thickness of shape {values.shape}: expected a scalar, one value per frame "
                f"({n_frames},), or a (values, weights) distribution"
            )
        weights = np.ones_like(values)
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        raise EdkitError("thickness: expected finite values ≥ 0 Å")
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0)) or np.any(weights.sum(1) <= 0):
        raise EdkitError(
            "thickness weights: expected finite values ≥ 0 with a positive sum per frame"
        )
    return np.ascontiguousarray(values), weights / weights.sum(axis=1, keepdims=True)


def simulate_frames(
    crystal: Crystal,
    dataset: xr.Dataset,
    thickness: Any,
    *,
    g_max: float = DEFAULT_G_MAX,
    sg_max: float = DEFAULT_SG_MAX,
    n_sub: int | None = None,
    mosaicity: float | None = None,
    absorption: float | None = None,
    absorption_method: bloch.AbsorptionMethod = "eig",
    setup: FrameSetup | None = None,
) -> xr.Dataset:
    """Simulate every frame of ``dataset`` and compare with its observed reflections.

    Args:
      crystal: the structure (cell within 1 % of the dataset's).
      dataset: from :func:`edkit.read_pets`.
      thickness: Å: a scalar, one value per frame (n_f,), or a per-frame distribution
        ``(values, weights)`` (each (n_f, n_t)); a distribution costs one eigendecomposition per
        sub-orientation, not one per thickness.
      g_max, sg_max, n_sub, mosaicity: see :func:`build_frame_setup`.
      absorption: κ of the proportional absorption model U' = κU, or None.
      absorption_method: "eig" (exact), "expm" or "perturbative".
      setup: a ready :func:`build_frame_setup` result (skips the planning).

    Returns:
      Dataset on ``refl`` (same order as ``dataset``): ``I_calc`` (rocking-curve integral,
      incident beam = 1 per sub-orientation), ``I_calc_scaled`` (times the frame's closed-form
      scale to I_obs over scored reflections), ``scored`` (Klar selection, simulated), ``S_g``
      (excitation error at the frame centre); on ``frame``: ``scale``, ``n_beams``, ``n_scored``,
      ``r_obs_frame`` (diffBloch per-frame R_obs). attrs: settings, ``frames_without_scored``.
    """
    if setup is None:
        setup = build_frame_setup(
            crystal, dataset, g_max=g_max, sg_max=sg_max, n_sub=n_sub, mosaicity=mosaicity
        )
    if absorption is not None and not (np.isfinite(absorption) and absorption >= 0):
        raise EdkitError(f"absorption = {absorption!r}: expected κ ≥ 0 (U' = κU) or None")
    values, weights = thickness_nodes(thickness, setup.n_frames)
    with jax.enable_x64(True):
        stack = stream_frames(
            structure_params(crystal), structure_tables(crystal), setup, values,
            absorption=absorption, absorption_method=absorption_method,
        )  # fmt: skip
        frame_values = np.einsum("ft,ftn->fn", weights, stack)
        i_calc = np.asarray(reflection_intensities(setup, jnp.asarray(frame_values)))
    if not np.all(np.isfinite(i_calc)):
        raise EdkitError("simulate_frames produced non-finite intensities; check the structure")
    return frame_comparison(setup, dataset, i_calc, values, weights)


def frame_comparison(
    setup: FrameSetup,
    dataset: xr.Dataset,
    i_calc: np.ndarray,
    thickness_values: np.ndarray | None = None,
    thickness_weights: np.ndarray | None = None,
) -> xr.Dataset:
    """Scale calculated intensities per frame and assemble the comparison Dataset."""
    i_obs = dataset["I_obs"].values
    sigma = dataset["sigma"].values
    scored = setup.scored
    n_frames = setup.n_frames
    scored_weights = np.where(scored, 1.0 / np.maximum(sigma, 1e-12), 0.0)
    scale = metrics.scale_per_frame(i_obs, i_calc, setup.refl_frame, n_frames, scored_weights)
    i_scaled = i_calc * scale[setup.refl_frame]
    n_scored = np.bincount(setup.refl_frame[scored], minlength=n_frames)
    r_frame = metrics.frame_r_obs(
        i_obs[scored], sigma[scored], i_calc[scored], setup.refl_frame[scored], n_frames
    )
    result = xr.Dataset(
        {
            "I_calc": (
                "refl",
                i_calc,
                {"units": "1", "long_name": "calculated intensity (unscaled)"},
            ),
            "I_calc_scaled": (
                "refl",
                i_scaled,
                {"units": "1", "long_name": "calculated intensity on the scale of I_obs"},
            ),
            "scored": ("refl", scored, {"long_name": "scored (Klar selection, simulated)"}),
            "S_g": (
                "refl",
                setup.excitation_error,
                {"units": "1/angstrom", "long_name": "S_g at frame centre"},
            ),
            "scale": ("frame", scale, {"units": "1", "long_name": "frame scale"}),
            "n_beams": ("frame", setup.n_beams, {"long_name": "beams simulated"}),
            "n_scored": ("frame", n_scored, {"long_name": "scored reflections"}),
            "r_obs_frame": (
                "frame",
                r_frame,
                {"units": "1", "long_name": "per-frame R_obs on |F| (diffBloch convention)"},
            ),
        },
        coords={"frame": ("frame", setup.frame, {"long_name": "PETS frame id"})},
        attrs={
            **{k: v for k, v in setup.settings.items() if v is not None},
            "voltage": setup.voltage,
            "wave_number": setup.wave_number,
            "frames_without_scored": " ".join(str(f) for f in setup.frame[n_scored == 0]),
        },
    )
    if "alpha" in dataset:  # the goniometer angle of each frame, for plots over the rotation
        alpha = dataset["alpha"].sel(frame=setup.frame).values
        result = result.assign_coords(
            alpha=("frame", alpha, {"units": "degree", "long_name": "goniometer tilt α"})
        )
    if setup.refl_g_lab is not None:  # the spots' places in the detector plane
        for axis, name in ((0, "detector_x"), (1, "detector_y")):
            result[name] = (
                "refl",
                np.asarray(setup.refl_g_lab[:, axis]),
                {"units": "1/angstrom", "long_name": f"g_{'xy'[axis]} in the detector plane"},
            )
    if thickness_values is not None:
        mean_t = np.sum(thickness_values * thickness_weights, axis=1)
        result["thickness"] = (
            "frame",
            mean_t,
            {"units": "angstrom", "long_name": "mean thickness"},
        )
    return result
