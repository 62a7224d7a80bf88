"""Figures of merit (``edkit.metrics``): Jana2020 R-factors on |F| and diffBloch's per-frame R.

Re-exported from :mod:`edkit.refine.metrics`; see there for the conventions.
"""

from edkit.refine.metrics import (
    frame_r_obs,
    frame_scale,
    frame_wr2,
    intensity_wr2_loss,
    jana_figures,
    jana_wr_loss,
    mean_frame_r_obs,
    scale_per_frame,
)

__all__ = [
    "frame_r_obs",
    "frame_scale",
    "frame_wr2",
    "intensity_wr2_loss",
    "jana_figures",
    "jana_wr_loss",
    "mean_frame_r_obs",
    "scale_per_frame",
]
