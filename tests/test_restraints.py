"""Restraints (edkit.refine.restraints): parsing with SHELX semantics, residual values against
hand calculations, gradients against finite differences, and a refinement they hold."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit import EdkitError, Refinement, read_cif, read_pets, select_frames
from edkit.refine.restraints import parse_restraints, restraint_residuals
from edkit.simulate.synthetic import make_dataset


def _residuals(tables, crystal, fract=None, u_star=None):
    with jax.enable_x64(True):
        return np.asarray(
            restraint_residuals(
                tables,
                jnp.asarray(crystal.fract if fract is None else fract),
                jnp.asarray(crystal.u_star if u_star is None else u_star),
                jnp.asarray(crystal.real_basis),
            )
        )


def _si_o_lengths(crystal) -> np.ndarray:
    """Si1–O1 bond lengths (Å) over the bonded images, sorted."""
    from edkit.refine.restraints import _bonds

    return np.sort(
        [
            np.linalg.norm(
                (rotation @ crystal.fract[1] + shift - crystal.fract[0]) @ crystal.real_basis
            )
            for _, _, rotation, shift in _bonds(crystal, [0, 1], 2.0)
        ]
    )


def test_dfix_dang_residuals_are_distance_minus_target_over_sigma(data_dir) -> None:
    glycine = read_cif(data_dir / "structures" / "glycine.cif")
    tables = parse_restraints(["DFIX 1.09 C2 H1", "DANG 2.2 0.05 O1 O2"], glycine)
    assert tables.descriptions == ("DFIX C2–H1 1.09(0.02)", "DANG O1–O2 2.2(0.05)")
    labels = list(glycine.labels)

    def nearest(a: str, b: str) -> float:  # brute force over ops and lattice shifts
        x_a = glycine.fract[labels.index(a)]
        images = np.einsum("kij,j->ki", glycine.rotations, glycine.fract[labels.index(b)])
        images = images + glycine.translations
        shifts = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
        d = images[:, None, :] + shifts - x_a
        return float(np.min(np.linalg.norm(d @ glycine.real_basis, axis=-1)))

    expected = [(nearest("C2", "H1") - 1.09) / 0.02, (nearest("O1", "O2") - 2.2) / 0.05]
    np.testing.assert_allclose(_residuals(tables, glycine), expected, rtol=1e-10)
    assert tables.n_residuals == 2


def test_simu_and_rigu_on_isotropic_atoms(data_dir) -> None:
    """Isotropic atoms: SIMU's six residuals are ΔUiso/σ on the diagonal and 0 off it; RIGU's
    is ΔUiso/σ too (the mean-square displacement along any direction is Uiso)."""
    glycine = read_cif(data_dir / "structures" / "glycine.cif")
    tables = parse_restraints(["SIMU 0.01 0.02 C1 C2", "RIGU 0.004 C1 C2"], glycine)
    assert tables.descriptions == ("SIMU C1–C2 (0.02 Å²)", "RIGU C1–C2 (0.004 Å²)")
    ueq = dict(zip(glycine.labels, glycine.u_iso_equivalent, strict=True))
    delta = ueq["C1"] - ueq["C2"]
    r = _residuals(tables, glycine)
    # C1–C2 is the only bond between the two: both terminal within the pair list (σ_terminal).
    np.testing.assert_allclose(r[:6], [delta / 0.02, 0, 0, delta / 0.02, 0, delta / 0.02],
                               atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(r[6], delta / 0.004, rtol=1e-9)


def test_gradients_against_finite_differences(data_dir) -> None:
    quartz = read_cif(data_dir / "structures" / "quartz_displaced_02.cif")
    tables = parse_restraints(["DFIX 1.61 Si1 O1", "SIMU", "RIGU"], quartz)
    rng = np.random.default_rng(1)
    u_star = quartz.u_star + 1e-4 * rng.normal(size=quartz.u_star.shape)
    u_star = 0.5 * (u_star + np.swapaxes(u_star, 1, 2))

    def total(fract, u):
        r = restraint_residuals(tables, fract, u, jnp.asarray(quartz.real_basis))
        return jnp.sum(r * r)

    with jax.enable_x64(True):
        fract, u = jnp.asarray(quartz.fract), jnp.asarray(u_star)
        g_fract, g_u = jax.grad(total, argnums=(0, 1))(fract, u)
        for index, grad, array, h in ((1, g_fract, fract, 1e-6), (0, g_u, u, 1e-8)):
            for position in [(1, 0), (1, 2), (0, 1)] if index == 1 else [(1, 0, 0), (0, 1, 2)]:
                step = jnp.zeros_like(array).at[position].set(h)
                if index == 1:
                    numeric = (total(fract + step, u) - total(fract - step, u)) / (2 * h)
                else:
                    numeric = (total(fract, u + step) - total(fract, u - step)) / (2 * h)
                assert float(grad[position]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-6)


def test_bad_instructions_name_what_is_wrong(data_dir) -> None:
    quartz = read_cif(data_dir / "structures" / "quartz.cif")
    with pytest.raises(EdkitError, match="expected an instruction among DFIX"):
        parse_restraints(["DIFX 1.6 Si1 O1"], quartz)
    with pytest.raises(EdkitError, match="no atom 'O9'"):
        parse_restraints(["DFIX 1.6 Si1 O9"], quartz)
    with pytest.raises(EdkitError, match="pairs of atoms"):
        parse_restraints(["DFIX 1.6 Si1"], quartz)
    with pytest.raises(EdkitError, match="every number must be > 0"):
        parse_restraints(["DFIX -1.6 Si1 O1"], quartz)


@pytest.fixture(scope="module")
def synthetic_quartz(data_dir):
    """Data from quartz_kinematical (Si–O 1.604 and 1.621 Å) on 9 real frames; the start is
    quartz_displaced_02 (Si–O 1.432 and 1.708 Å)."""
    truth = read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    geometry = select_frames(
        read_pets(data_dir / "pets" / "quartz_experimental.cif_pets"), list(range(0, 99, 12))
    )
    dataset = make_dataset(truth, geometry, 800.0, g_max=1.0, n_sub=4, counts=1e5)
    start = read_cif(data_dir / "structures" / "quartz_displaced_02.cif")
    return start, dataset


def test_a_restrained_distance_holds_while_the_unrestrained_one_drifts(synthetic_quartz) -> None:
    """DFIX 1.432(2) on the short Si–O bond (1.432 Å at the start): after 90 steps the
    restrained bond is within 3σ of its target, the unrestrained one has drifted more than 3σ
    (measured 2026-12-04: 1.4338 Å against 1.4691 Å; the data's 1.604 Å is not reached from
    this start on 9 frames)."""
    start, dataset = synthetic_quartz
    lengths = {}
    for restraints in ((), ("DFIX 1.432 0.002 Si1 O1",)):
        r = Refinement(start, dataset, g_max=1.0, n_sub=4, restraints=restraints,
                       structure_delay=0, thickness_grid=(400.0, 1200.0, 200.0))  # fmt: skip
        with warnings.catch_warnings():  # a divergence (kept best state) is reported, not failed
            warnings.simplefilter("ignore", RuntimeWarning)
            r.run(90, progress=False)
        lengths[restraints] = _si_o_lengths(r.crystal)[0]
    assert abs(lengths[("DFIX 1.432 0.002 Si1 O1",)] - 1.432) < 3 * 0.002
    assert lengths[()] - 1.432 > 3 * 0.002


@pytest.mark.slow
def test_restraints_join_the_least_squares_and_the_gof(synthetic_quartz) -> None:
    """The Levenberg–Marquardt polish keeps the restrained bond at its target too (its rows
    are in the normal equations), and the report counts the restraint as an observation."""
    start, dataset = synthetic_quartz
    restrained = Refinement(start, dataset, g_max=1.0, n_sub=4, structure_delay=0,
                            restraints=("DFIX 1.432 0.002 Si1 O1",),
                            thickness_grid=(400.0, 1200.0, 200.0))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        restrained.run(10, progress=False)
    restrained.refine_structure(4)
    assert abs(_si_o_lengths(restrained.crystal)[0] - 1.432) < 3 * 0.002
    least_squares = restrained._structure_least_squares()
    data_rows = int(sum(int(np.sum(c.train)) for c in restrained.problem.chunks))
    assert least_squares.n_residuals == data_rows + 1
    report = restrained.report()
    assert report["n_restraints"] == 1 and report["restraint_sum"] < 9.0
    # The full normal matrix (every refined parameter) takes the restraint's row too.
    assert restrained.full_normal_matrix()[0].n_residuals == data_rows + 1
    su = restrained.uncertainties(nuisance=False)
    assert np.all(np.isfinite(su["fract"][1])) and np.all(su["fract"][1] > 0)
