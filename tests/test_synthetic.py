"""Synthetic datasets (edkit.synthetic): geometry, file round trip, truth at the noise floor.

The round trip: quartz on an 8-frame rotation series with a thickness profile
t(α) = 400 + 200 cos(3α) Å (300–600 Å over α = −40…30°), Poisson counts, written with
``write_pets``, read back with ``read_pets`` and simulated again with the recorded truth and
settings. The noiseless intensities are then reproduced exactly, so what is left is the noise:
with w = 1/σ² the expected χ² per reflection is 1 (σ = √max(I, 1) estimates the Poisson
standard deviation √I), i.e. GoF_I = sqrt(Σ w (I_o − k I_c)² / (N − n_frames)) ≈ 1 and each
frame's intensity wR2 ≈ sqrt((n_f − 1) / Σ_f w I_o²), its noise floor. A wrong thickness must give
a clearly worse fit. conftest.py turns x64 on.
"""

import numpy as np
import pytest
import xarray as xr

from edkit.errors import EdkitError
from edkit.io.cif import read_cif
from edkit.io.pets import read_pets, write_pets
from edkit.metrics import frame_wr2, mean_frame_r_obs
from edkit.physics.geometry import zone_axes_lab
from edkit.simulate.frames import build_frame_setup, simulate_frames
from edkit.simulate.synthetic import make_dataset, rotation_series

N_SUB = 7  # few sub-orientations: the truth is re-simulated with the same rule


def profile(alpha: np.ndarray) -> np.ndarray:
    """The true thickness, Å, of a frame at goniometer angle α (degrees)."""
    return 400.0 + 200.0 * np.cos(np.deg2rad(3.0 * alpha))


@pytest.fixture(scope="module")
def crystal(data_dir):
    return read_cif(data_dir / "structures" / "quartz.cif")


@pytest.fixture(scope="module")
def experiment(data_dir):
    return read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")


@pytest.fixture(scope="module")
def geometry(experiment):
    """8 frames 10° apart of the real quartz experiment (its UB, θ = 1°, mosaicity 0.05°)."""
    return rotation_series(experiment, alpha_start=-40.0, alpha_step=10.0, n_frames=8)


@pytest.fixture(scope="module")
def synthetic(crystal, geometry):
    return make_dataset(crystal, geometry, profile, n_sub=N_SUB, counts=1e6, seed=3)


@pytest.fixture(scope="module")
def reread(synthetic, tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "quartz_profile.cif_pets"
    write_pets(synthetic, path)
    return read_pets(path)


def _truth_attrs(dataset: xr.Dataset) -> xr.Dataset:
    out = dataset.copy()
    out.attrs = {k: v for k, v in dataset.attrs.items() if not k.startswith("synthetic_")}
    return out


def _without_provenance(dataset: xr.Dataset) -> xr.Dataset:
    out = dataset.copy()
    out.attrs = {k: v for k, v in dataset.attrs.items() if k not in ("source_file", "read_notes")}
    return out


# ---------------------------------------------------------------------------------------------
# rotation_series
# ---------------------------------------------------------------------------------------------


def test_rotation_series_layout(geometry, experiment) -> None:
    assert geometry.attrs["geometry"] == "continuous rotation"
    assert geometry.sizes["frame"] == 8 and geometry.sizes["refl"] == 0
    for name, var in experiment.variables.items():
        assert name in geometry.variables, name
        assert geometry[name].dims == var.dims, name
        assert geometry[name].dtype.kind == var.dtype.kind, name
        assert geometry[name].attrs == var.attrs, name
    np.testing.assert_array_equal(geometry["frame"].values, np.arange(1, 9))
    np.testing.assert_allclose(geometry["alpha"].values, -40.0 + 10.0 * np.arange(8))
    assert np.all(geometry["beta"].values == 0) and np.all(geometry["omega"].values == 0)
    np.testing.assert_array_equal(geometry["UB"].values, experiment["UB"].values)
    assert float(geometry["voltage"]) == 200e3
    assert float(geometry["mosaicity"]) == 0.05


def test_rotation_series_zone_axes_point_to_plus_z(geometry, crystal) -> None:
    plus_z = np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(zone_axes_lab(geometry), np.tile(plus_z, (8, 1)), atol=1e-12)
    assert np.all(np.max(np.abs(geometry["zone_axis"].values), axis=1) == 1.0)
    bare = rotation_series(
        cell=crystal.cell, alpha_start=0.0, alpha_step=0.5, n_frames=3, semiangle=0.5
    )
    np.testing.assert_allclose(bare["zone_axis"].values[0], plus_z, atol=1e-12)  # U = I: [001]
    np.testing.assert_allclose(zone_axes_lab(bare), np.tile(plus_z, (3, 1)), atol=1e-12)


def test_rotation_series_errors(crystal) -> None:
    with pytest.raises(EdkitError, match="n_frames is required"):
        rotation_series(cell=crystal.cell, alpha_start=0.0, alpha_step=1.0, semiangle=1.0)
    with pytest.raises(EdkitError, match=r"semiangle = -1\.0; expected > 0"):
        rotation_series(cell=crystal.cell, alpha_start=0, alpha_step=1, n_frames=2, semiangle=-1)
    with pytest.raises(EdkitError, match="n_frames = 0"):
        rotation_series(cell=crystal.cell, alpha_start=0, alpha_step=1, n_frames=0, semiangle=1)
    with pytest.raises(EdkitError, match="ub is singular"):
        rotation_series(
            cell=crystal.cell,
            ub=np.zeros((3, 3)) + 0.1,
            alpha_start=0,
            alpha_step=1,
            n_frames=2,
            semiangle=1,
        )


# ---------------------------------------------------------------------------------------------
# make_dataset
# ---------------------------------------------------------------------------------------------


def test_truth_is_recorded(synthetic, geometry, crystal) -> None:
    attrs = synthetic.attrs
    np.testing.assert_allclose(attrs["synthetic_thickness"], profile(geometry["alpha"].values))
    assert attrs["synthetic_structure"] == crystal.source
    assert attrs["synthetic_counts"] == 1e6 and attrs["synthetic_seed"] == 3
    assert attrs["synthetic_n_sub"] == N_SUB
    assert attrs["comments"].startswith("# edkit synthetic: structure ")
    assert synthetic["I_obs"].max() > 0.9e6  # the brightest reflection expects 1e6 counts
    np.testing.assert_array_equal(
        synthetic["sigma"].values, np.sqrt(np.maximum(synthetic["I_obs"].values, 1.0))
    )
    assert synthetic.sizes["refl"] > 80
    assert np.all(np.bincount(synthetic["frame_id"].values, minlength=9)[1:] > 3)


def test_netcdf_keeps_the_truth(synthetic, tmp_path) -> None:
    path = tmp_path / "synthetic.nc"
    synthetic.to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), synthetic)


def test_write_read_round_trip(synthetic, reread) -> None:
    xr.testing.assert_identical(_without_provenance(reread), _truth_attrs(synthetic))


def test_every_reflection_is_scored_when_read_back(crystal, reread) -> None:
    setup = build_frame_setup(crystal, reread, n_sub=N_SUB)
    assert np.all(setup.scored)


def test_seed_determinism_on_a_read_pets_geometry(crystal, experiment) -> None:
    """Same seed, same data; another seed, other noise. A read_pets geometry works too: its
    reflections are ignored and its comments kept after the synthetic line."""
    few = experiment.isel(frame=slice(0, 2))  # its 6666 reflections are ignored
    a = make_dataset(crystal, few, 300.0, n_sub=3, seed=11)
    b = make_dataset(crystal, few, 300.0, n_sub=3, seed=11)
    c = make_dataset(crystal, few, 300.0, n_sub=3, seed=12)
    xr.testing.assert_identical(a, b)
    np.testing.assert_array_equal(a["h"].values, c["h"].values)  # same reflections
    assert np.any(a["I_obs"].values != c["I_obs"].values)  # other noise
    assert set(np.unique(a["frame_id"].values)) == {1, 2}
    np.testing.assert_array_equal(a["alpha"].values, few["alpha"].values)
    assert "source_file" not in a.attrs
    assert a.attrs["comments"].endswith(experiment.attrs["comments"])


def test_make_dataset_errors(crystal, geometry) -> None:
    with pytest.raises(EdkitError, match="counts = 0"):
        make_dataset(crystal, geometry, 300.0, counts=0)
    with pytest.raises(EdkitError, match="thickness"):
        make_dataset(crystal, geometry, np.ones(3) * 300.0, n_sub=3)
    other = crystal.replace(cell=(*crystal.cell[:2], 1.05 * crystal.cell[2], *crystal.cell[3:]))
    with pytest.raises(EdkitError, match=r"quartz\.cif.*does not match"):
        make_dataset(other, geometry, 300.0, n_sub=3)


# ---------------------------------------------------------------------------------------------
# the truth fits to the noise floor; a wrong thickness does not
# ---------------------------------------------------------------------------------------------


def _fit(crystal, dataset, thickness):
    setup = build_frame_setup(crystal, dataset, n_sub=N_SUB)
    result = simulate_frames(crystal, dataset, thickness, setup=setup)
    i_obs, sigma = dataset["I_obs"].values, dataset["sigma"].values
    i_calc = result["I_calc"].values
    frames = setup.refl_frame
    chi2 = np.sum(((i_obs - result["I_calc_scaled"].values) / sigma) ** 2)
    gof = np.sqrt(chi2 / (i_obs.size - setup.n_frames))
    wr2 = frame_wr2(i_obs, sigma, i_calc, frames, setup.n_frames)
    n_f = np.bincount(frames, minlength=setup.n_frames)
    floor = np.sqrt((n_f - 1) / np.bincount(frames, weights=(i_obs / sigma) ** 2))
    r_obs = mean_frame_r_obs(i_obs, sigma, i_calc, frames, setup.n_frames)
    return gof, wr2, floor, r_obs


def test_truth_fits_at_the_noise_floor(crystal, reread) -> None:
    """Measured (seeds 3, 0, 1; 141 reflections): GoF_I 0.90 / 1.05 / 0.90, mean wR2 over its
    floor 0.89 / 0.97 / 0.91 (worst frame 1.2), mean per-frame R_obs 0.35–0.41 %."""
    assert "synthetic_thickness" not in reread.attrs  # the file keeps only the comment line
    gof, wr2, floor, r_obs = _fit(crystal, reread, profile(reread["alpha"].values))
    assert abs(gof - 1.0) < 0.2, gof
    assert 1 / 1.5 < np.mean(wr2) / np.mean(floor) < 1.5, (wr2, floor)
    assert np.all(wr2 < 3.0 * floor), (wr2, floor)
    assert r_obs < 0.01, r_obs


def test_wrong_thickness_fits_clearly_worse(crystal, reread) -> None:
    """A constant 450 Å instead of 300–600 Å: measured GoF_I 56, wR2 30× its floor, R_obs 12 %."""
    gof, wr2, floor, r_obs = _fit(crystal, reread, 450.0)
    assert gof > 5.0, gof
    assert np.mean(wr2) > 5.0 * np.mean(floor), (wr2, floor)
    assert r_obs > 0.03, r_obs
