"""The dashboard of a joint refinement: one structure, several datasets, in tabs.

``JointDashboard(joint)`` (or ``joint.panel()``) drives a
:class:`~edkit.refine.joint.JointRefinement` with the same :class:`RefinementPanel` as a single
refinement (Step/Run/Stop, learning rates applied to every dataset, live curves of the joint
figures, the shared structure's parameter table with the joint s.u.'s), and adds a *Datasets*
tab (each dataset's figures of merit next to the total, after every step) and one thickness
tab per dataset (each its own :class:`ThicknessView`, all updated after every step).
"""

import html
from typing import Any

import ipywidgets as widgets
import numpy as np

from edkit.refine.joint import JointRefinement
from edkit.widgets.dashboard import PanelTabs
from edkit.widgets.refinement_panel import RefinementPanel
from edkit.widgets.thickness import ThicknessView

#: The columns of the Datasets table: record key → heading (fractions shown in %).
DATASET_COLUMNS = {
    "r_obs": "R_obs",
    "wr_obs": "wR_obs",
    "r_obs_mean_frame": "R_obs (mean per frame)",
}


class _Several:
    """Several views updated as one by the panel after every step (snapshot in the worker
    thread, show on the kernel's thread)."""

    def __init__(self, views: list[Any]) -> None:
        self.views = views

    def snapshot(self) -> list[Any]:
        return [view.snapshot() for view in self.views]

    def show(self, snapshots: list[Any]) -> None:
        for view, snapshot in zip(self.views, snapshots, strict=True):
            view.show(snapshot)


class _DatasetTable:
    """Each dataset's figures at the latest step, and the joint ones (an HTML table)."""

    def __init__(self, joint: JointRefinement) -> None:
        self.joint = joint
        self.widget = widgets.HTML(self.snapshot())
        self.widget.add_class("edkit-joint-datasets")

    def snapshot(self) -> str:
        joint = self.joint
        head = "".join(
            f"<th>{h}</th>"
            for h in ("dataset", "frames", "mean thickness (Å)", *DATASET_COLUMNS.values())
        )
        rows = []
        for name, member in zip(joint.names, joint.members, strict=True):
            record = member._records[-1] if member._records else {}
            thickness = float(np.mean(member.thickness.values))
            cells = [html.escape(name), str(member.setup.n_frames), f"{thickness:.0f}"]
            cells += [_percent(record.get(key)) for key in DATASET_COLUMNS]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        last = joint._records[-1] if joint._records else {}
        frames = sum(m.setup.n_frames for m in joint.members)
        cells = ["<b>all</b>", str(frames), ""] + [_percent(last.get(k)) for k in DATASET_COLUMNS]
        rows.append("<tr class='edkit-joint-total'>" + "".join(f"<td>{c}</td>" for c in cells))
        when = f"the state after {int(last['step'])} step(s)" if last else "no step taken yet"
        return (
            f"<p style='margin:0 0 4px 0'>{joint.step_count} joint step(s); {when}</p>"
            "<table class='edkit-joint-table' style='font-family:monospace;text-align:right'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )

    def show(self, table: str) -> None:
        self.widget.value = table


def _percent(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else f"{100 * float(value):.2f} %"


class JointDashboard(PanelTabs):
    """The joint refinement's panel, its datasets' figures and thickness views in tabs.

    Args:
      joint: the :class:`~edkit.refine.joint.JointRefinement` to drive.
      run_steps: initial number of steps of the Run button.

    Attributes:
      widget: the ``ipywidgets.Tab``: *Refine*, *Datasets*, then *Thickness: <name>* per dataset.
      panel: the :class:`RefinementPanel` over the joint refinement.
      datasets: the HTML table of each dataset's figures (``datasets.widget``).
      thickness: one :class:`ThicknessView` per dataset.
    """

    def __init__(self, joint: JointRefinement, *, run_steps: int = 20) -> None:
        self.refinement = joint
        self.thickness = [ThicknessView(member) for member in joint.members]
        self.datasets = _DatasetTable(joint)
        self.panel = RefinementPanel(joint, run_steps=run_steps)
        self.panel.thickness_view = _Several([self.datasets, *self.thickness])
        children = [self.panel.widget, self.datasets.widget, *(v.widget for v in self.thickness)]
        self.widget = widgets.Tab(children=children)
        titles = ["Refine", "Datasets"] + [f"Thickness: {_short(n)}" for n in joint.names]
        for index, title in enumerate(titles):
            self.widget.set_title(index, title)
        self.widget.add_class("edkit-dashboard")
        self.widget.add_class("edkit-joint-dashboard")


def _short(name: str) -> str:
    """A dataset's file name without its folders (tab titles stay short)."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]
