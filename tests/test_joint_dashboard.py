"""The joint refinement's dashboard (edkit.widgets.JointDashboard) driven from Python.

Two datasets of real quartz (frames α = −39, 31° and α = −4°), g_max = 1.2 Å⁻¹, n_sub = 3,
per-frame thickness: small enough to compile in seconds."""

import numpy as np
import pytest

from edkit import read_cif, read_pets, select_frames
from edkit.refine.joint import JointRefinement
from edkit.widgets import JointDashboard


@pytest.fixture(scope="module")
def joint(data_dir) -> JointRefinement:
    experiment = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    parts = [select_frames(experiment, [10, 80]), select_frames(experiment, [45])]
    crystal = read_cif(data_dir / "structures" / "quartz.cif")
    names = ["data/a.cif_pets", "data/b.cif_pets"]
    return JointRefinement(crystal, parts, names=names, g_max=1.2, n_sub=3,
                           thickness="per-frame", structure_delay=0)  # fmt: skip


def test_tabs_curves_datasets_and_thickness_follow_the_joint_steps(joint) -> None:
    dashboard = joint.panel(run_steps=2)
    assert isinstance(dashboard, JointDashboard)
    tabs = dashboard.widget
    titles = [tabs.get_title(i) for i in range(len(tabs.children))]
    assert titles == ["Refine", "Datasets", "Thickness: a.cif_pets", "Thickness: b.cif_pets"]
    assert "no step taken yet" in dashboard.datasets.widget.value
    profiles = [view.plot.source_with("thickness") for view in dashboard.thickness]
    before = [np.array(p.data["thickness"]) for p in profiles]
    dashboard.rate_sliders["thickness"].value = 3e-2  # reaches both datasets
    assert all(m.base_learning_rates["thickness"] == 3e-2 for m in joint.members)
    dashboard.run_button.click()
    assert dashboard.wait(timeout=180), "the joint steps did not finish"
    assert joint.step_count == 2 and "<b>2</b> step(s) taken" in dashboard.status.value
    curve = dashboard.curve_source("r_obs_mean_frame")
    np.testing.assert_allclose(curve.data["r_obs_mean_frame"],
                               joint.history["r_obs_mean_frame"].values)  # fmt: skip
    table = dashboard.datasets.widget.value
    assert "the state after 1 step(s)" in table and table.count("<tr") == 4  # head, 2, total
    last = joint.history.isel(step=-1)
    assert f"{100 * float(last['r_obs']):.2f} %" in table
    assert f"{100 * float(last['r_obs_by_dataset'].sel(dataset='data/b.cif_pets')):.2f} %" in table
    for profile, old in zip(profiles, before, strict=True):
        assert not np.allclose(profile.data["thickness"], old, rtol=1e-9, atol=0)
    # The parameter table shows the shared structure with the joint s.u.'s.
    dashboard.su_button.click()
    assert dashboard.wait(timeout=180)
    assert joint.last_uncertainties is not None and "GoF" in dashboard.table.value
