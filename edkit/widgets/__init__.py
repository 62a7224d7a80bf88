"""Jupyter widgets for edkit (ipywidgets layouts with live HoloViews/Bokeh plots).

``import edkit`` never imports this package; importing it loads ipywidgets, HoloViews, Panel
and Bokeh only when one of its names is first used::

    from edkit.widgets import Dashboard, RefinementPanel, ThicknessView, FrameComparison

    Dashboard(refinement)                           # all of the below in tabs, one cell
    panel = RefinementPanel(refinement, thickness_view=True)
    panel                                           # Step / Run / Stop, rates, live curves
    FrameComparison(refinement)                     # measured vs simulated spots per frame
    DifferenceMapView(refinement.difference_maps(), refinement.crystal)  # peak by peak
    BlochExplorer()                                 # two-beam vs many-beam, bundled quartz

Every widget has ``.widget`` (its top-level ipywidgets container) and displays itself. Plots
update through HoloViews streams, and Bokeh's and Panel's resources are inlined (no CDN; see
:mod:`edkit.widgets.bridge`).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edkit.widgets.bloch import BlochExplorer
    from edkit.widgets.bridge import HoloViewsWidget, extension
    from edkit.widgets.dashboard import Dashboard
    from edkit.widgets.difference_map import DifferenceMapView
    from edkit.widgets.frames import FrameComparison
    from edkit.widgets.joint_dashboard import JointDashboard
    from edkit.widgets.refinement_panel import RefinementPanel
    from edkit.widgets.thickness import ThicknessView

_LAZY = {
    "BlochExplorer": "edkit.widgets.bloch",
    "Dashboard": "edkit.widgets.dashboard",
    "DifferenceMapView": "edkit.widgets.difference_map",
    "FrameComparison": "edkit.widgets.frames",
    "HoloViewsWidget": "edkit.widgets.bridge",
    "JointDashboard": "edkit.widgets.joint_dashboard",
    "RefinementPanel": "edkit.widgets.refinement_panel",
    "ThicknessView": "edkit.widgets.thickness",
    "extension": "edkit.widgets.bridge",
}

__all__ = [
    "BlochExplorer",
    "Dashboard",
    "DifferenceMapView",
    "FrameComparison",
    "HoloViewsWidget",
    "JointDashboard",
    "RefinementPanel",
    "ThicknessView",
    "extension",
]


#: What the widgets import that the core does not install (the ``jupyter`` extra).
JUPYTER_EXTRA = ("holoviews", "bokeh", "panel", "jupyter_bokeh", "ipywidgets", "pandas")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = import_module(_LAZY[name])
        except ModuleNotFoundError as error:
            if error.name not in JUPYTER_EXTRA:
                raise
            raise ModuleNotFoundError(
                f"edkit.widgets.{name} needs the jupyter extra ({error.name} is not installed): "
                "pip install 'edkit[jupyter]'",
                name=error.name,
            ) from None
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edkit.widgets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
