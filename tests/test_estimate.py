"""The time estimate ``edkit validate`` and ``edkit refine`` print before solving."""

import pytest

import edkit
from edkit.io.pets import select_frames
from edkit.refine.estimate import TimeEstimate, estimate_time
from edkit.refine.lm import n_free_parameters
from edkit.refine.options import options_from
from edkit.refine.prepare import plan_setup


def test_the_total_counts_steps_searches_least_squares_and_the_sus() -> None:
    # CsPbBr₃-sized figures (README, Large crystals): 400 s a step, 40 min a normal matrix;
    # an LM iteration is a normal matrix and a forward pass (the eigendecompositions' 150 s).
    large = TimeEstimate(3600, 150.0, 400.0, 200.0, normal_seconds=2400.0, n_free=27)
    assert large.total(80, 3, 10) == pytest.approx(80 * 400 + 3 * 200 + 10 * 2550 + 2400)
    text = large.describe(80, 3, 10)
    assert "a least-squares iteration (27 parameters) ≈ 42.5 min" in text
    planned = "80 Adam step(s), 3 thickness search(es), 10 least-squares iteration(s), the s.u.'s"
    assert f"{planned} ≈ 16.8 h" in text
    assert "--every N" in text and "--segments" in text and "a GPU" in text
    quartz = TimeEstimate(4554, 0.4, 1.0, 0.5, normal_seconds=2.0, n_free=15)
    assert quartz.total(10, 0, 4) == pytest.approx(10 * 1.0 + 4 * 2.4 + 2.0)
    assert "--segments" not in quartz.describe(10, 0, 4)
    bare = TimeEstimate(4554, 0.4, 1.0, 0.5)  # no parameters given: no least-squares figure
    assert "least-squares" not in bare.describe(10, 0, 4) and bare.total(10, 0, 4) == 10.0


def test_a_least_squares_iteration_costs_more_than_its_solves(data_dir) -> None:
    crystal = edkit.read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    dataset = edkit.read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    setup, mapping, plan = plan_setup(
        crystal, select_frames(dataset, slice(0, None, 20)), options_from()
    )
    n_free = int(mapping.position_mask.sum() + mapping.adp_mask.sum())
    assert n_free_parameters(mapping, options_from().refine) == n_free  # positions and ADPs
    assert n_free_parameters(mapping, ("positions", "thickness")) == mapping.position_mask.sum()
    assert n_free_parameters(mapping, ("thickness",)) == 0
    estimate = estimate_time(setup, plan.devices, n_free)
    assert estimate.n_free == n_free > 0 and estimate.solves == setup.angles.size
    # one eigendecomposition and 2 n_free products per solve, the same timed eigh as the epoch
    assert estimate.normal_seconds > estimate.eigh_seconds > 0
    assert estimate_time(setup, plan.devices).normal_seconds == 0.0


def test_steps_and_least_squares_are_timed_in_their_own_precisions(data_dir, monkeypatch) -> None:
    """precision="auto" on a small cell: the steps' epoch from complex64 kernels, the least
    squares' normal matrix from complex128 ones (kernel times replaced by fixed figures)."""
    from edkit.refine import estimate as estimate_module

    def fixed(n, real, single=False, repeats=3, devices=1):
        return (1e-3 if single else 2e-3), 1e-4

    monkeypatch.setattr(estimate_module, "_kernel_seconds", fixed)
    crystal = edkit.read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    dataset = edkit.read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    setup, _, plan = plan_setup(crystal, select_frames(dataset, slice(0, None, 20)), options_from())
    assert (plan.precision, plan.polish_precision) == ("single", "double")
    mixed = estimate_time(setup, plan.devices, 15, plan.precision, plan.polish_precision)
    single = estimate_time(setup, plan.devices, 15, "single")
    double = estimate_time(setup, plan.devices, 15, "double")
    assert mixed.eigh_seconds == pytest.approx(1e-3 * setup.angles.size)
    assert mixed.epoch_seconds == single.epoch_seconds < double.epoch_seconds
    assert mixed.normal_seconds == double.normal_seconds > single.normal_seconds
