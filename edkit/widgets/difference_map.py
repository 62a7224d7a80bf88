"""``DifferenceMapView``: browse a refinement's difference potential map peak by peak."""

import html

import ipywidgets as widgets
from matplotlib.figure import Figure

from edkit import plot
from edkit.crystal import Crystal
from edkit.refine.fourier import DifferenceMaps

__all__ = ["DifferenceMapView"]


class DifferenceMapView:
    """The map's section through a chosen peak (:func:`edkit.plot.difference_map_slice`), with
    the peak list beside it: pick a peak, switch between Fo−Fc and 2Fo−Fc.

    Args:
      maps: :meth:`edkit.Refinement.difference_maps`.
      crystal: the model the maps were phased with (``refinement.crystal``).

    Attributes:
      widget: the top-level ipywidgets container (the view also displays itself).
      peak: ipywidgets.Dropdown of the listed peaks (value: the index, 0 = the largest).
      which: ipywidgets.ToggleButtons, "difference" or "2fo-fc".
      image: ipywidgets.Image with the section as PNG.
      table: ipywidgets.HTML with the peak list.
    """

    def __init__(self, maps: DifferenceMaps, crystal: Crystal) -> None:
        self.maps, self.crystal = maps, crystal
        peaks = maps.peaks
        options = [
            (
                f"{i + 1}: {float(peaks['height_sigma'][i]):+.1f} σ, "
                f"{float(peaks['distance'][i]):.2f} Å from {peaks['nearest_atom'].values[i]}",
                i,
            )
            for i in range(peaks.sizes["peak"])
        ]
        self.peak = widgets.Dropdown(options=options, value=0, description="peak")
        self.which = widgets.ToggleButtons(
            options=[("Fo−Fc", "difference"), ("2Fo−Fc", "2fo-fc")], value="difference"
        )
        self.image = widgets.Image(format="png")
        self.table = widgets.HTML(f"<pre>{html.escape(maps.peak_table(len(options)))}</pre>")
        self.peak.observe(lambda _: self.redraw(), names="value")
        self.which.observe(lambda _: self.redraw(), names="value")
        self.widget = widgets.VBox(
            [widgets.HBox([self.peak, self.which]), widgets.HBox([self.image, self.table])]
        )
        self.widget.add_class("edkit-difference-map")
        self.redraw()

    def figure(self) -> Figure:
        """The section the view shows now."""
        return plot.difference_map_slice(
            self.maps, self.crystal, peak=int(self.peak.value), which=str(self.which.value)
        )

    def redraw(self) -> None:
        """Draw the section for the chosen peak and map into ``image``."""
        self.image.value = plot.png_bytes(self.figure())

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
