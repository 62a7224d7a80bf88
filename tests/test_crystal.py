"""Crystal: metric, expansion, site-symmetry projectors, riding parents (edkit/crystal.py)."""

import math
from pathlib import Path

import gemmi
import numpy as np
import pytest

from edkit.crystal import Crystal, adp_matrix, adp_vector, atomic_number
from edkit.errors import EdkitError
from edkit.io.cif import read_cif

STRUCTURES = Path(__file__).resolve().parents[1] / "edkit" / "data" / "structures"
CIFS = sorted(STRUCTURES.glob("*.cif"))


def _read(name: str) -> Crystal:
    return read_cif(STRUCTURES / name)


@pytest.fixture(scope="module")
def quartz() -> Crystal:
    return _read("quartz.cif")


@pytest.fixture(scope="module")
def pyrite() -> Crystal:
    return _read("pyrite.cif")


# ---- metric -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_real_basis_reproduces_cell(path: Path) -> None:
    c = read_cif(path)
    basis = c.real_basis
    a, b, cc, al, be, ga = c.cell
    np.testing.assert_allclose(np.linalg.norm(basis, axis=1), [a, b, cc], rtol=1e-12)

    def angle(u: np.ndarray, v: np.ndarray) -> float:
        return math.degrees(math.acos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))

    np.testing.assert_allclose(
        [angle(basis[1], basis[2]), angle(basis[0], basis[2]), angle(basis[0], basis[1])],
        [al, be, ga],
        atol=1e-10,
    )
    # a along x, b in the xy plane, right-handed.
    assert basis[0, 1] == basis[0, 2] == basis[1, 2] == 0.0
    assert np.linalg.det(basis) > 0
    np.testing.assert_allclose(c.volume, np.linalg.det(basis))
    # a*·a = 1 without 2π, G* = B*B*ᵀ = G⁻¹.
    np.testing.assert_allclose(c.reciprocal_basis @ basis.T, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(c.reciprocal_metric, np.linalg.inv(basis @ basis.T), rtol=1e-12)


def test_quartz_reciprocal_lengths(quartz: Crystal) -> None:
    a, _, c = quartz.cell[:3]
    # Hexagonal: |a*| = |b*| = 2/(a√3), |c*| = 1/c; Ω = a²c sin 120°.
    np.testing.assert_allclose(
        np.linalg.norm(quartz.reciprocal_basis, axis=1),
        [2 / (a * math.sqrt(3)), 2 / (a * math.sqrt(3)), 1 / c],
        rtol=1e-13,
    )
    np.testing.assert_allclose(quartz.volume, a * a * c * math.sqrt(3) / 2, rtol=1e-13)
    assert quartz.volume == pytest.approx(113.3281, abs=1e-4)  # _cell_volume of quartz.cif


def test_glycine_triclinic_metric_matches_gemmi() -> None:
    c = _read("glycine.cif")  # nearly monoclinic, all three angles ≠ 90°
    cell = gemmi.UnitCell(*c.cell)
    assert c.volume == pytest.approx(cell.volume, rel=1e-12)
    rec = cell.reciprocal()
    np.testing.assert_allclose(
        np.linalg.norm(c.reciprocal_basis, axis=1), [rec.a, rec.b, rec.c], rtol=1e-12
    )
    # gemmi's orthogonalisation matrix has columns a, b, c in the same convention (a ∥ x).
    np.testing.assert_allclose(c.real_basis, np.array(cell.orth.mat.tolist()).T, atol=1e-12)
    hkl = np.array([1, -2, 3])
    assert hkl @ c.reciprocal_metric @ hkl == pytest.approx(cell.calculate_1_d2([1, -2, 3]))


# ---- displacement parameters ----------------------------------------------------------------


def test_iso_u_star_is_uiso_times_reciprocal_metric() -> None:
    c = _read("glycine.cif")  # all atoms Uiso, triclinic metric: every G* element non-zero
    assert not c.anisotropic.any()
    u_iso = np.array([0.015, 0.013, 0.012, 0.013, 0.012, 0.0196, 0.0196, 0.0183, 0.0183, 0.0183])
    np.testing.assert_allclose(
        c.u_star, u_iso[:, None, None] * c.reciprocal_metric[None], rtol=1e-12
    )
    np.testing.assert_allclose(c.u_iso_equivalent, u_iso, rtol=1e-12)
    np.testing.assert_allclose(np.diagonal(c.u_cif, axis1=1, axis2=2), u_iso[:, None] * [1, 1, 1])


@pytest.mark.parametrize(
    ("name", "ueq", "atol"),
    [
        # _atom_site_U_iso_or_equiv of the files, rounded there to their last digit.
        ("borane.cif", {"B1": 0.0087, "B2": 0.0074, "B3": 0.0104, "B9": 0.0068}, 6e-5),
        ("quartz_kinematical.cif", {"Si1": 0.0089, "O1": 0.0168}, 2e-4),
        ("pyrite.cif", {"Fe1": 0.005, "S1": 0.007}, 1e-12),
    ],
)
def test_ueq_matches_file(name: str, ueq: dict[str, float], atol: float) -> None:
    c = _read(name)
    got = [c.u_iso_equivalent[c.labels.index(label)] for label in ueq]
    np.testing.assert_allclose(got, list(ueq.values()), atol=atol)


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_ueq_matches_gemmi(path: Path) -> None:
    c = read_cif(path)
    cell = gemmi.UnitCell(*c.cell)
    for u, ueq in zip(c.u_cif, c.u_iso_equivalent, strict=True):
        gemmi_u = gemmi.SMat33d(*adp_vector(u))  # gemmi's order is U11 U22 U33 U12 U13 U23
        assert ueq == pytest.approx(cell.calculate_u_eq(gemmi_u), rel=1e-10)


def test_quartz_ueq_hexagonal_formula(quartz: Crystal) -> None:
    # Ueq = ⅓ Σ Uij a*i a*j ai·aj; hexagonal: ⅓[(4/3)(U11 + U22 − U12) + U33].
    u = quartz.u_cif
    expected = ((u[:, 0, 0] + u[:, 1, 1] - u[:, 0, 1]) * 4 / 3 + u[:, 2, 2]) / 3
    np.testing.assert_allclose(quartz.u_iso_equivalent, expected, rtol=1e-12)


def test_adp_vector_matrix_round_trip() -> None:
    v = np.arange(1.0, 7.0)
    m = adp_matrix(v)
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(m[0], [1, 4, 5])
    np.testing.assert_array_equal(m[1], [4, 2, 6])
    np.testing.assert_array_equal(adp_vector(m), v)


# ---- expansion ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("quartz.cif", {"Si": 3, "O": 6}),
        ("quartz_kinematical.cif", {"Si": 3, "O": 6}),
        ("pyrite.cif", {"Fe": 4, "S": 8}),  # Pa-3: 4a and 8c
        ("glycine.cif", {"C": 8, "H": 20, "N": 4, "O": 8}),  # P21/n, Z = 4, all general
        ("borane.cif", {"B": 72, "H": 88}),  # Pccn, 20 general sites × 8
    ],
)
def test_cell_counts(name: str, counts: dict[str, int]) -> None:
    c = _read(name)
    got: dict[str, int] = {}
    for i in c.site_atom:
        got[c.elements[i]] = got.get(c.elements[i], 0) + 1
    assert got == counts


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_expansion_matches_gemmi(path: Path) -> None:
    """Same unit-cell sites as gemmi's own expansion (an independent implementation)."""
    c = read_cif(path)
    small = gemmi.read_small_structure(str(path))
    sites = small.get_all_unit_cell_sites()
    assert c.n_cell == len(sites)
    ours = c.cell_fract
    assert np.all((ours >= 0) & (ours < 1))
    basis = c.real_basis
    for site in sites:
        x = np.array([site.fract.x, site.fract.y, site.fract.z])
        d = ours - x
        dist = np.linalg.norm((d - np.round(d)) @ basis, axis=1)
        j = int(np.argmin(dist))
        assert dist[j] < 1e-3
        assert c.labels[c.site_atom[j]] == site.label


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_orbit_stabiliser(path: Path) -> None:
    """|orbit| × |stabiliser| = number of operators, for every asymmetric-unit atom."""
    c = read_cif(path)
    multiplicity = np.bincount(c.site_atom, minlength=c.n_asu)
    stab = [len(s) for s in c.stabilisers()]
    np.testing.assert_array_equal(multiplicity * np.array(stab), c.n_ops)


def test_cell_u_star_is_rotated(quartz: Crystal) -> None:
    rot = quartz.rotations[quartz.site_op]
    expected = rot @ quartz.u_star[quartz.site_atom] @ np.swapaxes(rot, 1, 2)
    np.testing.assert_allclose(quartz.cell_u_star, expected, rtol=1e-14)
    # Every operator that maps Si onto the same site gives the same U*' (site symmetry holds).
    si = quartz.stabilisers()[0]
    u = quartz.u_star[0]
    for k in si:
        r = quartz.rotations[k]
        np.testing.assert_allclose(r @ u @ r.T, u, atol=1e-8)


def test_special_position_written_to_four_digits() -> None:
    """A site at 1/3 written as 0.3333 (0.0015 Å off) is still one site, not three."""
    ops = [gemmi.Op(t) for t in ("x,y,z", "-y,x-y,z", "-x+y,-x,z")]  # P3
    c = Crystal.from_asu(
        (5.0, 5.0, 6.0, 90, 90, 120),
        "P 3",
        ["A", "B"],
        ["Si", "O"],
        np.array([[1 / 3 - 0.00003, 2 / 3 + 0.00003, 0.1], [0.2, 0.1, 0.3]]),
        np.zeros((2, 3, 3)),
        np.zeros(2, bool),
        np.ones(2),
        np.array([op.rot for op in ops]) / 24,
        np.array([op.tran for op in ops]) / 24,
    )
    assert list(np.bincount(c.site_atom)) == [1, 3]
    assert np.linalg.matrix_rank(c.position_projectors()[0]) == 1  # only z is free


# ---- projectors -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_projectors_idempotent_and_invariant(path: Path) -> None:
    c = read_cif(path)
    rng = np.random.default_rng(0)
    pos = c.position_projectors()
    adp = c.adp_projectors()
    n = np.linalg.norm(c.reciprocal_basis, axis=1)
    for i, stab in enumerate(c.stabilisers()):
        np.testing.assert_allclose(pos[i] @ pos[i], pos[i], atol=1e-12)
        np.testing.assert_allclose(adp[i] @ adp[i], adp[i], atol=1e-12)
        delta = pos[i] @ rng.normal(size=3)
        u = adp_matrix(adp[i] @ rng.normal(size=6))
        u_star = u * n[:, None] * n[None, :]
        for k in stab:
            r = c.rotations[k]
            np.testing.assert_allclose(r @ delta, delta, atol=1e-12)
            np.testing.assert_allclose(r @ u_star @ r.T, u_star, atol=1e-12)
        # A projected shift keeps the atom on its special position: same stabiliser after it.
        moved = c.replace(fract=c.fract + 0.01 * np.eye(c.n_asu)[i][:, None] * delta)
        assert list(moved.stabilisers()[i]) == list(stab)


@pytest.mark.parametrize(
    ("name", "position_ranks", "adp_ranks"),
    [
        ("quartz.cif", [1, 3], [4, 6]),  # Si on a 2-fold axis (3a/3b), O general
        ("quartz_kinematical.cif", [1, 3], [4, 6]),
        ("pyrite.cif", [0, 1], [2, 2]),  # Fe on 3̄ (4a), S on 3 (8c: x, x, x)
        ("glycine.cif", [3] * 10, [6] * 10),
    ],
)
def test_projector_ranks(name: str, position_ranks: list[int], adp_ranks: list[int]) -> None:
    c = _read(name)
    assert [int(np.linalg.matrix_rank(p)) for p in c.position_projectors()] == position_ranks
    assert [int(np.linalg.matrix_rank(p)) for p in c.adp_projectors()] == adp_ranks


def test_pyrite_fe_adp_constraints(pyrite: Crystal) -> None:
    p = pyrite.adp_projectors()[0]
    v = p @ np.array([0.011, 0.02, 0.03, 0.004, -0.005, 0.006])
    # 3̄ along [111] (3-fold x→y→z→x, and 1̄ which leaves U alone): U11 = U22 = U33 and
    # U12 = U13 = U23, each the mean of the inputs.
    np.testing.assert_allclose(v, [0.061 / 3] * 3 + [0.005 / 3] * 3, rtol=1e-12)
    assert np.allclose(pyrite.position_projectors()[0], 0)


def test_quartz_si_constraints_match_file(quartz: Crystal) -> None:
    """The file's Uij already obey the 2-fold along b: projecting them changes nothing."""
    for p, u in zip(quartz.adp_projectors(), quartz.u_cif, strict=True):
        np.testing.assert_allclose(p @ adp_vector(u), adp_vector(u), atol=1e-9)
    # Hexagonal 2-fold along b (−x, −x+y, −z): U11 = 2 U12, U13 = 2 U23 for any projected U.
    v = quartz.adp_projectors()[0] @ np.array([0.01, 0.02, 0.03, 0.004, -0.005, 0.006])
    assert v[0] == pytest.approx(2 * v[3])
    assert v[4] == pytest.approx(2 * v[5])
    # Position: only y moves, x fixed at the 2-fold axis.
    d = quartz.position_projectors()[0] @ np.array([0.3, 0.2, 0.1])
    assert d[0] == pytest.approx(0) and d[2] == pytest.approx(0) and d[1] != 0


def test_adp_projector_basis_with_unequal_axes() -> None:
    """An operator mixing axes of different |a*| catches a map applied to the wrong basis."""
    swap = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])  # x ↔ y with a ≠ b
    c = Crystal.from_asu(
        (3.0, 5.0, 7.0, 90, 90, 90),
        "test",
        ["X"],
        ["C"],
        np.array([[0.2, 0.2, 0.1]]),
        np.zeros((1, 3, 3)),
        np.zeros(1, bool),
        np.ones(1),
        np.stack([np.eye(3), swap]),
        np.zeros((2, 3)),
    )
    p = c.adp_projectors()[0]
    u = adp_matrix(p @ np.array([0.01, 0.02, 0.03, 0.004, -0.005, 0.006]))
    n = np.linalg.norm(c.reciprocal_basis, axis=1)  # 1/3, 1/5, 1/7 Å⁻¹
    u_star = u * np.outer(n, n)
    np.testing.assert_allclose(swap @ u_star @ swap.T, u_star, atol=1e-15)
    # The naive average of U ↦ R U Rᵀ on U^cif is a different, wrong projector here.
    naive = np.mean(
        [adp_vector(r @ adp_matrix(np.eye(6)) @ r.T).T for r in (np.eye(3), swap)], axis=0
    )
    assert not np.allclose(naive, p)


# ---- riding hydrogens -----------------------------------------------------------------------


def test_glycine_riding_parents() -> None:
    c = _read("glycine.cif")
    parents = c.riding_parents()
    named = {c.labels[i]: (c.labels[p] if p >= 0 else None) for i, p in enumerate(parents)}
    assert named == {
        "O1": None,
        "O2": None,
        "C1": None,
        "C2": None,
        "N1": None,
        "H1": "C2",
        "H2": "C2",
        "H3": "N1",
        "H4": "N1",
        "H5": "N1",
    }


def test_borane_riding_parents() -> None:
    c = _read("borane.cif")
    parents = c.riding_parents()
    for i, label in enumerate(c.labels):
        if c.elements[i] != "H":
            assert parents[i] == -1
        elif label.count("b") == 1:  # terminal H1bN rides on BN
            assert c.labels[parents[i]] == "B" + label.split("b")[1]
        else:  # bridging B–H–B (1.36–1.38 Å here) are beyond the default 1.3 Å
            assert parents[i] == -1
            wider = c.riding_parents(max_distance=1.45)[i]
            assert c.labels[wider].lower() in label.lower()


def test_riding_parent_on_a_symmetry_copy() -> None:
    """H moved to a symmetry-equivalent position still finds its parent, through the operator."""
    c = _read("glycine.cif")
    h = c.labels.index("H3")
    r, t = c.rotations[3], c.translations[3]
    moved = c.replace(fract=np.where(np.arange(c.n_asu)[:, None] == h, r @ c.fract[h] + t, c.fract))
    parent, op, shift = moved.riding_links()
    assert moved.labels[parent[h]] == "N1"
    assert op[h] == 3
    image = r @ c.fract[parent[h]] + t + shift[h]
    dist = np.linalg.norm((image - moved.fract[h]) @ c.real_basis)
    assert dist == pytest.approx(0.891, abs=2e-3)  # _geom_bond_distance N1–H3


# ---- construction ---------------------------------------------------------------------------


def test_replace_and_readonly(quartz: Crystal) -> None:
    shifted = quartz.replace(fract=quartz.fract + 0.001)
    assert shifted is not quartz
    np.testing.assert_allclose(shifted.fract - quartz.fract, 0.001)
    np.testing.assert_array_equal(shifted.site_atom, quartz.site_atom)
    with pytest.raises(ValueError, match="read-only"):
        quartz.fract[0, 0] = 0.5
    with pytest.raises(EdkitError, match=r"unknown field.*'fractional'"):
        quartz.replace(fractional=quartz.fract)
    with pytest.raises(EdkitError, match=r"Crystal.fract has shape \(2, 2\); expected \(2, 3\)"):
        quartz.replace(fract=np.zeros((2, 2)))


def test_repr(quartz: Crystal) -> None:
    text = repr(quartz)
    assert text.startswith("Crystal(O2Si, P 32 2 1, a=4.9226 b=4.9226 c=5.4003 Å")
    assert "γ=120°" in text and "2 atoms in the asymmetric unit, 9 in the cell" in text
    assert repr(_read("glycine.cif")).startswith("Crystal(C2H5NO2, P 1 21/n 1,")


@pytest.mark.parametrize(
    ("cell", "match"),
    [
        ((5, 5, -1, 90, 90, 90), "lengths"),
        ((5, 5, 5, 90, 90, 180), "angles"),
        ((5, 5, 5, 10, 10, 100), "positive volume"),
    ],
)
def test_bad_cell(quartz: Crystal, cell: tuple[float, ...], match: str) -> None:
    with pytest.raises(EdkitError, match=match):
        quartz.replace(cell=cell)


def test_atomic_number() -> None:
    assert [atomic_number(s) for s in ("H", "D", "O", "Si", "Fe", "Og")] == [1, 1, 8, 14, 26, 118]
    with pytest.raises(EdkitError, match="'Xq' is not an element symbol"):
        atomic_number("Xq")
