"""``FrameComparison``: measured and simulated spots of one frame, side by side."""

import html
from collections.abc import Callable
from typing import Any

import holoviews as hv
import ipywidgets as widgets
import numpy as np
import pandas as pd

from edkit.errors import EdkitError
from edkit.physics.geometry import frame_orientations
from edkit.refine.refinement import Refinement
from edkit.widgets.bridge import HoloViewsWidget, extension, refinement_lock

__all__ = ["FrameComparison", "detector_coordinates"]

X = hv.Dimension("x", label="g_x", unit="Å⁻¹")
Y = hv.Dimension("y", label="g_y", unit="Å⁻¹")
I_OBS = hv.Dimension("I_obs", label="I_obs")
I_CALC = hv.Dimension("I_calc", label="I_calc (scaled)")
SIGMA = hv.Dimension("sigma", label="σ(I)")
HOVER = ["h", "k", "l", "I_obs", "I_calc", "sigma", "S_g"]
COLORS = {"scored": "#1f5fa8", "not scored": "#a0a0a0"}
SIMULATED_COLORS = {"scored": "#c0392b", "not scored": "#a0a0a0"}


def detector_coordinates(refinement: Refinement) -> np.ndarray:
    """Lab-frame reciprocal vectors of every reflection at its frame's orientation, Å⁻¹.

    g_lab = O_f B hkl with O_f from :func:`edkit.frame_orientations` (crystal → lab; the zone
    axis along +z, the beam along −z) and B the crystal's reciprocal basis: (x, y) is the spot's
    position in the detector plane, z ≈ 0 for a reflection in diffraction condition.

    Returns:
      (n_refl, 3).
    """
    dataset = refinement.dataset
    rotations = frame_orientations(dataset).values  # (n_f, 3, 3)
    hkl = np.stack([dataset[n].values for n in ("h", "k", "l")], axis=1).astype(float)
    g_cart = hkl @ np.asarray(refinement.start_crystal.reciprocal_basis)
    frames = refinement.setup.refl_frame
    return np.einsum("rij,rj->ri", rotations[frames], g_cart)


class FrameComparison:
    """Measured against simulated spots, frame by frame.

    Left: the measured spots of the frame in the detector plane (circle area ∝ I_obs), over the
    raw image when one is given; middle: the simulated ones (area ∝ I_calc on the frame's
    scale) at the same positions; right: I_obs against I_calc with σ bars and the frame's R_obs
    in the title; below: the worst-fitting reflections (largest |I_obs − I_calc|/σ).

    Args:
      refinement: an :class:`edkit.Refinement`; intensities from ``refinement.simulated()``.
      image: optional raw data underneath the measured spots: one 2-D array (rows top to
        bottom) for every frame, an array (n_frames, ny, nx), or ``frame_id -> 2-D array``.
      extent: (left, bottom, right, top) of the image in the detector-plane coordinates of
        :func:`detector_coordinates`, Å⁻¹; required with ``image``.
      n_worst: rows of the worst-reflections table.
      spot_size: diameter (screen pixels) of the strongest spot of a frame.

    Attributes:
      widget: the top-level ipywidgets container.
      frame_slider: ipywidgets.IntSlider over frame positions 0 … n_frames − 1.
      stream: ``hv.streams.Pipe`` whose data is the frame shown (see :meth:`frame_data`).
      plot: the :class:`~edkit.widgets.bridge.HoloViewsWidget` with the three plots.
      worst: ipywidgets.HTML with ``<table class="edkit-worst-table">``.
      simulation: the ``refinement.simulated()`` Dataset shown (refreshed by :meth:`update`).
    """

    def __init__(
        self,
        refinement: Refinement,
        *,
        image: "np.ndarray | Callable[[int], np.ndarray] | None" = None,
        extent: tuple[float, float, float, float] | None = None,
        n_worst: int = 10,
        spot_size: float = 30.0,
    ) -> None:
        extension()
        if image is not None and extent is None:
            raise EdkitError("FrameComparison: give extent=(left, bottom, right, top) in Å⁻¹")
        self.refinement = refinement
        self.n_worst = int(n_worst)
        self.spot_size = float(spot_size)
        self._image = image
        self._extent = None if extent is None else tuple(float(v) for v in extent)
        self.positions = detector_coordinates(refinement)
        self.simulation = refinement.simulated()
        n_frames = refinement.setup.n_frames
        self.frame_slider = widgets.IntSlider(
            value=0, min=0, max=max(n_frames - 1, 0), description="frame", continuous_update=True
        )
        self.frame_slider.add_class("edkit-frame-slider")
        self.frame_label = widgets.HTML()
        self.stream = hv.streams.Pipe(data=self.frame_data(0))
        measured: Any = hv.DynamicMap(self._measured, streams=[self.stream])
        if image is not None:
            self.image_stream: hv.streams.Pipe | None = hv.streams.Pipe(data=self._frame_image(0))
            measured = hv.DynamicMap(self._raw, streams=[self.image_stream]) * measured
        else:
            self.image_stream = None
        simulated = hv.DynamicMap(self._simulated, streams=[self.stream])
        scatter = hv.DynamicMap(self._scatter, streams=[self.stream])
        self.plot = HoloViewsWidget(
            (measured + simulated + scatter).cols(3), css_class="edkit-frame-plot"
        )
        self.worst = widgets.HTML()
        self.worst.add_class("edkit-worst-box")
        self.frame_slider.observe(lambda change: self.show(change["new"]), names="value")
        self.widget = widgets.VBox(
            [widgets.HBox([self.frame_slider, self.frame_label]), self.plot, self.worst]
        )
        self.widget.add_class("edkit-frame-comparison")
        self._refresh_text(self.stream.data)

    # ------------------------------------------------------------------------------ data
    def frame_data(self, position: int) -> dict[str, Any]:
        """Everything shown for the frame at ``position`` (0-based).

        Returns:
          dict with "frame" (PETS id), "alpha" (°), "r_obs" (per-frame R_obs on |F|),
          "spots" (pandas DataFrame, one row per reflection of the frame: x, y (Å⁻¹), h, k, l,
          I_obs, sigma, I_calc (scaled to I_obs; NaN where not simulated), S_g (Å⁻¹),
          residual ((I_obs − I_calc)/σ), kind ("scored"/"not scored"), simulated (bool),
          size_obs, size_calc (screen pixels)).
        """
        r, sim = self.refinement, self.simulation
        setup = r.setup
        select = np.flatnonzero(setup.refl_frame == position)
        i_obs = np.asarray(sim["I_obs"].values, dtype=float)[select]
        i_calc = np.asarray(sim["I_calc_scaled"].values, dtype=float)[select]
        simulated = setup.refl_beam[select] >= 0
        i_calc = np.where(simulated, i_calc, np.nan)
        scored = np.asarray(sim["scored"].values, dtype=bool)[select]
        sigma = np.asarray(sim["sigma"].values, dtype=float)[select]
        peak = np.nanmax(np.concatenate([i_obs, i_calc, [0.0]]))
        peak = peak if peak > 0 else 1.0

        def size(i: np.ndarray) -> np.ndarray:
            return np.where(
                np.isfinite(i), self.spot_size * np.sqrt(np.clip(i, 0.0, None) / peak), 0.0
            )

        spots = pd.DataFrame(
            {
                "x": self.positions[select, 0],
                "y": self.positions[select, 1],
                "h": sim["h"].values[select],
                "k": sim["k"].values[select],
                "l": sim["l"].values[select],
                "I_obs": i_obs,
                "sigma": sigma,
                "I_calc": i_calc,
                "S_g": np.asarray(sim["S_g"].values, dtype=float)[select],
                "residual": (i_obs - i_calc) / np.maximum(sigma, 1e-12),
                "kind": np.where(scored, "scored", "not scored"),
                "simulated": simulated,
                "size_obs": np.maximum(size(i_obs), 2.0),
                "size_calc": np.maximum(size(i_calc), 2.0),
            }
        )
        return {
            "frame": int(setup.frame[position]),
            "alpha": float(r.dataset["alpha"].values[position]),
            "r_obs": float(sim["r_obs_frame"].values[position]),
            "spots": spots,
        }

    def _frame_image(self, position: int) -> np.ndarray:
        image = self._image
        if callable(image):
            return np.asarray(image(int(self.refinement.setup.frame[position])), dtype=float)
        array = np.asarray(image, dtype=float)
        return array[position] if array.ndim == 3 else array

    # ------------------------------------------------------------------------------ plots
    def _raw(self, data: np.ndarray) -> hv.Image:
        return hv.Image(data, [X, Y], bounds=self._extent).opts(cmap="gray_r", backend="bokeh")

    @staticmethod
    def _spots(data: dict[str, Any], size: str, colors: dict[str, str], title: str) -> hv.Points:
        spots = data["spots"]
        if size == "size_calc":
            spots = spots[spots["simulated"]]
        return hv.Points(spots, [X, Y], [size, "kind", *HOVER]).opts(
            size=hv.dim(size),
            color=hv.dim("kind").categorize(colors),
            fill_alpha=0.55,
            line_color="black",
            line_width=0.5,
            tools=["hover"],
            width=330,
            height=330,
            data_aspect=1,
            title=title,
            backend="bokeh",
        )

    def _measured(self, data: dict[str, Any]) -> hv.Points:
        return self._spots(data, "size_obs", COLORS, f"frame {data['frame']}: measured")

    def _simulated(self, data: dict[str, Any]) -> hv.Points:
        return self._spots(data, "size_calc", SIMULATED_COLORS, "simulated")

    @staticmethod
    def _scatter(data: dict[str, Any]) -> hv.Overlay:
        spots = data["spots"]
        spots = spots[(spots["kind"] == "scored") & spots["simulated"]]
        top = float(np.nanmax(np.concatenate([[1.0], spots["I_obs"], spots["I_calc"]])))
        diagonal = hv.Curve(([0.0, top], [0.0, top]), I_CALC, I_OBS).opts(
            color="gray", line_dash="dashed", backend="bokeh"
        )
        bars = hv.ErrorBars(spots, I_CALC, [I_OBS, SIGMA]).opts(color="#1f5fa8", backend="bokeh")
        points = hv.Scatter(spots, I_CALC, [I_OBS, "h", "k", "l", "sigma", "residual"]).opts(
            size=6, color="#1f5fa8", tools=["hover"], backend="bokeh"
        )
        title = f"R_obs = {100 * data['r_obs']:.2f} % (frame {data['frame']})"
        return (diagonal * bars * points).opts(
            hv.opts.Overlay(width=330, height=330, title=title, backend="bokeh")
        )

    # ------------------------------------------------------------------------------ update
    def show(self, position: int) -> None:
        """Show the frame at ``position`` (what the slider does)."""
        data = self.frame_data(int(position))
        self.stream.send(data)
        if self.image_stream is not None:
            self.image_stream.send(self._frame_image(int(position)))
        self._refresh_text(data)

    def update(self) -> None:
        """Recompute I_calc for the refinement's current state and redraw the frame shown."""
        with refinement_lock(self.refinement):  # never between a panel's step and its record
            self.simulation = self.refinement.simulated()
        self.show(self.frame_slider.value)

    def _refresh_text(self, data: dict[str, Any]) -> None:
        spots = data["spots"]
        self.frame_label.value = (
            f"frame <b>{data['frame']}</b>, α = {data['alpha']:.2f}°, "
            f"{int((spots['kind'] == 'scored').sum())} scored of {len(spots)} reflections, "
            f"R_obs = {100 * data['r_obs']:.2f} %"
        )
        self.worst.value = worst_table(spots, self.n_worst)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def worst_table(spots: pd.DataFrame, n: int) -> str:
    """HTML table of the ``n`` scored reflections with the largest |I_obs − I_calc|/σ."""
    scored = spots[(spots["kind"] == "scored") & spots["simulated"]]
    worst = scored.reindex(scored["residual"].abs().sort_values(ascending=False).index).head(n)
    head = "".join(
        f"<th>{h}</th>" for h in ("h", "k", "l", "I_obs", "σ(I)", "I_calc", "ΔI/σ", "S_g (Å⁻¹)")
    )
    rows = "".join(
        "<tr>"
        f"<td>{int(s.h)}</td><td>{int(s.k)}</td><td>{int(s.l)}</td>"
        f"<td>{s.I_obs:.4g}</td><td>{s.sigma:.3g}</td><td>{s.I_calc:.4g}</td>"
        f"<td>{s.residual:+.2f}</td><td>{s.S_g:+.4f}</td>"
        "</tr>"
        for s in worst.itertuples()
    )
    caption = html.escape(f"worst-fitting reflections ({len(worst)} of {len(scored)} scored)")
    return (
        "<table class='edkit-worst-table' style='font-family:monospace;text-align:right'>"
        f"<caption style='text-align:left'>{caption}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )
