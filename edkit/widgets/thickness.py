"""``ThicknessView``: the learned thickness against the goniometer angle, and the thickness map."""

from typing import Any

import holoviews as hv
import ipywidgets as widgets
import numpy as np

from edkit.refine.refinement import Refinement
from edkit.widgets.bridge import HoloViewsWidget, extension

__all__ = ["ThicknessView"]

ALPHA = hv.Dimension("alpha", label="α", unit="°")
THICKNESS = hv.Dimension("thickness", label="thickness", unit="Å")
SPREAD = hv.Dimension("spread", label="spread", unit="Å")
GRID = hv.Dimension("grid_search", label="grid search", unit="Å")
MAP_X = hv.Dimension("x", label="x (map units)")
MAP_Y = hv.Dimension("y", label="y (map units)")


class ThicknessView:
    """The refinement's thickness model, live: mean thickness per frame against α with its
    spread (the model's thickness distribution within a frame) and the per-frame grid-search
    values the networks started from; for ``thickness="map-net"`` also the learned map h(x, y).

    Args:
      refinement: an :class:`edkit.Refinement`.
      map_resolution: pixels per side of the thickness map.

    Attributes:
      widget: the top-level ipywidgets container.
      plot: the :class:`~edkit.widgets.bridge.HoloViewsWidget` with the plots.
      stream: ``hv.streams.Pipe`` of the profile: dict of arrays over frames sorted by α —
        ``alpha`` (°), ``thickness``, ``spread``, ``grid_search`` (Å).
      map_stream: ``hv.streams.Pipe`` of the map (``x`` (res,), ``y`` (res,), ``h`` (res, res)
        in Å) or None when the model has no map.
      summary: ipywidgets.HTML with the model and the range of the learned thickness.
    """

    def __init__(self, refinement: Refinement, *, map_resolution: int = 32) -> None:
        extension()
        self.refinement = refinement
        self.map_resolution = int(map_resolution)
        self.stream = hv.streams.Pipe(data=self._profile_data())
        profile = hv.DynamicMap(self._profile, streams=[self.stream])
        thickness_map = refinement.thickness_map(self.map_resolution)
        self.map_stream: hv.streams.Pipe | None = None
        layout: Any = profile
        if thickness_map is not None:
            self.map_stream = hv.streams.Pipe(data=_map_data(thickness_map))
            layout = profile + hv.DynamicMap(self._map, streams=[self.map_stream])
        self.plot = HoloViewsWidget(layout, css_class="edkit-thickness-plot")
        self.summary = widgets.HTML(self._summary())
        self.widget = widgets.VBox([self.summary, self.plot])
        self.widget.add_class("edkit-thickness")

    # ------------------------------------------------------------------------------ data
    def _profile_data(self) -> dict[str, np.ndarray]:
        thickness = self.refinement.thickness
        alpha = np.asarray(thickness["alpha"].values, dtype=float)
        order = np.argsort(alpha, kind="stable")
        return {
            "alpha": alpha[order],
            "thickness": np.asarray(thickness.values, dtype=float)[order],
            "spread": np.asarray(thickness["spread"].values, dtype=float)[order],
            "grid_search": np.asarray(thickness["grid_search"].values, dtype=float)[order],
        }

    def _summary(self) -> str:
        data = self.stream.data
        t = data["thickness"]
        return (
            f"<span class='edkit-thickness-summary'>thickness model "
            f"<b>{self.refinement.options.thickness}</b>: {np.min(t):.0f}–{np.max(t):.0f} Å "
            f"(mean {np.mean(t):.0f} Å) over {t.size} frames</span>"
        )

    # ------------------------------------------------------------------------------ plots
    @staticmethod
    def _profile(data: dict[str, np.ndarray]) -> hv.Overlay:
        spread = hv.Spread(data, ALPHA, [THICKNESS, SPREAD], label="spread").opts(
            alpha=0.25, line_alpha=0, backend="bokeh"
        )
        learned = hv.Curve(data, ALPHA, THICKNESS, label="learned").opts(backend="bokeh")
        points = hv.Scatter(data, ALPHA, THICKNESS, label="learned").opts(size=5, backend="bokeh")
        grid = hv.Scatter(data, ALPHA, GRID, label="grid search").opts(
            marker="x", size=9, color="gray", backend="bokeh"
        )
        return (spread * learned * points * grid).opts(
            hv.opts.Overlay(
                width=460,
                height=300,
                legend_position="top_left",
                title="thickness per frame",
                backend="bokeh",
            )
        )

    @staticmethod
    def _map(data: dict[str, np.ndarray]) -> hv.Image:
        x, y, h = data["x"], data["y"], data["h"]
        return hv.Image((x, y, h), [MAP_X, MAP_Y], THICKNESS).opts(
            cmap="viridis",
            colorbar=True,
            width=380,
            height=300,
            title="thickness map",
            tools=["hover"],
            backend="bokeh",
        )

    # ------------------------------------------------------------------------------ update
    def update(self) -> None:
        """Re-read the refinement's thickness and push it to the plots (through the streams)."""
        self.show(self.snapshot())

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """The refinement's thickness now: the profile (see ``stream``) and the map's arrays
        (see ``map_stream``; None without a map). Reads the refinement, touches no widget."""
        thickness_map = None
        if self.map_stream is not None:
            thickness_map = self.refinement.thickness_map(self.map_resolution)
        return self._profile_data(), None if thickness_map is None else _map_data(thickness_map)

    def show(self, snapshot: tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]) -> None:
        """Push a :meth:`snapshot` to the plots and the summary (on the kernel's thread)."""
        profile, thickness_map = snapshot
        self.stream.send(profile)
        if self.map_stream is not None and thickness_map is not None:
            self.map_stream.send(thickness_map)
        self.summary.value = self._summary()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _map_data(thickness_map: Any) -> dict[str, np.ndarray]:
    return {
        "x": np.asarray(thickness_map["x"].values, dtype=float),
        "y": np.asarray(thickness_map["y"].values, dtype=float),
        "h": np.asarray(thickness_map.values, dtype=float),
    }
