"""edkit.compat.diffbloch_paper: the paper code's numerics reproduce its synthetic quartz set.

The shared ``quartz_synthetic.cif_pets`` was made by the paper's PyTorch code from
``quartz_kinematical.cif``; its Poisson noise alone gives a mean per-frame R_obs of 0.42 %.
"""

import numpy as np
import pytest

import edkit
from edkit.compat import (
    cell_from_ub,
    diffbloch_paper,
    moving_average_weights,
    paper_orientation,
    segment_boundaries,
)
from edkit.crystal import real_basis_of
from edkit.errors import EdkitError
from edkit.physics.geometry import frame_orientations
from edkit.physics.orientation import rotation_x, rotation_y, rotation_z
from edkit.refine.options import options_from
from edkit.schema import cell_parameters
from edkit.simulate.frames import simulate_frames, thickness_search

#: The cell implied by UB⁻ᵀ·G* of the synthetic quartz file (the issue's forensic numbers).
CELL_PRIME = (4.97524, 4.98032, 5.45751, 89.9805, 89.9173, 120.0338)


@pytest.fixture(scope="module")
def data(data_dir):
    return edkit.read_pets(data_dir / "pets" / "quartz_synthetic.cif_pets")


@pytest.fixture(scope="module")
def truth(data_dir):
    return edkit.read_cif(data_dir / "structures" / "quartz_kinematical.cif")


@pytest.fixture(scope="module")
def paper(data, truth):
    return diffbloch_paper(data, truth)


def test_transformed_cell(data, paper):
    ub = data["UB"].values
    u = ub @ real_basis_of(cell_parameters(data))  # the generator's U, not orthonormalised
    assert np.linalg.det(u) == pytest.approx(1.033024, abs=1e-6)
    _, cell = paper_orientation(ub, cell_parameters(data))
    np.testing.assert_allclose(cell[:3], CELL_PRIME[:3], atol=5e-6)
    np.testing.assert_allclose(cell[3:], CELL_PRIME[3:], atol=5e-5)
    assert paper.crystal.cell == pytest.approx(cell, abs=1e-12)
    np.testing.assert_allclose(cell_parameters(paper.dataset), cell, atol=1e-12)
    # cell_from_ub inverts a plain B: the metric of an orthonormal UB is the cell's own.
    b = np.linalg.inv(real_basis_of((4.9226, 4.9226, 5.4003, 90.0, 90.0, 120.0)))
    np.testing.assert_allclose(cell_from_ub(rotation_z(0.3, xp=np) @ b), (4.9226, 4.9226,
                               5.4003, 90.0, 90.0, 120.0), atol=1e-9)  # fmt: skip


def test_lattice_is_the_generators(data, paper):
    """Every frame's reciprocal lattice in edkit (polar U′ of UB′, cell′) is the generator's:
    R_goni · U⁻ᵀ · B with the non-orthonormal U = UB · B⁻¹ of the file."""
    b = np.linalg.inv(real_basis_of(cell_parameters(data)))
    u = data["UB"].values @ np.linalg.inv(b)
    u_prime = paper.dataset["UB"].values @ real_basis_of(paper.crystal.cell)
    np.testing.assert_allclose(u_prime @ u_prime.T, np.eye(3), atol=1e-12)  # a pure rotation
    assert np.linalg.det(u_prime) == pytest.approx(1.0, abs=1e-12)
    ours = frame_orientations(paper.dataset).values @ paper.crystal.reciprocal_basis.T
    deg = np.pi / 180
    phi = float(data["rotation_axis_position"]) * deg
    for i, (a, be, om) in enumerate(
        zip(data["alpha"].values, data["beta"].values, data["omega"].values, strict=True)
    ):
        goniometer = (
            rotation_z(-phi, xp=np) @ rotation_z(om * deg, xp=np)
            @ rotation_x(a * deg, xp=np) @ rotation_y(be * deg, xp=np)
        )  # fmt: skip
        np.testing.assert_allclose(ours[i], goniometer @ np.linalg.inv(u).T @ b, atol=1e-12)
    # ...and not edkit's own (polar U of UB): ≈1 % apart.
    theirs = frame_orientations(data).values @ b
    assert np.abs(theirs - ours).max() > 2e-3


def test_tilts_weights_and_segments(data, paper):
    counts = np.array([1, 2, 3, 4] + [5] * 34 + [4, 3, 2, 1], dtype=float)
    np.testing.assert_allclose(moving_average_weights(42, 5), counts / counts.sum())
    np.testing.assert_allclose(moving_average_weights(7, 1), np.full(7, 1 / 7))
    np.testing.assert_array_equal(
        segment_boundaries(42, 12), [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39, 41]
    )
    setup = paper.setup()
    theta = np.deg2rad(data["semiangle"].values)
    np.testing.assert_allclose(setup.angles, np.linspace(-theta, theta, 42, axis=1), atol=1e-14)
    np.testing.assert_allclose(setup.weights[0], counts / counts.sum())
    assert setup.settings["g_max"] == 1.9 and float(paper.dataset["voltage"]) == 200e3
    assert float(paper.dataset["mosaicity"]) == 0.0
    assert "diffbloch_paper" in paper.dataset.attrs["emulation"]
    np.testing.assert_array_equal(paper.dataset["I_obs"], data["I_obs"])
    opts = options_from(**paper.refinement_options)  # a Refinement accepts them
    np.testing.assert_allclose(opts.tilt_weights, counts / counts.sum())


def test_bad_input(data, truth, paper):
    for kwargs, match in [
        ({"n_tilts": 1}, "n_tilts = 1"),
        ({"n_tilts": 42.0}, "expected an integer"),
        ({"window": 0}, "window = 0"),
        ({"window": 43}, "≤ 42"),
        ({"segments": 42}, "segments = 42"),
        ({"voltage": -200.0}, "voltage"),
        ({"g_max": float("nan")}, "g_max"),
        ({"sg_max": 0}, "sg_max"),
    ]:
        with pytest.raises(EdkitError, match=match):
            diffbloch_paper(data, truth, **kwargs)
    with pytest.raises(EdkitError, match="lacks"):
        diffbloch_paper(data.drop_vars("UB"), truth)
    with pytest.raises(EdkitError, match="does not match"):
        diffbloch_paper(data, truth.replace(cell=(5.2, 5.2, 5.4003, 90.0, 90.0, 120.0)))
    with pytest.raises(EdkitError, match="non-singular"):
        paper_orientation(np.zeros((3, 3)), cell_parameters(data))
    with pytest.raises(EdkitError, match="within 1 % of the file's"):
        paper.simulate(paper.crystal, 1300.0)  # cell′ while F is asked in the file's cell
    with pytest.raises(EdkitError, match="grid"):
        paper.thickness_scan(truth, [[1000.0]])


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_truth_reproduces_the_paper_data(data, truth, paper):
    """All 99 frames, truth through the emulation with its best thickness per frame: 0.90 %
    (Poisson floor 0.42 %); edkit's physics, its own best thickness per frame: ≈13 %."""
    scan = paper.thickness_scan(truth, np.arange(1000.0, 2200.0, 10.0))
    best = scan["thickness_best"].values
    assert np.all(np.isfinite(best)) and best.min() > 1000.0 and best.max() < 2190.0
    r_paper = float(paper.simulate(truth, best)["r_obs_frame"].mean())
    assert r_paper <= 0.015
    assert r_paper == pytest.approx(float(scan["r_obs_best"].mean()), rel=1e-6)

    search = thickness_search(
        truth, data, np.arange(500.0, 2500.0, 50.0), levels=1, robust=False, progress=False
    )
    r_edkit = float(
        simulate_frames(truth, data, search["thickness_raw"].values)["r_obs_frame"].mean()
    )
    assert r_edkit > 0.10
