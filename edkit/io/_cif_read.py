"""Reading a CIF into a :class:`~edkit.crystal.Crystal`: cell, symmetry, atom sites, ADPs."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import gemmi
import numpy as np

from edkit.crystal import ADP_INDICES, Crystal, adp_matrix, atomic_number, real_basis_of
from edkit.errors import EdkitError
from edkit.io._cif_source import (
    ANISO_KINDS,
    CELL_TAGS,
    HALL_TAGS,
    HM_TAGS,
    NUMBER_TAGS,
    SYMOP_TAGS,
    Field,
    Source,
    choose_block,
    parse_document,
    read_text,
)

EIGHT_PI2 = 8.0 * math.pi**2  # B = 8π² U
TWO_PI2 = 2.0 * math.pi**2  # β_ij = 2π² U*_ij


#: The longest cell edge read, Å: far beyond any crystal a 3D-ED experiment measures (the
#: largest are protein and virus cells of a few hundred Å), short of float overflow in the metric.
MAX_CELL_LENGTH = 1.0e4


def _read_cell(src: Source) -> tuple[float, float, float, float, float, float]:
    values = []
    for k, tag in enumerate(CELL_TAGS):
        field = src.get(tag)
        what = "a length in Å (e.g. 4.9226)" if k < 3 else "an angle in degrees (e.g. 90)"
        if field is None:
            raise EdkitError(f"{src.path}: {tag} is missing; expected {what}")
        v = src.number(field, 0, what)
        ok = 0 < v <= MAX_CELL_LENGTH if k < 3 else 0 < v < 180
        if not ok:
            limit = f" up to {MAX_CELL_LENGTH:g} Å" if k < 3 else ""
            raise src.value_error(field, 0, f"is out of range; expected {what}{limit}")
        values.append(v)
    a, b, c, al, be, ga = values
    cos = np.cos(np.deg2rad([al, be, ga]))
    # (V / abc)²: the three angles must make a cell of positive volume (e.g. not 170° each).
    if 1 - np.sum(cos**2) + 2 * np.prod(cos) <= 1e-9:
        raise EdkitError(
            f"{src.path}: the cell angles {al:g}°, {be:g}°, {ga:g}° "
            f"({', '.join(CELL_TAGS[3:])}) make no cell of positive volume"
        )
    return (a, b, c, al, be, ga)


def _ops_from_loop(src: Source, field: Field) -> list[gemmi.Op]:
    ops = []
    for row in range(len(field.raw)):
        triplet = src.text(field, row)
        try:
            op = gemmi.Op(triplet)
        except (RuntimeError, ValueError) as e:
            raise src.value_error(
                field, row, f"is not a symmetry operator ({e}); expected e.g. '-y,x-y,z+2/3'"
            ) from None
        if abs(op.det_rot()) != op.DEN**3:
            raise src.value_error(
                field, row, "is not a symmetry operator (its rotation has det ≠ ±1)"
            )
        ops.append(op.wrap())  # translations to [0, 1): one canonical form for round trips
    return ops


def _group_name(ops: list[gemmi.Op]) -> str | None:
    try:
        sg = gemmi.find_spacegroup_by_ops(gemmi.GroupOps(ops))
    except (RuntimeError, ValueError):
        return None
    return sg.xhm() if sg is not None else None


def _read_symmetry(src: Source) -> tuple[np.ndarray, np.ndarray, str]:
    """Operators (rotations (n_ops, 3, 3), translations (n_ops, 3)) and the H-M name.

    The symop loop wins when present (it is what the authors refined in, including
    non-standard settings); otherwise the H-M symbol, the Hall symbol, then the IT number.
    """
    hm_field = src.get(*HM_TAGS)
    hm = src.text(hm_field, 0).strip() if hm_field is not None else ""
    hm = "" if hm in ("?", ".") else hm
    ops_field = src.get(*SYMOP_TAGS)
    name: str | None = None
    if ops_field is not None and any(v not in ("?", ".") for v in ops_field.raw):
        ops = _ops_from_loop(src, ops_field)
        name = _group_name(ops) or hm or "unknown"
    else:
        ops = []
        if hm:
            # None for an unknown symbol (gemmi's stub omits the None)
            sg: gemmi.SpaceGroup | None = gemmi.find_spacegroup_by_name(hm)
            if sg is not None:
                ops, name = list(sg.operations()), sg.xhm()
        hall_field = src.get(*HALL_TAGS)
        if not ops and hall_field is not None and src.text(hall_field, 0) not in ("?", "."):
            try:
                group = gemmi.symops_from_hall(src.text(hall_field, 0))
            except (RuntimeError, ValueError) as e:
                raise src.value_error(
                    hall_field, 0, f"is not a Hall symbol ({e}); expected e.g. '-P 2yn'"
                ) from None
            ops = list(group)
            name = _group_name(ops) or hm or "unknown"
        number_field = src.get(*NUMBER_TAGS)
        if not ops and not hm and number_field is not None:
            number = src.optional_number(number_field, 0, "a space-group number 1–230")
            sg = gemmi.find_spacegroup_by_number(int(number)) if number else None
            if sg is None or number is None or number != int(number):
                raise src.value_error(number_field, 0, "is not a space-group number (1–230)")
            ops, name = list(sg.operations()), sg.xhm()
        if not ops:
            if hm_field is not None:
                raise src.value_error(
                    hm_field, 0, "is not a space-group symbol gemmi knows (e.g. 'P 32 2 1')"
                )
            raise EdkitError(
                f"{src.path}: no symmetry: expected a symop loop ({' or '.join(SYMOP_TAGS)}) "
                f"or a space-group symbol (_space_group_name_H-M_alt, "
                f"_symmetry_space_group_name_H-M, _space_group_name_Hall)"
            )
    rotations = np.array([op.rot for op in ops], dtype=np.float64) / gemmi.Op.DEN
    translations = np.array([op.tran for op in ops], dtype=np.float64) / gemmi.Op.DEN
    return rotations, translations, name or "unknown"


def _element_from_type(symbol: str) -> str | None:
    """Element of a type symbol such as 'Si', 'O2-', 'Fe2+', 'SI' (None if not one)."""
    m = re.match(r"^([A-Za-z]{1,2})(?:\d*[+-]?\d*)?$", symbol.strip())
    if not m:
        return None
    letters = m.group(1).capitalize()
    return letters if _is_element(letters) else None


def _element_from_label(label: str) -> str | None:
    """Element guessed from a site label such as 'Si1', 'O12a', 'CL3' (None if none fits)."""
    m = re.match(r"^([A-Za-z]{1,2})", label)
    if not m:
        return None
    letters = m.group(1)
    two = letters.capitalize() if len(letters) == 2 else None
    one = letters[0].upper()
    # "Si1" (second letter lower case) reads as Si; "CA1" or "C1A" as carbon, the common reading.
    order = [two, one] if len(letters) == 2 and letters[1].islower() else [one, two]
    return next((s for s in order if s is not None and _is_element(s)), None)


def _is_element(symbol: str) -> bool:
    try:
        atomic_number(symbol)
    except EdkitError:
        return False
    return True


@dataclass
class _Atoms:
    labels: list[str]
    elements: list[str]
    fract: np.ndarray
    u_cif: np.ndarray
    anisotropic: np.ndarray
    occupancy: np.ndarray


def _read_atoms(src: Source, cell: tuple[float, ...]) -> _Atoms:
    fx, fy, fz = (src.get(f"_atom_site_fract_{a}") for a in "xyz")
    if fx is None:
        raise EdkitError(f"{src.path}: no atom sites (_atom_site_fract_x is missing)")
    n = len(fx.raw)
    label_f = src.get("_atom_site_label")
    type_f = src.get("_atom_site_type_symbol")
    occ_f = src.get("_atom_site_occupancy")
    uiso_f = src.get("_atom_site_u_iso_or_equiv")
    biso_f = src.get("_atom_site_b_iso_or_equiv")
    if fy is None or fz is None:
        tag = "_atom_site_fract_y" if fy is None else "_atom_site_fract_z"
        raise EdkitError(f"{src.path}: {tag} is missing; atom sites need x, y and z")
    for f in (fy, fz, label_f, type_f, occ_f, uiso_f, biso_f):
        if f is not None and len(f.raw) != n:
            raise EdkitError(
                f"{src.where(f.line)}: {f.tag} has {len(f.raw)} values but "
                f"_atom_site_fract_x has {n}; expected one per atom site"
            )
    if type_f is None and label_f is None:
        raise EdkitError(
            f"{src.path}: _atom_site_label and _atom_site_type_symbol are both missing; "
            "expected at least one to tell the elements"
        )

    labels: list[str] = []
    elements: list[str] = []
    fract = np.zeros((n, 3))
    u_iso = np.full(n, np.nan)
    occupancy = np.ones(n)
    for i in range(n):
        label = src.text(label_f, i) if label_f is not None else ""
        element: str | None = None
        if type_f is not None and src.text(type_f, i) not in ("?", "."):
            element = _element_from_type(src.text(type_f, i))
            if element is None:
                raise src.value_error(
                    type_f, i, "is not an element symbol (e.g. 'Si', 'O2-', 'Fe2+')", label
                )
        elif label_f is not None:
            element = _element_from_label(label)
            if element is None:
                raise src.value_error(
                    label_f,
                    i,
                    "does not start with an element symbol and there is no "
                    "_atom_site_type_symbol (e.g. 'Si1')",
                )
        elif type_f is not None:  # no labels, and the type symbol says '?'
            raise src.value_error(type_f, i, "is missing; expected an element symbol")
        if element is None:  # unreachable: one of the branches above set it or raised
            raise EdkitError(f"{src.path}: atom {i + 1} has no element")
        label = label or f"{element}{i + 1}"
        labels.append(label)
        elements.append(element)
        for k, f in enumerate((fx, fy, fz)):
            fract[i, k] = src.number(f, i, "a fractional coordinate (e.g. 0.4713)", label)
        if occ_f is not None:
            occ = src.optional_number(occ_f, i, "an occupancy in [0, 1]", label)
            if occ is not None:
                if not 0 <= occ <= 1 + 1e-6:
                    raise src.value_error(occ_f, i, "is out of range; expected [0, 1]", label)
                occupancy[i] = occ
        if uiso_f is not None:
            u = src.optional_number(uiso_f, i, "Uiso in Å² (e.g. 0.012)", label)
            u_iso[i] = np.nan if u is None else u
        elif biso_f is not None:
            b = src.optional_number(biso_f, i, "Biso in Å² (e.g. 0.95)", label)
            u_iso[i] = np.nan if b is None else b / EIGHT_PI2

    duplicates = sorted({s for s in labels if labels.count(s) > 1})
    if duplicates:
        f = label_f if label_f is not None else fx
        raise EdkitError(
            f"{src.where(f.line)}: _atom_site_label has duplicates {duplicates}; "
            "expected unique labels (the aniso loop refers to atoms by label)"
        )

    u_cif = Crystal.u_cif_from_iso(cell, np.nan_to_num(u_iso))
    anisotropic = np.zeros(n, dtype=bool)
    _read_aniso(src, cell, labels, u_cif, anisotropic)

    missing = [labels[i] for i in range(n) if np.isnan(u_iso[i]) and not anisotropic[i]]
    if missing:
        f = uiso_f or biso_f
        where = src.where(f.line) if f is not None else src.path
        raise EdkitError(
            f"{where}: _atom_site_U_iso_or_equiv is missing for atoms {missing} and they have no "
            "_atom_site_aniso_U_* row; expected a displacement parameter in Å² (e.g. 0.012)"
        )
    return _Atoms(labels, elements, fract, u_cif, anisotropic, occupancy)


def _read_aniso(
    src: Source,
    cell: tuple[float, ...],
    labels: list[str],
    u_cif: np.ndarray,
    anisotropic: np.ndarray,
) -> None:
    """Fill ``u_cif``/``anisotropic`` in place from the aniso loop (U, B or β convention)."""
    label_f = src.get("_atom_site_aniso_label")
    if label_f is None:
        return
    kind: str | None = None
    fields: list[Field] = []
    for k in ANISO_KINDS:
        tags = [f"_atom_site_aniso_{k}_{i + 1}{j + 1}" for i, j in ADP_INDICES]
        found = [src.get(t) for t in tags]
        if any(f is not None for f in found):
            lost = [t for t, f in zip(tags, found, strict=True) if f is None]
            if lost:
                raise EdkitError(
                    f"{src.where(label_f.line)}: {lost[0]} is missing; the aniso loop needs all "
                    f"six {k}_ij"
                )
            kind, fields = k, [f for f in found if f is not None]
            break
    if kind is None:
        raise EdkitError(
            f"{src.where(label_f.line)}: _atom_site_aniso_U_11 is missing; the aniso loop needs "
            "U_ij (or B_ij, beta_ij)"
        )
    for f in fields:
        if len(f.raw) != len(label_f.raw):
            raise EdkitError(
                f"{src.where(f.line)}: {f.tag} has {len(f.raw)} values but "
                f"_atom_site_aniso_label has {len(label_f.raw)}; expected one per label"
            )
    n_rec = np.linalg.norm(np.linalg.inv(real_basis_of(cell)).T, axis=1)  # |a*|, |b*|, |c*|
    index = {s: i for i, s in enumerate(labels)}
    for row in range(len(label_f.raw)):
        label = src.text(label_f, row)
        if label not in index:
            raise src.value_error(
                label_f, row, f"is not an atom of the _atom_site loop (labels: {labels})"
            )
        vals = [src.optional_number(f, row, f"{kind}_ij (e.g. 0.0123)", label) for f in fields]
        if all(v is None for v in vals):
            continue  # a row of '?': no anisotropic parameters given for this atom
        for f, v in zip(fields, vals, strict=True):
            if v is None:
                raise src.value_error(f, row, f"is missing; expected {kind}_ij", label)
        u = adp_matrix(vals)
        if kind == "B":
            u = u / EIGHT_PI2
        elif kind == "beta":
            u = u / TWO_PI2 / (n_rec[:, None] * n_rec[None, :])
        u_cif[index[label]] = u
        anisotropic[index[label]] = True


def read_cif(path: str | os.PathLike[str], block: str | None = None) -> Crystal:
    """Read a crystal structure from a CIF file.

    Symmetry comes from the symop loop (``_space_group_symop_operation_xyz`` or
    ``_symmetry_equiv_pos_as_xyz``) when present, else from the H-M symbol, the Hall symbol or
    the IT number (gemmi's tables). ADPs: the aniso loop (U_ij, B_ij = 8π² U_ij, or β_ij =
    2π² U*_ij) where an atom has a row, else ``_atom_site_U_iso_or_equiv`` (or
    ``_atom_site_B_iso_or_equiv`` / 8π²). Occupancy defaults to 1. Values with s.u. ("4.9226(3)")
    are read without it.

    Args:
      path: the CIF file.
      block: the data block's name; by default the first block with atom sites.

    Raises:
      EdkitError: malformed syntax, an empty or binary file, no data block, no atom sites, a
        missing or non-numeric cell value, coordinate or ADP, an unknown element or space group.
        The message names the file, the field and, where the value can be located, the line.
      FileNotFoundError: no such file.
    """
    path_str = os.fspath(path)
    text = read_text(path_str)
    doc = parse_document(text, path_str)
    src = Source(path_str, text, choose_block(doc, path_str, block))
    cell = _read_cell(src)
    rotations, translations, space_group = _read_symmetry(src)
    atoms = _read_atoms(src, cell)
    return Crystal.from_asu(
        cell,
        space_group,
        atoms.labels,
        atoms.elements,
        atoms.fract,
        atoms.u_cif,
        atoms.anisotropic,
        atoms.occupancy,
        rotations,
        translations,
        source=path_str,
    )
