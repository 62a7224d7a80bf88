"""The refinement panel's live curves: which figures, and how they are drawn."""

from typing import Any

import holoviews as hv

#: Columns of the curve stream: the step and the figures plotted against it.
CURVES = {
    "loss": "loss",
    "r_obs_mean_frame": "R_obs (mean per frame)",
    "wr_obs": "wR_obs",
}


def refinement_curves(data: Any) -> hv.Overlay:
    """The panel's curves: each of :data:`CURVES` against ``step`` (``data``: the curve
    stream's columns), one Bokeh overlay."""
    step = hv.Dimension("step")
    curves = [
        hv.Curve(data, step, hv.Dimension(name, label="figure of merit"), label=label).opts(
            line_width=2, tools=["hover"], backend="bokeh"
        )
        for name, label in CURVES.items()
    ]
    return hv.Overlay(curves).opts(
        hv.opts.Overlay(
            width=520,
            height=300,
            legend_position="top_right",
            title="refinement",
            backend="bokeh",
        )
    )
