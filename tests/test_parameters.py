"""Refinable structure parameters (edkit.models.parameters.structure_mapping).

Checks on the four shared structures (quartz, pyrite, α-glycine, borane):

* zero coefficients reproduce the crystal exactly;
* the number of free coefficients follows the site symmetry (quartz: Si on a 2-fold axis has one
  free coordinate and four Uij, O in the general position three and six; pyrite: Fe on -3 none,
  S on the 3-fold axis one);
* any coefficient vector keeps each atom on its special position (every stabiliser operator of
  the starting site maps the shifted site onto itself modulo the lattice) and keeps its ADP
  invariant under the stabiliser;
* position coefficients are Cartesian Å: one unit moves the atom by exactly 1 Å, and the free
  directions of a site are orthonormal;
* riding hydrogens keep their bond vector to the parent image: the H moves by the parent's
  Cartesian shift rotated by the linking operator (also through a non-identity operator);
* the ADP penalty Σ relu(ADP_FLOOR − λ_min)² is zero for positive-definite ADPs and equals the
  analytic value for non-positive-definite ones.

conftest.py turns x64 on.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from edkit.io.cif import read_cif
from edkit.models.parameters import ADP_FLOOR, structure_mapping

STRUCTURES = ("quartz", "pyrite", "glycine", "borane")


def _read(data_dir, name):
    return read_cif(data_dir / "structures" / f"{name}.cif")


@pytest.fixture(scope="module", params=STRUCTURES)
def crystal(request, data_dir):
    return _read(data_dir, request.param)


def _zeros(crystal):
    n = crystal.n_asu
    return jnp.zeros((n, 3)), jnp.zeros((n, 6)), jnp.zeros(n)


def _cartesian_u(crystal, u_star):
    """U_cart = A U* Aᵀ with A's columns a, b, c (Å²): a route independent of the mapping's M."""
    a = np.asarray(crystal.real_basis).T
    return np.einsum("ij,njk,lk->nil", a, np.asarray(u_star), a)


def _lattice_distance(d, real):
    """Cartesian length (Å) of fractional differences modulo lattice translations."""
    return np.linalg.norm((d - np.round(d)) @ real, axis=-1)


# ---------------------------------------------------------------------------------------------
# identity, counts
# ---------------------------------------------------------------------------------------------


def test_zero_coefficients_reproduce_the_crystal(crystal) -> None:
    """Zero coefficients give the crystal back, but for riding H whose Uiso the parent sets
    (checked in test_riding_hydrogen_uiso_follows_its_parent)."""
    mapping = structure_mapping(crystal)
    own = mapping.riding_u_factor == 0  # every atom but isotropic riding H
    params = mapping.structure(*_zeros(crystal))
    np.testing.assert_array_equal(np.asarray(params.fract), crystal.fract)
    np.testing.assert_allclose(
        np.asarray(params.u_star)[own], crystal.u_star[own], rtol=1e-14, atol=1e-20
    )
    np.testing.assert_array_equal(np.asarray(params.occupancy), crystal.occupancy)
    back = mapping.crystal(crystal, *_zeros(crystal))
    np.testing.assert_array_equal(back.fract, crystal.fract)
    np.testing.assert_allclose(back.u_cif[own], crystal.u_cif[own], rtol=1e-14, atol=1e-20)
    assert back.labels == crystal.labels and back.cell == crystal.cell


@pytest.mark.parametrize(
    ("name", "positions", "adps"),
    [
        ("quartz", [1, 3], [4, 6]),  # Si1 on the 2-fold axis (0, y, 5/6); O1 general
        ("pyrite", [0, 1], [2, 2]),  # Fe on -3 (0, 0, 0); S on the 3-fold axis (x, x, x)
    ],
)
def test_free_coefficients_follow_site_symmetry(data_dir, name, positions, adps) -> None:
    mapping = structure_mapping(_read(data_dir, name))
    np.testing.assert_array_equal(mapping.position_mask.sum(axis=1), positions)
    np.testing.assert_array_equal(mapping.adp_mask.sum(axis=1), adps)


def test_glycine_hydrogens_ride_and_heavy_atoms_are_free(data_dir) -> None:
    glycine = _read(data_dir, "glycine")
    mapping = structure_mapping(glycine)
    is_h = np.array([e == "H" for e in glycine.elements])
    np.testing.assert_array_equal(mapping.riding_parent >= 0, is_h)
    np.testing.assert_array_equal(mapping.position_mask.sum(axis=1), np.where(is_h, 0, 3))
    # isotropic: one ΔUiso for heavy atoms; riding H take theirs from the parent
    np.testing.assert_array_equal(mapping.adp_mask.sum(axis=1), np.where(is_h, 0, 1))
    free = structure_mapping(glycine, riding=False)
    np.testing.assert_array_equal(free.position_mask.sum(axis=1), 3)
    np.testing.assert_array_equal(free.riding_parent, -1)


# ---------------------------------------------------------------------------------------------
# site symmetry, units
# ---------------------------------------------------------------------------------------------


def test_random_shifts_stay_on_the_special_position(crystal) -> None:
    mapping = structure_mapping(crystal)
    rng = np.random.default_rng(7)
    n = crystal.n_asu
    positions = rng.normal(scale=0.2, size=(n, 3))  # Å, fixed directions included (ignored)
    adp = rng.normal(scale=0.005, size=(n, 6))
    fract = np.asarray(mapping.fract(jnp.asarray(positions)))
    u_star = np.asarray(
        mapping.structure(jnp.asarray(positions), jnp.asarray(adp), jnp.zeros(n)).u_star
    )
    real = np.asarray(crystal.real_basis)
    moved = _lattice_distance(fract - crystal.fract, real)
    assert np.any(moved[mapping.position_mask.any(axis=1)] > 0.05)  # the shifts are not tiny
    shift = fract - crystal.fract
    for i, stabiliser in enumerate(crystal.stabilisers()):
        rot = crystal.rotations[stabiliser]
        # R δ = δ for every stabiliser R: R(x + δ) + t − (x + δ) = R x + t − x
        np.testing.assert_allclose(
            np.einsum("kij,j->ki", rot, shift[i]), np.tile(shift[i], (len(rot), 1)), atol=1e-14
        )

        # so the shifted site is as exactly on the special position as the start (the CIFs give
        # 6 decimals: quartz Si1 z = 0.833333 is 3.6e-6 Å off 5/6)
        def residual(f, i=i, rot=rot, stabiliser=stabiliser):
            images = np.einsum("kij,j->ki", rot, f) + crystal.translations[stabiliser]
            return np.max(_lattice_distance(images - f, real))

        assert residual(fract[i]) < residual(crystal.fract[i]) + 1e-10, crystal.labels[i]
        assert residual(fract[i]) < 1e-5, crystal.labels[i]
        # U* of the site is invariant: R U* Rᵀ = U* for every stabiliser R
        rotated = np.einsum("kij,jl,kml->kim", rot, u_star[i], rot)
        np.testing.assert_allclose(rotated, np.broadcast_to(u_star[i], rotated.shape), atol=1e-15)


def test_special_positions_exist_in_the_shared_structures(data_dir) -> None:
    # so that the test above checks constraints, not only general positions
    for name in ("quartz", "pyrite"):
        crystal = _read(data_dir, name)
        assert any(len(s) > 1 for s in crystal.stabilisers()), name


def test_position_coefficients_are_cartesian_angstrom(crystal) -> None:
    mapping = structure_mapping(crystal)
    real = np.asarray(crystal.real_basis)
    n = crystal.n_asu
    riding = mapping.riding_parent >= 0
    for i in np.flatnonzero(mapping.position_mask.any(axis=1)):
        shifts = []
        for k in np.flatnonzero(mapping.position_mask[i]):
            coefficients = np.zeros((n, 3))
            coefficients[i, k] = 1.0
            delta = np.asarray(mapping.fract(jnp.asarray(coefficients))) - crystal.fract
            others = np.ones(n, bool)
            others[i] = False
            others &= ~(riding & (mapping.riding_parent == i))  # its riding H move with it
            np.testing.assert_array_equal(delta[others], 0.0)
            shifts.append(delta[i] @ real)
        shifts = np.array(shifts)
        # each unit coefficient moves the atom by exactly 1 Å, along orthogonal directions
        np.testing.assert_allclose(shifts @ shifts.T, np.eye(len(shifts)), atol=1e-12)


def test_riding_hydrogen_uiso_follows_its_parent(data_dir) -> None:
    """Glycine: the CH2 hydrogens (H1, H2 on C2) take 1.2 × Ueq(C2), the NH3⁺ ones (H3–H5 on
    N1, a group of three) 1.5 × Ueq(N1); raising the parents' Uiso raises theirs with it."""
    glycine = _read(data_dir, "glycine")
    mapping = structure_mapping(glycine)
    labels = list(glycine.labels)
    factor = dict(zip(labels, mapping.riding_u_factor, strict=True))
    assert [factor[h] for h in ("H1", "H2", "H3", "H4", "H5")] == [1.2, 1.2, 1.5, 1.5, 1.5]
    adp = np.zeros((glycine.n_asu, 6))
    adp[labels.index("C2"), 0] = 0.01  # ΔUiso of C2 (Å², along its normalised iso direction)
    crystal = mapping.crystal(glycine, np.zeros((glycine.n_asu, 3)), adp, np.zeros(glycine.n_asu))
    ueq = dict(zip(labels, crystal.u_iso_equivalent, strict=True))
    assert ueq["C2"] > glycine.u_iso_equivalent[labels.index("C2")]
    for h, parent, k in (("H1", "C2", 1.2), ("H2", "C2", 1.2), ("H3", "N1", 1.5)):
        assert ueq[h] == pytest.approx(k * ueq[parent], rel=1e-9)
    free = structure_mapping(glycine, riding=False)  # no riding: the file's Uiso stay
    assert not np.any(free.riding_u_factor)
    # --fixed-h-uiso: the H still ride (position), but keep the file's Uiso as C2 moves
    fixed = structure_mapping(glycine, riding_uiso=False)
    assert not np.any(fixed.riding_u_factor)
    np.testing.assert_array_equal(fixed.riding_parent, mapping.riding_parent)
    held = fixed.crystal(glycine, np.zeros((glycine.n_asu, 3)), adp, np.zeros(glycine.n_asu))
    assert held.u_iso_equivalent[labels.index("C2")] == pytest.approx(ueq["C2"], rel=1e-12)
    for h in ("H1", "H2", "H3"):
        i = labels.index(h)
        assert held.u_iso_equivalent[i] == pytest.approx(glycine.u_iso_equivalent[i], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# riding hydrogens
# ---------------------------------------------------------------------------------------------


def _check_riding(crystal) -> int:
    """Bond vectors H − parent image are unchanged by any shift; returns the number of H checked."""
    mapping = structure_mapping(crystal)
    parent, op, lattice = crystal.riding_links()
    np.testing.assert_array_equal(mapping.riding_parent, parent)
    real = np.asarray(crystal.real_basis)
    to_fract = np.linalg.inv(real.T)
    rng = np.random.default_rng(11)
    coefficients = rng.normal(scale=0.1, size=(crystal.n_asu, 3))  # H rows are ignored
    fract = np.asarray(mapping.fract(jnp.asarray(coefficients)))
    checked = 0
    for i in np.flatnonzero(parent >= 0):
        p, rot, tran = parent[i], crystal.rotations[op[i]], crystal.translations[op[i]]

        def bond(f, i=i, p=p, rot=rot, tran=tran):
            return (f[i] - (rot @ f[p] + tran + lattice[i])) @ real

        np.testing.assert_allclose(bond(fract), bond(crystal.fract), atol=1e-12)
        # the H moves by the parent's Cartesian shift rotated by the linking operator
        parent_shift = (fract[p] - crystal.fract[p]) @ real
        h_shift = (fract[i] - crystal.fract[i]) @ real
        rotation_cart = real.T @ rot @ to_fract
        np.testing.assert_allclose(h_shift, rotation_cart @ parent_shift, atol=1e-12)
        assert np.linalg.norm(parent_shift) > 0.01
        np.testing.assert_allclose(np.linalg.norm(h_shift), np.linalg.norm(parent_shift))
        checked += 1
    # the riding H's own coefficients do nothing
    only_h = np.where((parent >= 0)[:, None], 1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(mapping.fract(jnp.asarray(only_h))), crystal.fract)
    return checked


def test_riding_hydrogens_follow_their_parent(data_dir) -> None:
    assert _check_riding(_read(data_dir, "glycine")) == 5


def test_riding_through_a_symmetry_operator(data_dir) -> None:
    """Glycine's H atoms all sit next to the identity image of their parent; move H1 to its image
    under the 2₁ screw axis so that it rides on the parent through a rotation."""
    glycine = _read(data_dir, "glycine")
    i = glycine.labels.index("H1")
    k = next(k for k in range(glycine.n_ops) if not np.allclose(glycine.rotations[k], np.eye(3)))
    fract = glycine.fract.copy()
    fract[i] = glycine.rotations[k] @ fract[i] + glycine.translations[k]
    moved = glycine.replace(fract=fract)
    _, op, _ = moved.riding_links()
    assert not np.allclose(moved.rotations[op[i]], np.eye(3))
    assert _check_riding(moved) == 5


# ---------------------------------------------------------------------------------------------
# ADP penalty
# ---------------------------------------------------------------------------------------------

#: borane.cif gives H1b3 and H1b8 hand-made, positive semi-definite Uij (12 decimals, no s.u.):
#: their smallest Cartesian eigenvalue is ≈ 1e-10 Å², below ADP_FLOOR = 1e-4 Å².
BELOW_FLOOR = {"borane": ("H1b3", "H1b8")}


def test_adp_penalty_of_the_shared_structures(crystal) -> None:
    mapping = structure_mapping(crystal)
    smallest = np.linalg.eigvalsh(_cartesian_u(crystal, crystal.u_star))[:, 0]
    low = tuple(label for label, s in zip(crystal.labels, smallest, strict=True) if s < ADP_FLOOR)
    name = next(n for n in STRUCTURES if crystal.source.endswith(f"{n}.cif"))
    assert low == BELOW_FLOOR.get(name, ())
    expected = np.sum(np.maximum(ADP_FLOOR - smallest, 0.0) ** 2)
    penalty = float(mapping.adp_penalty(jnp.zeros((crystal.n_asu, 6))))
    if low:
        assert penalty > 0
        np.testing.assert_allclose(penalty, expected, rtol=1e-8)
    else:
        assert penalty == 0.0


def test_isotropic_atoms_are_isotropic_in_cartesian_axes(data_dir) -> None:
    glycine = _read(data_dir, "glycine")
    eigenvalues = np.linalg.eigvalsh(_cartesian_u(glycine, glycine.u_star))
    np.testing.assert_allclose(
        eigenvalues, np.repeat(glycine.u_iso_equivalent[:, None], 3, axis=1), rtol=1e-12
    )


def test_adp_penalty_of_a_non_positive_definite_u(data_dir) -> None:
    quartz = _read(data_dir, "quartz")
    mapping = structure_mapping(quartz)
    o1 = quartz.labels.index("O1")
    # target O1: U_cart = diag(−0.01, 0.01, 0.02) Å², as U^cif through M (U_cart = M U^cif Mᵀ)
    m = (mapping.real_basis * mapping.reciprocal_lengths[:, None]).T
    m_inv = np.linalg.inv(m)
    target = m_inv @ np.diag([-0.01, 0.01, 0.02]) @ m_inv.T
    target_v = target[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
    adp = np.zeros((quartz.n_asu, 6))
    basis = mapping.adp_basis[o1]  # orthonormal 6 × 6 in the general position
    adp[o1] = basis.T @ (target_v - mapping.u_cif0[o1])
    np.testing.assert_allclose(np.asarray(mapping.u_cif(jnp.asarray(adp)))[o1], target_v)
    penalty = float(mapping.adp_penalty(jnp.asarray(adp)))
    np.testing.assert_allclose(penalty, (ADP_FLOOR + 0.01) ** 2, rtol=1e-9)

    # isotropic: ΔUiso = −2 Uiso turns glycine C1 into −Uiso·I
    glycine = _read(data_dir, "glycine")
    mapping = structure_mapping(glycine)
    c1 = glycine.labels.index("C1")
    u_iso = glycine.u_iso_equivalent[c1]
    adp = np.zeros((glycine.n_asu, 6))
    adp[c1, 0] = -2.0 * u_iso
    penalty = float(mapping.adp_penalty(jnp.asarray(adp)))
    np.testing.assert_allclose(penalty, (ADP_FLOOR + u_iso) ** 2, rtol=1e-9)
