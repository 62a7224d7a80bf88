"""edkit.widgets driven from Python: buttons clicked, sliders moved, Bokeh data sources read.

The refinement: α-quartz (quartz.cif) against 3 frames of the real quartz data (α = −39, −4,
31°), g_max = 1.2 Å⁻¹, n_sub = 3 (28 scored reflections, 14 structural parameters), with the
"map-net" thickness model so that the thickness map is exercised too. One ``Refinement`` is built
per module (``template``) and compiled once; tests drive shallow copies (``fresh``) that share its
compiled functions, as tests/test_refinement.py does. conftest.py turns x64 on; pyproject turns
warnings into errors, which also covers exceptions escaping a widget's background thread (pytest
reports those as warnings).
"""

import copy
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time

import ipywidgets
import jax
import jax.numpy as jnp
import nbclient
import nbformat
import numpy as np
import pytest
from conftest import inject_nan_loss

from edkit import EdkitError, Refinement, read_cif, read_pets, select_frames
from edkit.physics import bloch
from edkit.refine import core
from edkit.refine.refinement import GROUPS
from edkit.widgets import (
    BlochExplorer,
    Dashboard,
    FrameComparison,
    HoloViewsWidget,
    RefinementPanel,
    ThicknessView,
)
from edkit.widgets.bloch import two_beam_intensity
from edkit.widgets.frames import detector_coordinates

FRAMES = [10, 45, 80]  # α = −39, −4, 31°
G_MAX = 1.2
N_SUB = 3
CDN = re.compile(r"cdn\.bokeh\.org|cdn\.holoviz\.org|cdn\.jsdelivr\.net|unpkg\.com")


@pytest.fixture(scope="module")
def quartz(data_dir):
    return read_cif(data_dir / "structures" / "quartz.cif")


@pytest.fixture(scope="module")
def template(quartz, data_dir) -> Refinement:
    experiment = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    dataset = select_frames(experiment, FRAMES)
    refinement = Refinement(
        quartz,
        dataset,
        g_max=G_MAX,
        n_sub=N_SUB,
        thickness="map-net",
        thickness_grid=(200.0, 1000.0, 200.0),
        learning_rates={"thickness": 3e-4},
        structure_delay=0,  # the table's shifts move from the first Step
    )
    refinement.predict()  # compiles the shared prediction
    return refinement


def fresh(template: Refinement) -> Refinement:
    """An unstepped copy of ``template`` with its own mutable bookkeeping."""
    refinement = copy.copy(template)
    # A new optimiser state: the live learning rates are written into it before every step.
    refinement._core_state = core.init(jax.tree.map(lambda x: x, template.state), template.problem)
    refinement.best_state = refinement.state
    refinement.base_learning_rates = dict(template.base_learning_rates)
    refinement.enabled = dict(template.enabled)
    refinement.messages = []
    refinement._records = []
    refinement._least_squares = None
    refinement._normal_equations = (None, None)
    refinement.last_uncertainties = None
    return refinement


def click_and_wait(panel: RefinementPanel, button: "ipywidgets.Button") -> None:
    button.click()
    assert panel.wait(timeout=120), "the background work did not finish"


def adp(refinement: Refinement) -> np.ndarray:
    return np.asarray(refinement.model.adp[...])


# ---------------------------------------------------------------------------------------------
# packaging and resources
# ---------------------------------------------------------------------------------------------


def test_import_edkit_loads_no_widget_library() -> None:
    code = (
        "import sys, edkit\n"
        "loaded = [m for m in ('ipywidgets', 'panel', 'holoviews', 'bokeh', 'jupyter_bokeh')"
        " if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert callable(edkit.Refinement.panel)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_widget_state_has_no_cdn_url() -> None:
    """What the browser receives for a plot (the BokehModel's render bundle) names no CDN:
    Panel's stylesheets are inlined."""
    import holoviews as hv

    plot = HoloViewsWidget(hv.Curve([1, 2, 3]), css_class="edkit-test")
    bundle = json.dumps(plot.render_bundle, default=str)
    assert "docs_json" in bundle
    assert not CDN.search(bundle)
    assert "https://" not in bundle
    assert "edkit-test" in plot._dom_classes


@pytest.mark.slow  # ≥ 12 s; runs in CI's test-slow
def test_notebook_loader_inlines_bokeh(tmp_path) -> None:
    """In a real kernel, ``extension()`` publishes BokehJS inline (no script URL at all), a
    displayed plot's widget state references no CDN, and plain HoloViews objects render."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("import edkit.widgets\nedkit.widgets.extension()"),
        nbformat.v4.new_code_cell(
            "import holoviews as hv\nedkit.widgets.HoloViewsWidget(hv.Curve([1, 2, 3]))"
        ),
        nbformat.v4.new_code_cell("hv.Curve([1, 2, 3])"),
    ]
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", store_widget_state=True
    )
    client.execute(cwd=str(tmp_path))
    loader = [
        output["data"]["application/javascript"]
        for output in notebook.cells[0].outputs
        if "application/javascript" in output.get("data", {})
    ]
    assert loader, "extension() published no loader"
    biggest = max(loader, key=len)
    assert len(biggest) > 1_000_000  # BokehJS itself
    assert "bokeh.min.js" in biggest
    assert re.search(r"const js_urls = \[\];", biggest)
    assert re.search(r"const css_urls = \[\];", biggest)
    outputs = json.dumps([cell.outputs for cell in notebook.cells], default=str)
    assert "cdn.bokeh.org" not in outputs
    # plain HoloViews objects render as Bokeh plots too (HTML, not their text repr)
    shown = [o for o in notebook.cells[2].outputs if o["output_type"] == "execute_result"]
    assert "text/html" in shown[0]["data"]
    state = json.dumps(notebook.metadata["widgets"], default=str)
    assert "BokehModel" in state
    assert not CDN.search(state)


# ---------------------------------------------------------------------------------------------
# RefinementPanel
# ---------------------------------------------------------------------------------------------


def test_panel_builds(template) -> None:
    r = fresh(template)
    panel = RefinementPanel(r, run_steps=5)
    assert isinstance(panel, RefinementPanel)
    dashboard = r.panel(run_steps=5)  # the dashboard, with the panel's methods
    assert isinstance(dashboard, Dashboard) and dashboard.run_steps.value == 5
    assert dashboard.step == dashboard.panel.step
    with pytest.warns(DeprecationWarning, match="thickness_view"):
        assert isinstance(r.panel(thickness_view=True), Dashboard)  # an older notebook's call
    assert isinstance(panel.widget, ipywidgets.VBox)
    assert panel.step_button.description == "Step"
    assert panel.run_button.description == "Run"
    assert panel.stop_button.description == "Stop" and panel.stop_button.disabled
    assert panel.run_steps.value == 5
    assert "edkit-step" in panel.step_button._dom_classes
    assert "edkit-curves" in panel.curves._dom_classes
    assert set(panel.rate_sliders) == set(GROUPS) == set(panel.group_toggles)
    for group in GROUPS:
        assert panel.rate_sliders[group].value == pytest.approx(r.base_learning_rates[group])
        assert panel.group_toggles[group].value == r.enabled[group]
    assert panel.group_toggles["absorption"].disabled  # absorption=None
    assert "class='edkit-param-table'" in panel.table.value
    assert "<b>0</b> step(s) taken" in panel.status.value
    assert set(panel.curve_sources()) == {"loss", "r_obs_mean_frame", "wr_obs"}
    assert all(len(s.data["step"]) == 0 for s in panel.curve_sources().values())
    assert not panel.running
    bundle = panel.widget._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_step_and_run_update_curves_status_and_table(template) -> None:
    r = fresh(template)
    panel = RefinementPanel(r, run_steps=3)
    table_before = panel.table.value
    click_and_wait(panel, panel.step_button)
    loss = panel.curve_source()
    assert loss is panel.curve_sources()["loss"]
    assert list(loss.data["step"]) == [0.0]
    assert r.step_count == 1
    panel.run_steps.value = 3
    click_and_wait(panel, panel.run_button)
    assert r.step_count == 4
    # the same ColumnDataSource, patched in place by the stream
    assert panel.curve_sources()["loss"] is loss
    np.testing.assert_array_equal(loss.data["step"], [0, 1, 2, 3])
    history = r.history
    np.testing.assert_allclose(loss.data["loss"], history["loss"].values)
    np.testing.assert_allclose(
        panel.curve_sources()["r_obs_mean_frame"].data["r_obs_mean_frame"],
        history["r_obs_mean_frame"].values,
    )
    np.testing.assert_allclose(
        panel.curve_sources()["wr_obs"].data["wr_obs"], history["wr_obs"].values
    )
    assert (panel.progress.value, panel.progress.max) == (3, 3)
    assert "4</b> step(s) taken" in panel.status.value
    assert f"loss {history['loss'].values[-1]:.5f}" in panel.status.value
    assert "done: 3 step(s)" in panel.status.value
    assert "edkit-error" not in panel.status.value
    assert panel.table.value != table_before
    # the O1 y shift in the table is the refined one
    o1 = r.crystal.labels.index("O1")
    shift = r.crystal.fract[o1, 1] - r.start_crystal.fract[o1, 1]
    assert f"<td>O1</td><td>y</td><td>{r.crystal.fract[o1, 1]:.6f}</td>" in panel.table.value
    assert f"{shift:+.6f}" in panel.table.value
    assert not panel.step_button.disabled and panel.stop_button.disabled
    # a new panel on a stepped refinement starts its curves from the history
    again = RefinementPanel(r)
    np.testing.assert_array_equal(again.curve_sources()["loss"].data["step"], [0, 1, 2, 3])


def test_controls_call_through_and_act_at_the_next_step(template, monkeypatch) -> None:
    r = fresh(template)
    panel = RefinementPanel(r)
    panel.rate_sliders["adp"].value = 1e-5
    assert r.base_learning_rates["adp"] == pytest.approx(1e-5)
    panel.group_toggles["adp"].value = False
    assert r.enabled["adp"] is False
    before = adp(r)
    click_and_wait(panel, panel.step_button)
    np.testing.assert_array_equal(adp(r), before)  # switched off: frozen
    panel.group_toggles["adp"].value = True
    assert r.enabled["adp"] is True

    # a slider moved while a run is under way applies from the next step on
    real_step, seen = r.step, []

    def step(n: int = 1) -> dict:
        seen.append(r.base_learning_rates["positions"])
        record = real_step(n)
        if len(seen) == 1:
            panel.rate_sliders["positions"].value = 1e-4
        return record

    monkeypatch.setattr(r, "step", step)
    panel.run(3)
    assert panel.wait(timeout=120)
    assert seen == [pytest.approx(template.base_learning_rates["positions"]), 1e-4, 1e-4]


def test_stop_halts_a_run_within_one_step(template, monkeypatch) -> None:
    r = fresh(template)
    panel = RefinementPanel(r)
    real_step, calls = r.step, []

    def slow_step(n: int = 1) -> dict:
        time.sleep(0.05)
        record = real_step(n)
        calls.append(1)
        return record

    monkeypatch.setattr(r, "step", slow_step)
    panel.run_steps.value = 500
    panel.run_button.click()
    deadline = time.monotonic() + 60
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert panel.running and panel.run_button.disabled and not panel.stop_button.disabled
    panel.stop_button.click()
    at_click = len(calls)
    assert panel.wait(timeout=60)
    assert at_click <= len(calls) <= at_click + 1
    assert r.step_count == len(calls) < 500
    assert f"stopped after {len(calls)} of 500 steps" in panel.status.value
    assert not panel.running and not panel.run_button.disabled and panel.stop_button.disabled


def test_a_failing_step_is_shown_and_the_best_state_kept(template, monkeypatch) -> None:
    r = fresh(template)
    panel = RefinementPanel(r)
    click_and_wait(panel, panel.step_button)
    state, best, best_step, steps = r.state, r.best_state, r.best_step, r.step_count

    def broken(n: int = 1) -> dict:
        raise FloatingPointError("Bloch solver failed at frame 2")

    monkeypatch.setattr(r, "step", broken)
    threads = threading.active_count()
    click_and_wait(panel, panel.run_button)
    assert "edkit-error" in panel.status.value and "color:#b00020" in panel.status.value
    assert "FloatingPointError: Bloch solver failed at frame 2" in panel.status.value
    assert isinstance(panel.last_error, FloatingPointError)
    assert r.state is state and r.best_state is best
    assert (r.best_step, r.step_count) == (best_step, steps)
    assert not panel.running and not panel.run_button.disabled
    assert threading.active_count() <= threads
    monkeypatch.undo()
    click_and_wait(panel, panel.step_button)  # usable again; the error is cleared
    assert r.step_count == steps + 1 and "edkit-error" not in panel.status.value


def test_divergence_is_reported_and_the_rates_resynchronised(template, monkeypatch) -> None:
    """A non-finite loss at the second step (as test_refinement.py injects it): Refinement
    returns to its best state and halves the rates; the panel says so and shows the rates."""
    r = fresh(template)
    panel = RefinementPanel(r)
    inject_nan_loss(r, monkeypatch)
    adp_rate = r.base_learning_rates["adp"]
    with pytest.warns(RuntimeWarning, match="diverged"):
        panel.run(3)
        assert panel.wait(timeout=120)
    assert "step 1: the refinement diverged (loss nan" in panel.status.value
    assert "edkit-error" in panel.status.value
    assert "done: 3 step(s)" in panel.status.value  # the run goes on from the best state
    assert r.base_learning_rates["adp"] == pytest.approx(0.5 * adp_rate)
    assert panel.rate_sliders["adp"].value == pytest.approx(0.5 * adp_rate)
    # the diverged step does not reach the curves
    np.testing.assert_array_equal(panel.curve_sources()["loss"].data["step"], [0, 2])


def test_uncertainties_fill_the_table(template) -> None:
    r = fresh(template)
    panel = RefinementPanel(r)
    click_and_wait(panel, panel.step_button)
    assert "s.u.&#x27;s: not computed" in panel.table.value
    click_and_wait(panel, panel.su_button)
    su = r.last_uncertainties
    assert su is not None and int(su["steps"]) == r.step_count
    assert f"s.u.&#x27;s at step {r.step_count}" in panel.table.value
    o1 = r.crystal.labels.index("O1")
    assert f"<td>{su['fract'][o1, 0]:.6f}</td>" in panel.table.value
    click_and_wait(panel, panel.step_button)
    assert "out of date" in panel.table.value


# ---------------------------------------------------------------------------------------------
# ThicknessView
# ---------------------------------------------------------------------------------------------


def test_thickness_view_follows_the_refinement(template) -> None:
    r = fresh(template)
    panel = RefinementPanel(r, thickness_view=True)
    view = panel.thickness_view
    assert isinstance(view, ThicknessView) and view.widget in panel.widget.children
    profile = view.plot.source_with("thickness")
    alpha = np.asarray(r.thickness["alpha"].values)
    order = np.argsort(alpha)
    np.testing.assert_allclose(profile.data["alpha"], alpha[order])
    np.testing.assert_allclose(profile.data["thickness"], r.thickness.values[order])
    grid = view.plot.source_with("grid_search")
    np.testing.assert_array_equal(grid.data["grid_search"], r.initial_thickness[order])
    image = view.plot.source_with("image")
    map_before = np.array(image.data["image"][0])
    thickness_before = np.array(profile.data["thickness"])
    r.set_learning_rate("thickness", 3e-2)
    click_and_wait(panel, panel.step_button)
    assert not np.allclose(profile.data["thickness"], thickness_before, rtol=1e-9, atol=0)
    np.testing.assert_allclose(profile.data["thickness"], r.thickness.values[order])
    assert not np.allclose(image.data["image"][0], map_before, rtol=1e-9, atol=0)
    np.testing.assert_allclose(image.data["image"][0], r.thickness_map().values)
    assert "map-net" in view.summary.value


# ---------------------------------------------------------------------------------------------
# FrameComparison
# ---------------------------------------------------------------------------------------------


def test_detector_coordinates_put_spots_on_the_ewald_sphere(template) -> None:
    """g_lab = O B hkl: its z component is the excitation error plus |g|²/2K (lab beam −z)."""
    g = detector_coordinates(template)
    k = template.setup.wave_number
    np.testing.assert_allclose(
        g[:, 2] - np.sum(g**2, axis=1) / (2.0 * k), template.setup.excitation_error, atol=1e-12
    )


def test_frame_comparison_slider_changes_the_plotted_data(template) -> None:
    r = fresh(template)
    n_frames = r.setup.n_frames
    image = np.arange(n_frames * 16, dtype=float).reshape(n_frames, 4, 4)
    view = FrameComparison(r, image=image, extent=(-1.0, -1.0, 1.0, 1.0), n_worst=3)
    assert view.frame_slider.max == n_frames - 1
    measured = view.plot.source_with("size_obs")
    simulated = view.plot.source_with("size_calc")
    scatter = view.plot.source_with("residual")
    raw = view.plot.source_with("image")
    in_frame = r.setup.refl_frame == 0
    np.testing.assert_allclose(np.sort(measured.data["x"]), np.sort(view.positions[in_frame, 0]))
    np.testing.assert_array_equal(raw.data["image"][0], image[0][::-1])  # rows bottom to top
    sim = r.simulated()
    r_frame = sim["r_obs_frame"].values
    assert f"R_obs = {100 * r_frame[0]:.2f} %" in view.frame_label.value
    assert "class='edkit-worst-table'" in view.worst.value
    assert view.worst.value.count("<tr>") == 1 + min(3, int(sim["scored"].values[in_frame].sum()))
    table_before = view.worst.value

    view.frame_slider.value = 2
    in_frame = r.setup.refl_frame == 2
    np.testing.assert_allclose(np.sort(measured.data["x"]), np.sort(view.positions[in_frame, 0]))
    np.testing.assert_allclose(
        np.sort(scatter.data["I_obs"]),
        np.sort(sim["I_obs"].values[in_frame & sim["scored"].values]),
    )
    assert len(simulated.data["x"]) == int((r.setup.refl_beam[in_frame] >= 0).sum())
    np.testing.assert_array_equal(raw.data["image"][0], image[2][::-1])
    assert f"frame <b>{r.setup.frame[2]}</b>" in view.frame_label.value
    assert view.worst.value != table_before
    # spot areas ∝ intensity, on one scale for measured and simulated
    size = np.asarray(measured.data["size_obs"])
    i_obs = np.asarray(measured.data["I_obs"])
    strong = size > 2.0
    ratio = size[strong] ** 2 / i_obs[strong]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)

    # after refinement steps, update() shows the new I_calc
    before = np.array(simulated.data["I_calc"])
    r.step(3)
    view.update()
    assert not np.allclose(simulated.data["I_calc"], before, rtol=1e-9, atol=0)
    with pytest.raises(EdkitError, match="extent"):
        FrameComparison(r, image=image)


# ---------------------------------------------------------------------------------------------
# BlochExplorer
# ---------------------------------------------------------------------------------------------


def test_two_beam_formula_matches_the_bloch_solver() -> None:
    """The explorer's analytic Pendellösung against edkit's eigen solver on two beams."""
    k, u, s = 39.87, 0.02, 7e-4
    t = np.linspace(0.0, 3000.0, 31)
    with jax.enable_x64(True):
        solved = bloch.bloch_intensities(
            jnp.array([0.0, s]),
            jnp.zeros(2),
            jnp.array([[0.0, u], [u, 0.0]], dtype=complex),
            k,
            jnp.asarray(t),
        )
    np.testing.assert_allclose(two_beam_intensity(t, s, u, k), solved[:, 1], atol=1e-10)


def test_bloch_explorer_sliders_change_the_data() -> None:
    explorer = BlochExplorer()  # the bundled quartz, [001]
    norms = np.linalg.norm(explorer.hkl @ np.asarray(explorer.crystal.reciprocal_basis), axis=1)
    assert norms[explorer.index] == pytest.approx(np.min(norms[1:]))  # the lowest order first
    many_source = explorer.plot.source_with("many")
    two_source = explorer.plot.source_with("two")
    pattern_source = explorer.plot.source_with("S_g")
    many, two = np.asarray(many_source.data["many"]), np.asarray(two_source.data["two"])
    assert many[0] == pytest.approx(0.0, abs=1e-12) and two[0] == 0.0
    assert np.all((many >= -1e-12) & (many <= 1.0 + 1e-9))
    i = explorer.index
    g = np.linalg.norm(explorer.hkl[i] @ np.asarray(explorer.crystal.reciprocal_basis))
    # at the zone axis S_g = −|g|²/2K for a zero-order reflection
    s0 = explorer.readout.value
    assert f"S_g = {-(g**2) / (2 * explorer.wave_number):+.5f}" in s0

    sizes_before = np.array(pattern_source.data["size"])
    explorer.thickness_slider.value = 1000.0
    assert not np.allclose(pattern_source.data["size"], sizes_before)
    assert "t = 1000 Å" in explorer.readout.value

    explorer.tilt_slider.value = -1e3 * g / (2 * explorer.wave_number)  # Bragg condition
    np.testing.assert_allclose(pattern_source.data["S_g"][i], 0.0, atol=2e-5)
    assert not np.allclose(many_source.data["many"], many)
    two_bragg = np.asarray(two_source.data["two"])
    xi = explorer.wave_number / explorer.potential[i]
    assert two_bragg.max() == pytest.approx(1.0, abs=0.02)  # full exchange at S_g = 0
    at_bragg = two_beam_intensity(
        explorer.thickness, 0.0, explorer.potential[i], explorer.wave_number
    )
    np.testing.assert_allclose(two_bragg, at_bragg, atol=2e-3)
    assert 100 < xi < 1e5

    explorer.reflection.value = explorer.reflection.options[3][1]
    assert explorer.index == explorer.reflection.options[3][1]
    h, k, l = explorer.hkl[explorer.index]
    assert f"<b>{h} {k} {l}</b>" in explorer.readout.value
    with pytest.raises(EdkitError, match="not among the beams"):
        BlochExplorer(reflection=(9, 9, 9))


def test_status_says_when_the_structure_is_held_for_warm_up(template) -> None:
    r = fresh(template)
    r.options = dataclasses.replace(r.options, structure_delay=5)
    assert "warm-up: the structure is held until step 5" in RefinementPanel(r).status.value
    r.options = dataclasses.replace(r.options, structure_delay=0)
    assert "warm-up" not in RefinementPanel(r).status.value


# ---------------------------------------------------------------------------------------------
# Dashboard
# ---------------------------------------------------------------------------------------------


def test_dashboard_gathers_the_views_in_tabs_and_keeps_them_current(template) -> None:
    from edkit.widgets import Dashboard

    r = fresh(template)
    dashboard = Dashboard(r)
    tabs = dashboard.widget
    assert [tabs.get_title(i) for i in range(3)] == ["Refine", "Thickness", "Frames"]
    assert list(tabs.children) == [
        dashboard.panel.widget,
        dashboard.thickness.widget,
        dashboard.frames.widget,
    ]
    # The thickness view lives in its own tab, not inside the panel, and follows every step.
    assert dashboard.thickness.widget not in dashboard.panel.widget.children
    profile = dashboard.thickness.plot.source_with("thickness")
    before = np.array(profile.data["thickness"])
    r.set_learning_rate("thickness", 3e-2)
    click_and_wait(dashboard, dashboard.step_button)  # the panel's, through the dashboard
    assert r.step_count == 1 and "<b>1</b> step(s) taken" in dashboard.status.value
    assert "the state after 0 step(s)" in dashboard.status.value
    assert not np.allclose(profile.data["thickness"], before, rtol=1e-9, atol=0)
    # Opening the Frames tab after a step redraws it for the current state.
    simulation_before = dashboard.frames.simulation
    tabs.selected_index = 2
    assert dashboard.frames.simulation is not simulation_before
    np.testing.assert_allclose(
        dashboard.frames.simulation["I_calc"].values, r.simulated()["I_calc"].values
    )
