"""The refined CIF is complete (issue 14, item 5): gemmi reads it back with every item a
checkCIF-style validator expects, the parameter count covers every refined parameter, and the
s.u.'s come from the full normal matrix with the nuisance parameters.

The problem: α-quartz on 6 frames of the real quartz experiment, g_max = 1.4 Å⁻¹ (about 60
scored reflections; 14 structural parameters and 30 per-frame ones), 3 Adam steps.
"""

import math

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit import Refinement, read_cif, read_pets, select_frames
from edkit.refine import core, covariance, lm

FRAMES = [10, 25, 40, 55, 70, 85]


@pytest.fixture(scope="module")
def refined(data_dir) -> Refinement:
    quartz = read_cif(data_dir / "structures" / "quartz.cif")
    dataset = select_frames(read_pets(data_dir / "pets" / "quartz_experimental.cif_pets"), FRAMES)
    r = Refinement(quartz, dataset, g_max=1.4, n_sub=3, thickness_grid=(200.0, 1000.0, 200.0))
    r.run(3, progress=False)
    return r


@pytest.fixture(scope="module")
def written(refined, tmp_path_factory):
    """The refined CIF (with one item passed in), its gemmi block, and both kinds of s.u.'s."""
    structure_only = refined.uncertainties(nuisance=False)
    path = tmp_path_factory.mktemp("cif") / "refined.cif"
    refined.write_cif(path, extra={"_chemical_absolute_configuration": "ad"})
    full = refined.last_uncertainties  # write_cif computed them
    return path, gemmi.cif.read(str(path)).sole_block(), structure_only, full


def number(block: gemmi.cif.Block, tag: str) -> float:
    value = block.find_value(tag)
    assert value is not None, f"{tag} is missing"
    return gemmi.cif.as_number(value)


def text(block: gemmi.cif.Block, tag: str) -> str:
    value = block.find_value(tag)
    assert value is not None, f"{tag} is missing"
    return gemmi.cif.as_string(value)


def test_every_item_is_there_with_a_sensible_value(refined, written) -> None:
    _, block, _, _ = written
    report, counts = refined.report(), refined.parameter_counts()
    scored = refined.train_mask | refined.validation_mask
    # radiation
    assert text(block, "_diffrn_radiation_type") == "electron"
    assert text(block, "_diffrn_radiation_probe") == "electron"
    assert number(block, "_diffrn_radiation_wavelength") == pytest.approx(0.0251)
    assert number(block, "_diffrn_source_voltage") == pytest.approx(200.0)  # kV
    # reflections
    assert number(block, "_diffrn_reflns_number") == refined.dataset["I_obs"].size
    assert number(block, "_reflns_number_total") == scored.sum()
    gt = number(block, "_reflns_number_gt")
    assert 0 < gt <= number(block, "_reflns_number_total")
    assert text(block, "_reflns_threshold_expression") == "I>3\\s(I)"
    assert number(block, "_refine_ls_number_reflns") == report["n_all"] > 0
    # parameters, restraints, weights
    assert counts == {
        "positions": 4, "adp": 10, "occupancy": 0, "scales": 6, "thickness": 6,
        "orientation": 18, "absorption": 0,
    }  # fmt: skip
    assert number(block, "_refine_ls_number_parameters") == 44 == report["n_parameters_all"]
    table = block.find("_edkit_refine_ls_parameters_", ["group", "number"])
    assert {row.str(0): int(row[1]) for row in table} == counts
    assert number(block, "_refine_ls_number_restraints") == 0
    assert text(block, "_refine_ls_weighting_scheme") == "sigma"
    assert "(0.01Fo)^2^" in text(block, "_refine_ls_weighting_details")
    assert text(block, "_refine_ls_structure_factor_coef") == "F"
    assert text(block, "_refine_ls_matrix_type") == "full"
    # shifts: the Gauss–Newton step from the final state over the s.u.'s
    shift_max, shift_mean = refined.shift_over_su()
    assert number(block, "_refine_ls_shift/su_max") == pytest.approx(shift_max, abs=1e-4)
    assert number(block, "_refine_ls_shift/su_mean") == pytest.approx(shift_mean, abs=1e-4)
    assert 0 < shift_mean <= shift_max < math.inf
    # figures of merit
    for tag, key in (
        ("_refine_ls_R_factor_gt", "r_obs"),
        ("_refine_ls_R_factor_all", "r_all"),
        ("_refine_ls_wR_factor_gt", "wr_obs"),
        ("_refine_ls_wR_factor_ref", "wr_all"),
    ):
        assert number(block, tag) == pytest.approx(report[key], abs=1e-5)
        assert 0 < number(block, tag) < 1
    gof = number(block, "_refine_ls_goodness_of_fit_ref")
    assert gof == pytest.approx(report["gof_ref"], abs=1e-4) and gof > 0
    # thickness model
    thickness = np.asarray(report["thickness"])
    assert text(block, "_edkit_thickness_model") == "profile-net"
    assert number(block, "_edkit_thickness_mean") == pytest.approx(thickness.mean(), abs=0.05)
    assert number(block, "_edkit_thickness_min") == pytest.approx(thickness.min(), abs=0.05)
    assert number(block, "_edkit_thickness_max") == pytest.approx(thickness.max(), abs=0.05)
    details = " ".join(text(block, "_refine_special_details").split())  # a wrapped text field
    assert "profile-net" in details and "full normal matrix" in details
    # provenance and the caller's own item
    assert text(block, "_computing_structure_refinement").startswith("edkit ")
    assert text(block, "_chemical_absolute_configuration") == "ad"


def test_structure_round_trips_within_its_rounding(refined, written) -> None:
    path, _, _, full = written
    crystal = refined.crystal
    small = gemmi.read_small_structure(str(path))
    assert [s.label for s in small.sites] == list(crystal.labels)
    assert small.spacegroup is not None and small.spacegroup.xhm() == crystal.space_group
    fract = np.array([s.fract.tolist() for s in small.sites])
    # each value is rounded to the last digit of its s.u. (at most half of it, +1e-10); the
    # ones fixed by symmetry are written in full
    bound = np.where(full["fract"] > 0, 0.5 * full["fract"], 1e-9) + 1e-10
    np.testing.assert_array_less(np.abs(fract - crystal.fract), bound)
    back = read_cif(path)
    u_bound = np.where(full["u_cif"] > 0, 0.5 * full["u_cif"], 1e-9) + 1e-10
    np.testing.assert_array_less(np.abs(back.u_cif - crystal.u_cif), u_bound)
    np.testing.assert_allclose(back.cell, crystal.cell, rtol=1e-12)


def test_uncertainties_with_nuisance_parameters_are_larger(written) -> None:
    """Eliminating thickness, orientations and scales from the normal matrix can only raise a
    structural variance (a Schur complement), and the GoF counts more parameters."""
    _, _, structure_only, full = written
    free = structure_only["fract"] > 0  # Si1's one free coefficient moves x and y
    assert free.sum() == 5
    # every structural parameter is determined here (about 10 reflections per frame for its
    # 5 nuisance parameters): finite s.u.'s, so the comparisons below can fail
    assert np.all(np.isfinite(full["fract"])) and np.all(np.isfinite(full["u_cif"]))
    np.testing.assert_array_equal(full["fract"] > 0, free)
    assert np.all(full["fract"][free] >= structure_only["fract"][free])
    u_free = structure_only["u_cif"] > 0
    assert np.all(full["u_cif"][u_free] >= structure_only["u_cif"][u_free])
    # the matrix alone, the GoF factored out, already raises them
    gof_ratio = float(full["gof"]) / float(structure_only["gof"])
    assert np.all(full["fract"][free] / gof_ratio >= structure_only["fract"][free])
    assert np.median(full["fract"][free] / structure_only["fract"][free]) > 1.05


def test_full_matrix_matches_the_dense_jacobian(refined) -> None:
    """The arrow-form accumulation with the per-frame columns eliminated frame by frame equals
    the dense Jacobian of every residual with respect to every parameter (jacfwd), inverted
    (both on the least squares' problem: complex128 solves under precision="auto")."""
    full, layout = refined.full_normal_matrix()
    problem, n_d, n_f = refined.polish_problem, layout.n_dense, refined.problem.n_frames
    assert layout.local_thickness and layout.orientation and layout.n_local == 4

    def residuals(theta: jax.Array) -> jax.Array:
        local = theta[n_d:].reshape(n_f, 4)  # thickness scale, three angles per frame
        z = core.model_intermediates(
            covariance.shift_dense(refined.state, layout, theta[:n_d]), problem
        )
        z = z._replace(
            thickness=z.thickness * (1.0 + local[:, :1]), orientation=z.orientation + local[:, 1:]
        )
        reciprocal = problem.tables.reciprocal_basis
        return jnp.concatenate(
            [lm._residuals(z, c, reciprocal, problem.config) for c in problem.chunks]
        )

    with jax.enable_x64(True):
        theta = jnp.zeros(n_d + 4 * n_f)
        jac = np.asarray(jax.jit(jax.jacfwd(residuals))(theta))
        r = np.asarray(jax.jit(residuals)(theta))
    normal = jac.T @ jac
    d = np.sqrt(np.diag(normal))
    inverse = np.linalg.inv(normal / np.outer(d, d)) / np.outer(d, d)
    n_parameters = n_d + 4 * n_f + n_f  # and a scale per frame
    gof = np.sqrt(r @ r / (full.n_residuals - n_parameters))
    assert full.n_parameters == n_parameters and full.gof == pytest.approx(gof, rel=1e-10)
    np.testing.assert_allclose(full.covariance, inverse[:n_d, :n_d] * gof**2, rtol=1e-6)
    np.testing.assert_allclose(full.step, -(inverse @ (jac.T @ r))[:n_d], rtol=1e-6, atol=1e-12)


def test_a_direction_the_nuisance_parameters_absorb_is_undetermined() -> None:
    """A structural column inside the span of the frames' local columns carries no information
    once they are free: it is marked undetermined, and the others' covariance is that of the
    full matrix without it."""
    rng = np.random.default_rng(0)
    frame = np.repeat([0, 1], 20)
    jd, jl, r = rng.normal(size=(40, 3)), rng.normal(size=(40, 1)), rng.normal(size=40)
    jd[:, 2] = 2.0 * jl[:, 0]  # the two frames' local columns moving together
    one_hot = np.eye(2)[frame]  # (40, 2)
    local = jl * one_hot  # (40, 2): frame f's local column
    sums = {
        "A": jd.T @ jd,
        "g": jd.T @ r,
        "cost": r @ r,
        "B": np.einsum("rd,rf->fd", jd, local)[:, :, None],
        "D": np.einsum("rf,rf->f", local, local)[:, None, None],
        "h": (local.T @ r)[:, None],
    }
    layout = covariance.ParameterLayout(
        masks={"positions": (np.ones((1, 3), dtype=bool),)},
        leaf_groups=("positions",),
        local_thickness=True,
        orientation=False,
        fitted_frames=np.ones(2, dtype=bool),
    )
    full = covariance.solve(sums, layout, n_residuals=40)
    np.testing.assert_array_equal(full.determined, [True, True, False])
    assert full.n_parameters == 3 + 2 + 2  # positions, thickness and scale per frame
    jac = np.concatenate([jd[:, :2], local], axis=1)  # without the absorbed column
    inverse = np.linalg.inv(jac.T @ jac)
    np.testing.assert_allclose(full.covariance[:2, :2], inverse[:2, :2] * full.gof**2, rtol=1e-9)
    variances = covariance.structural_variances(full, layout)
    assert np.all(np.isfinite(variances[:2])) and variances[2] == np.inf
