"""edkit.plot: each figure drawn from a small real refinement's outputs (and from refinement.nc
read back), with the data it was given, labelled axes, written as PNG, and no pyplot state."""

import sys

import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure

from edkit import Refinement, plot, read_cif, read_pets, select_frames


@pytest.fixture(scope="module")
def refinement(data_dir) -> Refinement:
    quartz = read_cif(data_dir / "structures" / "quartz.cif")
    dataset = select_frames(
        read_pets(data_dir / "pets" / "quartz_experimental.cif_pets"), [10, 45, 80]
    )
    r = Refinement(quartz, dataset, g_max=1.0, n_sub=3, thickness_grid=(200.0, 1000.0, 200.0))
    r.run(3, progress=False)
    return r


def test_figures_carry_their_data_and_labels(refinement, tmp_path) -> None:
    history, simulated = refinement.history, refinement.simulated()
    figure = plot.convergence(history)
    assert isinstance(figure, Figure)
    loss_line = figure.axes[0].get_lines()[0]
    np.testing.assert_array_equal(loss_line.get_ydata(), history["loss"].values)
    r_lines = {str(line.get_label()): line for line in figure.axes[1].get_lines()}
    np.testing.assert_allclose(r_lines["Jana R_obs"].get_ydata(), 100 * history["r_obs"].values)
    assert figure.axes[1].get_ylabel() == "R (%)"

    figure = plot.frames(simulated)
    heights = [patch.get_height() for patch in figure.axes[0].patches]
    np.testing.assert_allclose(heights, 100 * np.nan_to_num(simulated["r_obs_frame"].values))
    np.testing.assert_array_equal(figure.axes[1].get_lines()[0].get_ydata(), simulated["scale"])

    figure = plot.thickness(refinement.thickness)
    assert figure.axes[0].get_ylabel() == "thickness (Å)"
    assert figure.axes[0].get_xlabel() == "α (°)"

    figure = plot.f_obs_vs_f_calc(simulated)
    points = figure.axes[0].get_lines()[0]
    assert len(points.get_xdata()) == int(simulated["scored"].sum())
    figure.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_the_netcdf_file_and_into_given_axes(refinement, tmp_path) -> None:
    path = refinement.write_results(tmp_path / "refinement.nc")
    history = xr.load_dataset(path, group="history", engine="h5netcdf")
    simulated = xr.load_dataset(path, group="simulated", engine="h5netcdf")
    figure = Figure()
    left, right = figure.subplots(1, 2)
    assert plot.convergence(history, ax=left) is figure
    assert plot.f_obs_vs_f_calc(simulated, ax=right) is figure
    assert left.get_lines() and right.get_lines()


def test_no_pyplot_state() -> None:
    """The module never imports pyplot: no global figures, nothing shown twice in a notebook."""
    assert (
        "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
    )
    source = plot.__file__
    with open(source) as handle:
        assert "pyplot" not in handle.read().replace("without pyplot", "")


def test_frame_spots_in_the_detector_plane(refinement) -> None:
    """The spots sit at O_f B hkl (the widget's detector coordinates), circle areas follow the
    intensities, and an unknown frame is a clear error."""
    from edkit import EdkitError
    from edkit.widgets.frames import detector_coordinates

    simulated = refinement.simulated()
    frame = int(simulated["frame"].values[1])
    figure = plot.frame_spots(simulated, frame)
    calculated, observed = figure.axes[0].collections[:2]
    on_frame = simulated["frame_id"].values == frame
    expected = detector_coordinates(refinement)[on_frame, :2]
    np.testing.assert_allclose(observed.get_offsets(), expected, atol=1e-12)
    np.testing.assert_allclose(calculated.get_offsets(), expected, atol=1e-12)
    i_obs = np.clip(simulated["I_obs"].values[on_frame], 0, None)
    areas = observed.get_sizes()
    assert np.argmax(areas) == np.argmax(i_obs) and areas.max() > 0
    assert "R_obs" in figure.axes[0].get_title()
    assert simulated["detector_x"].attrs["units"] == "1/angstrom"
    with pytest.raises(EdkitError, match="frame 999999 has no reflection"):
        plot.frame_spots(simulated, 999999)


def test_rocking_curve_follows_one_reflection_over_alpha(data_dir) -> None:
    """The points are that reflection's I_obs on each of its frames, at the frames' α in
    increasing order, the line its scaled I_calc; the grid shows the most-sampled ones."""
    from edkit import EdkitError

    quartz = read_cif(data_dir / "structures" / "quartz.cif")
    dataset = select_frames(
        read_pets(data_dir / "pets" / "quartz_experimental.cif_pets"), list(range(30, 36))
    )
    consecutive = Refinement(
        quartz, dataset, g_max=1.0, n_sub=3, thickness_grid=(400.0, 800.0, 400.0)
    )
    simulated = consecutive.simulated()
    assert simulated["alpha"].attrs["units"] == "degree"
    figure = plot.rocking_curve(simulated)  # the reflection seen on the most frames
    ax = figure.axes[0]
    h, k, l = (int(v) for v in ax.get_title().split(":")[0].split())
    rows = (simulated["h"] == h) & (simulated["k"] == k) & (simulated["l"] == l)
    hkl = np.stack([simulated[n].values for n in "hkl"], axis=1)
    _, counts = np.unique(hkl, axis=0, return_counts=True)
    assert int(rows.sum()) == counts.max() >= 2
    frame_ids = simulated["frame_id"].values[rows.values]
    alpha = simulated["alpha"].sel(frame=frame_ids).values
    order = np.argsort(alpha, kind="stable")
    calculated = ax.get_lines()[-1]
    np.testing.assert_allclose(calculated.get_xdata(), alpha[order])
    np.testing.assert_allclose(
        calculated.get_ydata(), simulated["I_calc_scaled"].values[rows.values][order]
    )
    assert ax.get_xlabel() == "α (°)"
    grid = plot.rocking_curves(simulated, count=3)
    assert sum(a.get_visible() for a in grid.axes) == 3
    with pytest.raises(EdkitError, match="reflection 99 99 99 was not measured"):
        plot.rocking_curve(simulated, (99, 99, 99))
