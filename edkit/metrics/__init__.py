"""Figures of merit (numpy, for reports) and differentiable losses (JAX, for refinement).

Two conventions live here, and their numbers must never be compared with each other
(science.md §7):

* **Jana2020** figures on |F| (:func:`jana_figures`, :func:`jana_wr_loss`): R_obs, R_all,
  wR_obs, wR_all, GoF with Jana's weights ``w = 1/(σ_F² + (0.01 F_o)²)``.
* **diffBloch** per-frame figures: the mean over frames of a per-frame R_obs on |F|
  (:func:`frame_r_obs`, :func:`mean_frame_r_obs`) and the per-frame intensity wR2
  (:func:`frame_wr2`, :func:`intensity_wr2_loss`), each frame scaled independently.

Every R value is a fraction (0.05 means 5 %), never a percentage. Intensities are in the
arbitrary units of the data file; structure-factor amplitudes are their square roots.

The reporting functions take numpy (or array-like) inputs, compute in float64, raise
:class:`~edkit.errors.EdkitError` for unusable inputs, and return NaN (never raise, never warn)
where a ratio has nothing to sum over. The losses are pure ``jax.numpy`` kernels: they trust their
inputs, work under ``jax.jit`` (with ``n_frames`` static) and ``jax.grad``, and keep gradients
finite where a calculated intensity is exactly zero (the double-``where`` pattern of optax's
``safe_norm``, style.md §2).

The numpy figures live in :mod:`edkit.metrics._report`, the JAX losses in ``_losses``; import
them from ``edkit.metrics``.
"""

from edkit.metrics._losses import (
    intensity_wr2_loss,
    jana_residuals,
    jana_wr_loss,
    wr2_frame_terms,
)
from edkit.metrics._losses import jana_weights as jana_weights
from edkit.metrics._report import (
    JANA_INSTABILITY,
    OBS_SIGMA_CUT,
    WEAK_SIGMA_CUT,
    frame_r_obs,
    frame_scale,
    frame_wr2,
    jana_figures,
    jana_scale_per_frame,
    mean_frame_r_obs,
    scale_per_frame,
)
from edkit.metrics._report import (
    _jana_weights_np as _jana_weights_np,  # the refinement reuses the numpy weights
)

__all__ = [
    "JANA_INSTABILITY",
    "OBS_SIGMA_CUT",
    "WEAK_SIGMA_CUT",
    "frame_r_obs",
    "frame_scale",
    "frame_wr2",
    "intensity_wr2_loss",
    "jana_figures",
    "jana_residuals",
    "jana_scale_per_frame",
    "jana_wr_loss",
    "mean_frame_r_obs",
    "scale_per_frame",
    "wr2_frame_terms",
]
