"""One dashboard for a refinement: the controls and curves, the thickness, the frames, in tabs.

``Dashboard(refinement)`` gathers the :class:`RefinementPanel` (Step/Run/Stop, learning rates,
live curves, the parameter table with s.u.'s), a :class:`ThicknessView` kept up to date after
every step, and a :class:`FrameComparison` (measured against simulated spots, frame by frame)
that is redrawn when its tab is opened after steps were taken — so a teaching session needs one
cell. Every part stays reachable (``dashboard.panel``, ``.thickness``, ``.frames``), and the
panel's methods (``step``, ``run``, ``stop``, …) are the dashboard's own.
"""

from typing import Any

import ipywidgets as widgets

from edkit.refine.refinement import Refinement
from edkit.widgets.frames import FrameComparison
from edkit.widgets.refinement_panel import RefinementPanel
from edkit.widgets.thickness import ThicknessView

#: The tabs, in order.
TABS = ("Refine", "Thickness", "Frames")


class PanelTabs:
    """What a dashboard shares: its panel's methods and status as its own, and its display."""

    panel: RefinementPanel
    widget: widgets.Tab

    def __getattr__(self, name: str) -> Any:
        # step(), run(), stop(), compute_uncertainties(), status, … are the panel's.
        if name in ("panel", "refinement"):
            raise AttributeError(name)
        return getattr(self.panel, name)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


class Dashboard(PanelTabs):
    """The refinement's panel, thickness view and frame comparison in one tabbed widget.

    Args:
      refinement: the :class:`edkit.Refinement` to drive.
      run_steps: initial number of steps of the Run button.

    Attributes:
      widget: the ``ipywidgets.Tab`` (the dashboard also displays itself).
      panel, thickness, frames: the three parts.
    """

    def __init__(self, refinement: Refinement, *, run_steps: int = 20) -> None:
        self.refinement = refinement
        self.thickness = ThicknessView(refinement)
        self.panel = RefinementPanel(refinement, run_steps=run_steps)
        # Updated after every step like an embedded view, but shown in its own tab.
        self.panel.thickness_view = self.thickness
        self.frames = FrameComparison(refinement)
        self._frames_at = refinement.step_count
        self.widget = widgets.Tab(children=[self.panel.widget, self.thickness.widget,
                                            self.frames.widget])  # fmt: skip
        for index, title in enumerate(TABS):
            self.widget.set_title(index, title)
        self.widget.add_class("edkit-dashboard")
        self.widget.observe(self._on_tab, names="selected_index")

    def _on_tab(self, change: dict[str, Any]) -> None:
        if change["new"] == TABS.index("Frames"):
            self.refresh_frames()

    def refresh_frames(self) -> None:
        """Redraw the frame comparison if steps were taken since it was drawn."""
        if self.refinement.step_count != self._frames_at:
            self.frames.update()
            self._frames_at = self.refinement.step_count
