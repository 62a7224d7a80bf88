"""CIF reading and writing (edkit/io/cif.py): values, symmetry, errors, s.u.s, round trips."""

import math
import re
from pathlib import Path

import gemmi
import numpy as np
import pytest

from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.io.cif import format_with_su, read_cif, write_cif

STRUCTURES = Path(__file__).resolve().parents[1] / "edkit" / "data" / "structures"
CIFS = sorted(STRUCTURES.glob("*.cif"))

# A small valid CIF; tests edit it to make one thing wrong. Line numbers: _cell_length_a on 2,
# the atom loop on 9, the C1 row on 16, the O1 row on 17.
MINIMAL = """\
data_test
_cell_length_a 5.0
_cell_length_b 6.0
_cell_length_c 7.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 21 21 21'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_U_iso_or_equiv
C1 C 0.1 0.2 0.3 0.01
O1 O 0.4 0.5 0.6 0.02
"""


def _write(tmp_path: Path, text: str | bytes, name: str = "bad.cif") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# ---- reading the shared structures ----------------------------------------------------------


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_all_structures_load(path: Path) -> None:
    c = read_cif(path)
    assert isinstance(c, Crystal)
    assert c.source == str(path)
    assert c.n_asu == len(gemmi.read_small_structure(str(path)).sites)
    assert c.fract.dtype == np.float64 and c.u_cif.dtype == np.float64
    assert c.atomic_numbers.dtype == np.int64
    np.testing.assert_allclose(c.u_cif, np.swapaxes(c.u_cif, 1, 2))
    assert np.all(np.linalg.eigvalsh(c.u_cif) > 0)  # positive-definite ADPs


def test_quartz_values() -> None:
    c = read_cif(STRUCTURES / "quartz.cif")
    assert c.cell == (4.9226, 4.9226, 5.4003, 90.0, 90.0, 120.0)
    assert c.space_group == "P 32 2 1"
    assert c.labels == ("Si1", "O1") and c.elements == ("Si", "O")
    np.testing.assert_array_equal(c.atomic_numbers, [14, 8])
    np.testing.assert_array_equal(c.fract[1], [0.854729, 0.585819, 0.618682])
    np.testing.assert_array_equal(c.occupancy, [1.0, 1.0])  # no occupancy column: default 1
    assert c.anisotropic.all()
    # The aniso loop lists U_23, U_13, U_12 in that order: read by tag, not by position.
    assert c.u_cif[0, 0, 0] == 0.012306
    assert c.u_cif[0, 1, 2] == c.u_cif[0, 2, 1] == -0.000532
    assert c.u_cif[0, 0, 2] == -0.001064
    assert c.u_cif[0, 0, 1] == 0.006153
    np.testing.assert_array_equal(c.rotations[1], [[0, -1, 0], [1, -1, 0], [0, 0, 1]])
    np.testing.assert_allclose(c.translations[1], [0, 0, 2 / 3])


def test_values_with_su() -> None:
    c = read_cif(STRUCTURES / "quartz_kinematical.cif")
    assert c.fract[0, 1] == 0.4718  # "0.4718(8)"
    assert c.u_cif[0, 0, 0] == 0.016  # "0.016(2)"
    b = read_cif(STRUCTURES / "borane.cif")
    assert b.cell[:3] == (10.7707, 11.9899, 10.736)  # "10.7707(5)"
    assert b.space_group == "P c c n"


def test_symmetry_from_hm_symbol_only() -> None:
    c = read_cif(STRUCTURES / "pyrite.cif")  # no symop loop: gemmi's table for 'P a -3'
    assert c.space_group == "P a -3" and c.n_ops == 24
    ours = {(tuple(r.ravel()), tuple(t)) for r, t in zip(c.rotations, c.translations, strict=True)}
    sg = gemmi.find_spacegroup_by_name("P a -3")
    theirs = {
        (tuple((np.array(op.rot) / 24).ravel()), tuple(np.array(op.tran) / 24))
        for op in sg.operations()
    }
    assert ours == theirs


def test_symmetry_from_loop_names_setting() -> None:
    c = read_cif(STRUCTURES / "glycine.cif")  # P21/n, a non-standard setting of P21/c
    assert c.space_group == "P 1 21/n 1" and c.n_ops == 4
    np.testing.assert_allclose(c.translations[2], [0.5, 0.5, 0.5])


def test_symmetry_from_hall_and_number(tmp_path: Path) -> None:
    hall = MINIMAL.replace(
        "_symmetry_space_group_name_H-M 'P 21 21 21'", "_space_group_name_Hall '-P 2yn'"
    )
    c = read_cif(_write(tmp_path, hall))
    assert c.space_group == "P 1 21/n 1" and c.n_ops == 4
    number = MINIMAL.replace(
        "_symmetry_space_group_name_H-M 'P 21 21 21'", "_space_group_IT_number 19"
    )
    c = read_cif(_write(tmp_path, number))
    assert c.space_group == "P 21 21 21" and c.n_ops == 4


def test_b_convention_and_occupancy(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "_atom_site_U_iso_or_equiv", "_atom_site_B_iso_or_equiv\n_atom_site_occupancy"
    )
    text = text.replace("0.3 0.01", "0.3 1.5 0.5(1)").replace("0.6 0.02", "0.6 2.0 ?")
    text += """loop_
_atom_site_aniso_label
_atom_site_aniso_B_11
_atom_site_aniso_B_22
_atom_site_aniso_B_33
_atom_site_aniso_B_12
_atom_site_aniso_B_13
_atom_site_aniso_B_23
O1 1.0 2.0 3.0 0.1 0.2 0.3
"""
    c = read_cif(_write(tmp_path, text))
    np.testing.assert_allclose(c.occupancy, [0.5, 1.0])  # '?' → default 1
    assert list(c.anisotropic) == [False, True]
    b = 8 * math.pi**2
    np.testing.assert_allclose(np.diag(c.u_cif[0]), [1.5 / b] * 3)  # orthorhombic: diagonal
    np.testing.assert_allclose(
        c.u_cif[1], np.array([[1, 0.1, 0.2], [0.1, 2, 0.3], [0.2, 0.3, 3]]) / b
    )


def test_beta_convention(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """loop_
_atom_site_aniso_label
_atom_site_aniso_beta_11
_atom_site_aniso_beta_22
_atom_site_aniso_beta_33
_atom_site_aniso_beta_12
_atom_site_aniso_beta_13
_atom_site_aniso_beta_23
C1 0.01 0.02 0.03 0 0 0
"""
    )
    c = read_cif(_write(tmp_path, text))
    # β_ij = 2π² U*_ij = 2π² a*_i a*_j U_ij; a* = 1/5, b* = 1/6, c* = 1/7 Å⁻¹.
    expected = np.array([0.01 * 25, 0.02 * 36, 0.03 * 49]) / (2 * math.pi**2)
    np.testing.assert_allclose(np.diag(c.u_cif[0]), expected)


def test_elements_from_labels_and_charged_types(tmp_path: Path) -> None:
    no_types = (
        MINIMAL.replace("_atom_site_type_symbol\n", "")
        .replace(" C 0.1", " 0.1")
        .replace(" O 0.4", " 0.4")
    )
    no_types = no_types.replace("C1 ", "Cl1 ")
    assert read_cif(_write(tmp_path, no_types)).elements == ("Cl", "O")
    charged = MINIMAL.replace("C1 C ", "Fe1 Fe2+ ").replace("O1 O ", "O1 O2- ")
    c = read_cif(_write(tmp_path, charged))
    assert c.elements == ("Fe", "O")
    np.testing.assert_array_equal(c.atomic_numbers, [26, 8])


def test_picks_block_with_atoms(tmp_path: Path) -> None:
    text = "data_global\n_journal_year 2024\n" + MINIMAL
    assert read_cif(_write(tmp_path, text)).labels == ("C1", "O1")
    assert read_cif(_write(tmp_path, text), block="test").n_asu == 2
    with pytest.raises(EdkitError, match="no data block 'other'"):
        read_cif(_write(tmp_path, text), block="other")


# ---- errors: file and field named, line where it can be found -------------------------------


def _raises(path: Path, pattern: str) -> None:
    with pytest.raises(EdkitError, match=re.escape(str(path)) + pattern):
        read_cif(path)


def test_error_malformed_syntax(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("O1 O 0.4 0.5 0.6 0.02", "O1 O 0.4 0.5 0.6"))
    _raises(path, r":\d+: CIF syntax error: Wrong number of values in loop _atom_site")
    path = _write(tmp_path, MINIMAL.replace("'P 21 21 21'", "'P 21 21 21"))
    _raises(path, r":8: CIF syntax error: unterminated 'string'")


def test_error_empty_file(tmp_path: Path) -> None:
    _raises(_write(tmp_path, ""), ": empty file")
    _raises(_write(tmp_path, "\n   \n"), ": empty file")


def test_error_no_data_block(tmp_path: Path) -> None:
    _raises(
        _write(tmp_path, "# only a comment\n"), r": no data block \(expected a line 'data_NAME'"
    )
    # Items before any data_ line are a syntax error (gemmi's wording).
    _raises(_write(tmp_path, "_cell_length_a 5\n"), r":1: CIF syntax error: expected block header")


def test_error_no_atom_sites(tmp_path: Path) -> None:
    text = MINIMAL.split("loop_")[0]
    _raises(_write(tmp_path, text), r": no atom sites: no data block has _atom_site_fract_x")


@pytest.mark.parametrize("tag", ["_cell_length_b", "_cell_angle_gamma"])
def test_error_missing_cell(tmp_path: Path, tag: str) -> None:
    text = "\n".join(s for s in MINIMAL.splitlines() if not s.startswith(tag))
    _raises(_write(tmp_path, text), f": {tag} is missing; expected")


def test_error_non_numeric_cell(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("_cell_length_a 5.0", "_cell_length_a abc"))
    _raises(path, r":2: _cell_length_a = 'abc' is not a number; expected a length in Å")
    path = _write(tmp_path, MINIMAL.replace("_cell_angle_beta 90", "_cell_angle_beta 190"))
    _raises(path, r":6: _cell_angle_beta = '190' is out of range; expected an angle")


def test_error_impossible_cell(tmp_path: Path) -> None:
    """An overflowing edge (found by tests/test_properties.py: 1e308 divided by zero deep in
    the metric) and angles that make no cell are refused with the file and the tags."""
    path = _write(tmp_path, MINIMAL.replace("_cell_length_a 5.0", "_cell_length_a 1e308"))
    _raises(path, r":2: _cell_length_a = '1e308' is out of range; expected a length .* 10000 Å")
    text = MINIMAL
    for tag in ("alpha", "beta", "gamma"):
        text = re.sub(rf"_cell_angle_{tag} \S+", f"_cell_angle_{tag} 170", text)
    _raises(_write(tmp_path, text), r": the cell angles 170°, 170°, 170° .* no cell of positive")


def test_error_non_numeric_coordinate(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("O1 O 0.4", "O1 O 0.1.2"))
    _raises(path, r":17: _atom_site_fract_x = '0.1.2' \(atom O1\) is not a number")
    path = _write(tmp_path, MINIMAL.replace("0.6 0.02", "0.6 x"))
    _raises(path, r":17: _atom_site_U_iso_or_equiv = 'x' \(atom O1\) is not a number")


def test_error_unknown_element(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("O1 O ", "Xq1 Xq "))
    _raises(path, r":17: _atom_site_type_symbol = 'Xq' \(atom Xq1\) is not an element symbol")


def test_error_binary_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8
    _raises(_write(tmp_path, data), r": binary file, not a CIF")
    _raises(_write(tmp_path, b"\x89HDF\r\n\x1a\n\x00\x00\x00"), r": binary file")


def test_error_bad_symop(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "_symmetry_space_group_name_H-M 'P 21 21 21'",
        "loop_\n_symmetry_equiv_pos_as_xyz\nx,y,z\n-x,-y\n",
    )
    path = _write(tmp_path, text)
    _raises(path, r":11: _symmetry_equiv_pos_as_xyz = '-x,-y' is not a symmetry operator")
    path = _write(tmp_path, text.replace("-x,-y\n", "x,x,z\n"))
    _raises(path, r":11: _symmetry_equiv_pos_as_xyz = 'x,x,z' is not a symmetry operator")


def test_error_unknown_space_group(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("'P 21 21 21'", "'Q 9'"))
    _raises(path, r":8: _symmetry_space_group_name_H-M = \"'Q 9'\" is not a space-group symbol")
    path = _write(tmp_path, MINIMAL.replace("_symmetry_space_group_name_H-M 'P 21 21 21'", ""))
    _raises(path, r": no symmetry: expected a symop loop")


def test_error_aniso_label_and_missing_u(tmp_path: Path) -> None:
    aniso = "loop_\n_atom_site_aniso_label\n" + "".join(
        f"_atom_site_aniso_U_{ij}\n" for ij in ("11", "22", "33", "12", "13", "23")
    )
    path = _write(tmp_path, MINIMAL + aniso + "N9 0.01 0.01 0.01 0 0 0\n")
    _raises(path, r":26: _atom_site_aniso_label = 'N9' is not an atom of the _atom_site loop")
    path = _write(
        tmp_path, MINIMAL + aniso.replace("_atom_site_aniso_U_23\n", "") + "C1 1 1 1 0 0\n"
    )
    _raises(path, r":\d+: _atom_site_aniso_U_23 is missing")
    path = _write(tmp_path, MINIMAL.replace("0.6 0.02", "0.6 ?"))
    _raises(path, r":9: _atom_site_U_iso_or_equiv is missing for atoms \['O1'\]")


def test_error_duplicate_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("O1 O", "C1 O"))
    _raises(path, r":9: _atom_site_label has duplicates \['C1'\]")


def test_missing_file_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_cif(tmp_path / "nope.cif")


# ---- s.u. notation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "su", "text"),
    [
        (0.12345, 0.00006, "0.12345(6)"),
        (1.2345, 0.0013, "1.2345(13)"),  # leading s.u. digit 1: two digits
        (12.3, 1.5, "12.3(15)"),
        (0.5, 0.0, "0.5"),  # fixed parameter: bare value
        (0.5, None, "0.5"),
        (0.471256, float("nan"), "0.471256"),
        (90.0, 0.0, "90"),
        (4.92264, 0.00031, "4.9226(3)"),
        (4.92266, 0.00026, "4.9227(3)"),  # value rounded half up to the s.u.'s last digit
        (-0.00231, 0.0017, "-0.0023(17)"),
        (-0.00001, 0.001, "0.0000(10)"),  # no negative zero
        (0.0962, 0.096, "0.10(10)"),  # 0.096 → 0.1: the leading 1 takes a second digit
        (0.1234, 0.0996, "0.12(10)"),
        (0.1234, 0.0194, "0.123(19)"),
        (0.1234, 0.0195, "0.12(2)"),  # 0.0195 rounds to 20 at two digits: one digit
        (1.0, 0.25, "1.0(3)"),
        (123.4, 3.0, "123(3)"),
        (12345.0, 230.0, "12300(200)"),  # s.u. above the units place, counted in units
        (float("nan"), 0.1, "?"),
    ],
)
def test_format_with_su(value: float, su: float | None, text: str) -> None:
    assert format_with_su(value, su) == text


def test_format_with_su_treats_rounding_level_su_as_fixed() -> None:
    """A coordinate tied by site symmetry gets s.u. ~1e-20 from the normal matrix: no 21-digit
    value (seen on refined quartz Si1 x), the bare value instead."""
    assert format_with_su(1.0, 5e-21) == "1"
    assert format_with_su(0.4713, 3e-17) == "0.4713"
    assert format_with_su(0.4713, 2e-4) == "0.4713(2)"


def test_format_with_su_reads_back() -> None:
    for value, su in [(0.12345, 0.00006), (1.2345, 0.0013), (12.3, 1.5)]:
        text = format_with_su(value, su)
        assert gemmi.cif.as_number(text) == pytest.approx(value, abs=su)


# ---- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_round_trip(path: Path, tmp_path: Path) -> None:
    c = read_cif(path)
    out = tmp_path / path.name
    write_cif(c, out)
    r = read_cif(out)
    np.testing.assert_allclose(r.cell, c.cell, rtol=1e-12)
    assert r.space_group == c.space_group
    np.testing.assert_array_equal(r.rotations, c.rotations)
    np.testing.assert_allclose(r.translations, c.translations, atol=1e-12)
    np.testing.assert_allclose(r.fract, c.fract, atol=1e-6)
    np.testing.assert_allclose(r.u_cif, c.u_cif, atol=1e-6)
    np.testing.assert_allclose(r.occupancy, c.occupancy, atol=1e-12)
    assert r.labels == c.labels and r.elements == c.elements
    np.testing.assert_array_equal(r.anisotropic, c.anisotropic)
    np.testing.assert_array_equal(r.site_atom, c.site_atom)
    np.testing.assert_array_equal(r.site_op, c.site_op)


@pytest.mark.parametrize("path", CIFS, ids=[p.stem for p in CIFS])
def test_gemmi_reads_written_file(path: Path, tmp_path: Path) -> None:
    c = read_cif(path)
    out = tmp_path / path.name
    write_cif(c, out, extra={"_refine_ls_R_factor_obs": 0.0412})
    small = gemmi.read_small_structure(str(out))
    assert small.spacegroup is not None and small.spacegroup.xhm() == c.space_group
    assert len(small.get_all_unit_cell_sites()) == c.n_cell
    assert [s.label for s in small.sites] == list(c.labels)
    np.testing.assert_allclose([s.fract.tolist() for s in small.sites], c.fract, atol=1e-9)
    np.testing.assert_allclose([s.occ for s in small.sites], c.occupancy, atol=1e-6)
    block = gemmi.cif.read(str(out)).sole_block()
    assert block.find_value("_refine_ls_R_factor_obs") == "0.0412"


def test_write_sigmas_and_extra(tmp_path: Path) -> None:
    c = read_cif(STRUCTURES / "quartz.cif")
    sigmas = {
        "cell": np.array([0.0003, 0.0003, 0.0005, 0, 0, 0]),
        "fract": np.array([[0, 0.00012, 0], [0.00013, 0.0002, 0.00009]]),  # Si x, z fixed
        "u_cif": np.full((2, 3, 3), 0.0004),
        "occupancy": np.zeros(2),
    }
    extra = {
        "_refine_ls_R_factor_obs": 0.0412,
        "_refine_ls_wR_factor_ref": (0.0934, 0.0012),
        "_refine_special_details": "edkit Bloch-wave refinement\nsecond line",
        "_computing_structure_refinement": "edkit",
    }
    out = tmp_path / "q.cif"
    write_cif(c, out, sigmas=sigmas, extra=extra)
    text = out.read_text()
    words = " ".join(text.split())  # loop columns are aligned (gemmi): compare the values
    assert "_cell_length_a                   4.9226(3)" in text
    assert "_cell_angle_gamma                120\n" in text
    assert "Si1 Si 1 0.47126(12) 0.833333 0.0095677778 Uani 1 3" in words  # Ueq: no s.u.
    assert "O1 O 0.85473(13) 0.5858(2) 0.61868(9) " in words
    assert "0.0123(4) 0.0115(4) 0.0052(4) 0.0062(4) -0.0011(4) -0.0005(4)" in words
    assert "_refine_ls_wR_factor_ref         0.0934(12)" in text
    block = gemmi.cif.read(str(out)).sole_block()
    assert block.find_value("_refine_ls_R_factor_obs") == "0.0412"
    assert gemmi.cif.as_string(block.find_value("_refine_special_details")).strip() == (
        "edkit Bloch-wave refinement\nsecond line"
    )
    r = read_cif(out)  # values come back rounded to their s.u.
    assert r.fract[0, 1] == 0.47126 and r.fract[1, 1] == 0.5858
    np.testing.assert_allclose(r.fract, c.fract, atol=5e-4)


def test_write_iso_su_from_u11(tmp_path: Path) -> None:
    c = read_cif(STRUCTURES / "glycine.cif")
    su = np.zeros((c.n_asu, 3, 3))
    su[:, 0, 0] = 0.002  # U^cif_11 = Uiso for an isotropic atom
    write_cif(c, tmp_path / "g.cif", sigmas={"u_cif": su})
    words = " ".join((tmp_path / "g.cif").read_text().split())
    assert "O1 O 1.1613 0.8495 -0.1015 0.015(2) Uiso 1 4" in words


def test_write_errors(tmp_path: Path) -> None:
    c = read_cif(STRUCTURES / "quartz.cif")
    with pytest.raises(EdkitError, match=r"sigmas key 'xyz' is not one of"):
        write_cif(c, tmp_path / "x.cif", sigmas={"xyz": np.zeros((2, 3))})
    with pytest.raises(
        EdkitError, match=r"sigmas\['fract'\] has shape \(3, 3\); expected \(2, 3\)"
    ):
        write_cif(c, tmp_path / "x.cif", sigmas={"fract": np.zeros((3, 3))})
    with pytest.raises(EdkitError, match=r"extra key '_cell_length_a' clashes"):
        write_cif(c, tmp_path / "x.cif", extra={"_cell_length_a": 5.0})
    with pytest.raises(EdkitError, match=r"extra key 'R1' is not a CIF tag"):
        write_cif(c, tmp_path / "x.cif", extra={"R1": 0.05})
