"""``RefinementPanel``: drive an :class:`edkit.Refinement` from Jupyter.

Step / Run N / Stop buttons, a learning-rate slider and an on/off switch per parameter group,
live curves of the loss, the mean per-frame R_obs and wR_obs (a ``hv.streams.Buffer`` feeding a
``DynamicMap``: each step appends one row to the Bokeh ``ColumnDataSource``), and a table of the
refined parameters with their shifts and standard uncertainties.

Steps run in a background thread so the kernel stays responsive; Stop takes effect between
steps. The thread only computes: every change to a widget or plot runs on the kernel's own
thread (:class:`~edkit.widgets.ui_thread.UiThread`), since Bokeh documents are not
thread-safe. One lock per refinement serialises every call into it from the widgets, so two
panels on the same refinement never step it concurrently.
"""

import html
import threading
import time
from typing import Any, Protocol

import holoviews as hv
import ipywidgets as widgets
import numpy as np

from edkit.errors import EdkitError
from edkit.heap import release_freed_heap
from edkit.refine.joint import JointRefinement
from edkit.refine.refinement import GROUPS, Refinement
from edkit.widgets.bridge import HoloViewsWidget, extension, refinement_lock
from edkit.widgets.curves import CURVES, refinement_curves
from edkit.widgets.parameter_table import parameter_table
from edkit.widgets.thickness import ThicknessView
from edkit.widgets.ui_thread import UiThread

__all__ = ["RefinementPanel"]


class StepView(Protocol):
    """A view the panel updates after every step: ``snapshot()`` reads the refinement in the
    worker thread, ``show(snapshot)`` draws it on the kernel's thread (:class:`ThicknessView`)."""

    def snapshot(self) -> Any: ...

    def show(self, snapshot: Any) -> None: ...


RATE_RANGE = (-7.0, 0.0)  # log10 of the slider's learning-rate range
_ERROR_STYLE = "color:#b00020;font-weight:bold"


class RefinementPanel:
    """Interactive control of a refinement: buttons, learning rates, live curves, parameters.

    Args:
      refinement: the :class:`edkit.Refinement` to drive.
      run_steps: initial number of steps of the Run button.
      thickness_view: True to attach a new :class:`ThicknessView` (updated after every step), or
        an existing one; False for none.

    Attributes:
      widget: the top-level ipywidgets container (the panel also displays itself).
      step_button, run_button, stop_button: ipywidgets.Button ("Step", "Run", "Stop").
      run_steps: ipywidgets.IntText, the number of steps of Run.
      progress: ipywidgets.IntProgress over the steps of the current Step/Run.
      status: ipywidgets.HTML: step, loss, R_obs, wR_obs, and errors in red.
      rate_sliders: group → ipywidgets.FloatLogSlider bound to ``set_learning_rate``.
      group_toggles: group → ipywidgets.Checkbox bound to ``set_enabled``.
      curve_stream: the ``hv.streams.Buffer`` of the curves; columns ``step`` and the keys of
        :data:`CURVES` (fractions, not %).
      curve_plot: the ``hv.DynamicMap`` drawing them.
      curves: the :class:`~edkit.widgets.bridge.HoloViewsWidget` showing ``curve_plot``.
      table: ipywidgets.HTML with the parameter table (``<table class="edkit-param-table">``).
      su_button: computes the s.u.'s (``refinement.uncertainties()``) in the background.
      thickness_view: the attached :class:`ThicknessView` or None.
      last_error: the exception of the last failed step (None if none).
    """

    def __init__(
        self,
        refinement: Refinement | JointRefinement,
        *,
        run_steps: int = 20,
        thickness_view: bool | ThicknessView = False,
    ) -> None:
        extension()
        self.refinement = refinement
        self._lock = refinement_lock(refinement)
        self._ui = UiThread()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._syncing = False
        self._problem = ""
        self._activity = "ready"
        self._stepped = False
        self.last_error: BaseException | None = None

        self.step_button = widgets.Button(description="Step", icon="step-forward", tooltip="1 step")
        self.run_button = widgets.Button(description="Run", icon="play", button_style="success")
        self.stop_button = widgets.Button(
            description="Stop", icon="stop", button_style="danger", disabled=True
        )
        self.su_button = widgets.Button(
            description="s.u.'s", tooltip="standard uncertainties from JᵀWJ (Jana convention)"
        )
        self.run_steps = widgets.IntText(
            value=int(run_steps), description="steps", layout=widgets.Layout(width="140px")
        )
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress")
        self.status = widgets.HTML()
        for button, name in (
            (self.step_button, "edkit-step"),
            (self.run_button, "edkit-run"),
            (self.stop_button, "edkit-stop"),
            (self.su_button, "edkit-su"),
        ):
            button.add_class(name)
        self.run_steps.add_class("edkit-run-steps")
        self.progress.add_class("edkit-progress")
        self.status.add_class("edkit-status")
        self.step_button.on_click(lambda _: self.step())
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.su_button.on_click(lambda _: self.compute_uncertainties())

        self.rate_sliders: dict[str, widgets.FloatLogSlider] = {}
        self.group_toggles: dict[str, widgets.Checkbox] = {}
        rows = []
        for group in GROUPS:
            toggle, slider = self._group_controls(group)
            self.group_toggles[group], self.rate_sliders[group] = toggle, slider
            rows.append(widgets.HBox([toggle, slider]))
        groups_box = widgets.VBox(
            [widgets.HTML("<b>refine · learning rate</b>"), *rows],
            layout=widgets.Layout(min_width="420px"),
        )
        groups_box.add_class("edkit-groups")

        self.curve_stream = hv.streams.Buffer(
            self._history_columns(), length=1_000_000, index=False
        )
        self.curve_plot = hv.DynamicMap(refinement_curves, streams=[self.curve_stream])
        self.curves = HoloViewsWidget(self.curve_plot, css_class="edkit-curves")

        self.table = widgets.HTML(layout=widgets.Layout(max_height="360px", overflow="auto"))
        self.table.add_class("edkit-param-table-box")

        if thickness_view is True:
            if isinstance(refinement, JointRefinement):
                raise EdkitError(
                    "thickness_view=True: a joint refinement has one thickness view per "
                    "dataset (use joint.panel(), a JointDashboard)"
                )
            self.thickness_view: StepView | None = ThicknessView(refinement)
        elif isinstance(thickness_view, ThicknessView):
            self.thickness_view = thickness_view
        else:
            self.thickness_view = None

        buttons = widgets.HBox(
            [
                self.step_button,
                self.run_button,
                self.run_steps,
                self.stop_button,
                self.progress,
            ]
        )
        parts: list[widgets.Widget] = [
            buttons,
            self.status,
            widgets.HBox([groups_box, self.curves]),
            widgets.HBox([widgets.HTML("<b>parameters</b>"), self.su_button]),
            self.table,
        ]
        if isinstance(self.thickness_view, ThicknessView):
            parts.append(self.thickness_view.widget)
        self.widget = widgets.VBox(parts)
        self.widget.add_class("edkit-refinement-panel")
        self._refresh_status()
        self._refresh_table()

    # ------------------------------------------------------------------------------ controls
    def _group_controls(self, group: str) -> tuple[widgets.Checkbox, widgets.FloatLogSlider]:
        r = self.refinement
        rate = float(r.base_learning_rates[group])
        low, high = RATE_RANGE
        if rate > 0:
            low = min(low, np.floor(np.log10(rate)) - 1.0)
            high = max(high, np.ceil(np.log10(rate)) + 1.0)
        toggle = widgets.Checkbox(
            value=bool(r.enabled[group]),
            description=group,
            indent=False,
            layout=widgets.Layout(width="110px"),
        )
        slider = widgets.FloatLogSlider(
            value=rate if rate > 0 else 10.0**low,
            base=10.0,
            min=low,
            max=high,
            step=0.1,
            readout_format=".1e",
            continuous_update=False,
            layout=widgets.Layout(width="300px"),
        )
        if group == "absorption" and r.options.absorption is None:
            toggle.disabled = slider.disabled = True
            toggle.tooltip = "no absorption model (Refinement(absorption=None))"
        toggle.add_class(f"edkit-toggle-{group}")
        slider.add_class(f"edkit-rate-{group}")
        toggle.observe(lambda change, g=group: self._on_toggle(g, change["new"]), names="value")
        slider.observe(lambda change, g=group: self._on_rate(g, change["new"]), names="value")
        return toggle, slider

    def _on_toggle(self, group: str, enabled: bool) -> None:
        if not self._syncing:
            self.refinement.set_enabled(group, bool(enabled))
            self._refresh_table()

    def _on_rate(self, group: str, rate: float) -> None:
        if not self._syncing:
            self.refinement.set_learning_rate(group, float(rate))

    def _sync_controls(self) -> None:
        """Show the refinement's rates and switches (a divergence halves every rate)."""
        r = self.refinement
        self._syncing = True
        try:
            for group in GROUPS:
                rate = float(r.base_learning_rates[group])
                slider = self.rate_sliders[group]
                if rate > 0 and not np.isclose(slider.value, rate, rtol=1e-9, atol=0):
                    slider.value = rate
                self.group_toggles[group].value = bool(r.enabled[group])
        finally:
            self._syncing = False

    # ------------------------------------------------------------------------------ actions
    @property
    def running(self) -> bool:
        """True while a Step, Run or s.u. computation is under way in the background."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background work to end (at most ``timeout`` s); True when it has.

        Called in a notebook cell, it also shows each step's updates while it waits (the
        kernel's loop, which would show them otherwise, is blocked by the cell)."""
        thread = self._thread
        deadline = None if timeout is None else time.monotonic() + timeout
        while thread is not None and thread.is_alive():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                break
            thread.join(left)
            self._ui.drain()
        self._ui.drain()
        return not self.running

    def step(self) -> bool:
        """Take one step in the background (the Step button). False if already running."""
        return self._start(self._steps, 1)

    def run(self, steps: int | None = None) -> bool:
        """Take ``steps`` (default: the ``run_steps`` box) steps in the background (Run)."""
        n = int(self.run_steps.value if steps is None else steps)
        if n < 1:
            self._problem = f"Run: the number of steps must be at least 1, not {n}"
            self._refresh_status()
            return False
        return self._start(self._steps, n)

    def stop(self) -> None:
        """Stop the current run after the step in progress (the Stop button)."""
        if self.running:
            self._stop.set()
            self._activity = "stopping after the current step…"
            self._refresh_status()

    def compute_uncertainties(self) -> bool:
        """Compute the s.u.'s (``refinement.uncertainties()``) in the background for the table."""
        return self._start(self._uncertainties)

    def _start(self, target: Any, *args: Any) -> bool:
        if self.running:
            return False
        self._ui.drain()  # the last run's closing updates first (they re-enable the buttons)
        self._stop.clear()
        self._problem = ""
        self.last_error = None
        self._set_busy(True)
        self._thread = threading.Thread(
            target=self._guarded, args=(target, *args), name="edkit-refinement", daemon=True
        )
        self._thread.start()
        return True

    def _guarded(self, target: Any, *args: Any) -> None:
        """Run ``target`` in the worker thread; any exception ends up in the status line."""
        try:
            target(*args)
        except Exception as error:  # shown to the user, never left as a thread traceback
            self.last_error = error
            self._problem = f"{type(error).__name__}: {error}"
            self._activity = f"stopped at step {self.refinement.step_count}"
        finally:
            release_freed_heap()  # what compiling and rendering freed, back to the OS
            self._ui.call(self._set_busy, False)
            self._ui.call(self._refresh_status)

    def _steps(self, n: int) -> None:
        self._ui.call(self._set_progress, 0, n)
        done = 0
        for i in range(n):
            if self._stop.is_set():
                break
            compiling = " (the first step compiles)" if not self._stepped else ""
            self._activity = f"running step {i + 1} of {n}{compiling}…"
            self._ui.call(self._refresh_status)
            with self._lock:
                record = self.refinement.step(1)
            self._stepped = True
            done = i + 1
            self._after_step(record, done)
        stopped = self._stop.is_set() and done < n
        self._activity = (
            f"stopped after {done} of {n} steps" if stopped else f"done: {done} step(s)"
        )

    def _after_step(self, record: dict[str, float], done: int) -> None:
        """Worker thread: gather what the step changed, then show it on the kernel's thread."""
        row = None
        if record.get("diverged"):
            messages = self.refinement.messages
            self._problem = messages[-1] if messages else f"step {record.get('step')}: diverged"
        elif "loss" in record and "r_obs_mean_frame" in record:
            row = {
                "step": np.array([float(record["step"])]),
                **{name: np.array([float(record[name])]) for name in CURVES},
            }
        table = parameter_table(self.refinement)
        thickness = None
        if self.thickness_view is not None:
            with self._lock:
                thickness = self.thickness_view.snapshot()
        self._ui.call(self._show_step, done, row, table, thickness, bool(record.get("diverged")))

    def _show_step(
        self,
        done: int,
        row: dict[str, np.ndarray] | None,
        table: str,
        thickness: Any,
        diverged: bool,
    ) -> None:
        """Kernel's thread: one step's progress, curve point, table, thickness and status."""
        self.progress.value = done
        if diverged:
            self._sync_controls()
        if row is not None:
            self.curve_stream.send(row)
        self.table.value = table
        if self.thickness_view is not None and thickness is not None:
            self.thickness_view.show(thickness)
        self._refresh_status()

    def _set_progress(self, value: int, maximum: int) -> None:
        self.progress.max, self.progress.value = maximum, value

    def _uncertainties(self) -> None:
        self._activity = "computing s.u.'s (JᵀWJ; the first call compiles)…"
        self._ui.call(self._refresh_status)
        with self._lock:
            self.refinement.uncertainties()
        self._activity = f"s.u.'s at step {self.refinement.step_count}"
        table = parameter_table(self.refinement)
        self._ui.call(setattr, self.table, "value", table)

    def _set_busy(self, busy: bool) -> None:
        self.step_button.disabled = busy
        self.run_button.disabled = busy
        self.su_button.disabled = busy
        self.stop_button.disabled = not busy

    # ------------------------------------------------------------------------------ display
    def _history_columns(self) -> dict[str, np.ndarray]:
        """The refinement's recorded steps as curve-stream columns (empty before any step)."""
        r = self.refinement
        columns = {"step": np.zeros(0), **{name: np.zeros(0) for name in CURVES}}
        if r.step_count == 0:
            return columns
        history = r.history
        if history.sizes["step"] == 0:
            return columns
        columns["step"] = np.asarray(history["step"].values, dtype=float)
        for name in CURVES:
            columns[name] = np.asarray(history[name].values, dtype=float)
        return columns

    def _refresh_status(self) -> None:
        r = self.refinement
        data = self.curve_stream.data
        parts = [f"<b>{r.step_count}</b> step(s) taken"]
        if len(data["step"]):
            # A step's record measures the state it started from: after that many steps.
            parts.append(
                f"the state after {int(data['step'][-1])} step(s): loss {data['loss'][-1]:.5f}, "
                f"R_obs (mean per frame) {100 * data['r_obs_mean_frame'][-1]:.2f} %, "
                f"wR_obs {100 * data['wr_obs'][-1]:.2f} %"
            )
        if np.isfinite(r.best_loss):
            parts.append(f"best loss {r.best_loss:.5f} after {r.best_step} step(s)")
        delay = r.options.structure_delay
        if r.step_count < delay and any(r.enabled[g] for g in ("positions", "adp")):
            parts.append(f"warm-up: the structure is held until step {delay}")
        text = " · ".join(parts) + f" — {html.escape(self._activity)}"
        if self._problem:
            text += f"<br><span class='edkit-error' style='{_ERROR_STYLE}'>"
            text += f"{html.escape(self._problem)}</span>"
        self.status.value = text

    def _refresh_table(self) -> None:
        self.table.value = parameter_table(self.refinement)

    def curve_source(self, name: str = "loss") -> Any:
        """The Bokeh ``ColumnDataSource`` of one curve: ``name`` is a key of :data:`CURVES`;
        its columns are ``step`` and ``name``."""
        if name not in CURVES:
            raise KeyError(f"no curve {name!r}; the curves are {list(CURVES)}")
        return self.curves.source_with(name)

    def curve_sources(self) -> dict[str, Any]:
        """The Bokeh ``ColumnDataSource`` of each curve (keys of :data:`CURVES`): the data the
        browser draws, patched by the curve stream after every step."""
        return {name: self.curve_source(name) for name in CURVES}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
