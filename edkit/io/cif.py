"""CIF structures in and out: :func:`read_cif` → :class:`~edkit.crystal.Crystal`, :func:`write_cif`.

Reading uses gemmi's CIF parser for the syntax and space-group tables, and reads the items and
loops itself so that every value is parsed in float64 and every error names the file, the field
and (where the value can be located) the line. Conventions are those of :mod:`edkit.crystal`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import gemmi
import numpy as np

from edkit.crystal import ADP_INDICES, Crystal, atomic_number, real_basis_of
from edkit.errors import EdkitError
from edkit.version import __version__

__all__ = ["format_with_su", "read_cif", "write_cif"]

_EIGHT_PI2 = 8.0 * math.pi**2  # B = 8π² U
_TWO_PI2 = 2.0 * math.pi**2  # β_ij = 2π² U*_ij

_CELL_TAGS = (
    "_cell_length_a",
    "_cell_length_b",
    "_cell_length_c",
    "_cell_angle_alpha",
    "_cell_angle_beta",
    "_cell_angle_gamma",
)
_SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_symmetry_equiv_pos_as_xyz")
_HM_TAGS = ("_space_group_name_h-m_alt", "_symmetry_space_group_name_h-m")
_HALL_TAGS = ("_space_group_name_hall", "_symmetry_space_group_name_hall")
_NUMBER_TAGS = ("_space_group_it_number", "_symmetry_int_tables_number")
_ANISO_KINDS = ("U", "B", "beta")

# A CIF number: optional sign, digits with optional point, optional exponent, optional s.u.
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:\(\d+\))?$")
# One CIF 1.1 token on a line: a quoted string (a quote closes only before blank or end of
# line), a comment, or a bare word.
_TOKEN = re.compile(r"""'.*?'(?=\s|$)|".*?"(?=\s|$)|#.*|\S+""")


# ---- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """One tag of the chosen data block: its raw values and where it sits in the file."""

    tag: str  # as written in the file
    raw: list[str]  # raw values, quotes kept (one for a pair item)
    line: int  # line of the pair item, or of the ``loop_`` keyword
    loop_width: int  # number of tags of its loop, 0 for a pair item
    column: int  # index of the tag in its loop


class _Source:
    """The chosen data block, indexed by lower-case tag (CIF tags are case-insensitive)."""

    def __init__(self, path: str, text: str, block: gemmi.cif.Block) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.fields: dict[str, _Field] = {}
        for item in block:
            if item.pair is not None:
                tag, raw = item.pair
                self.fields[tag.lower()] = _Field(tag, [raw], item.line_number, 0, 0)
            elif item.loop is not None:
                loop = item.loop
                width = loop.width()
                for c, tag in enumerate(loop.tags):
                    raw = list(loop.values[c::width])
                    self.fields[tag.lower()] = _Field(tag, raw, item.line_number, width, c)

    def get(self, *tags: str) -> _Field | None:
        """The first of ``tags`` present in the block (None if none is)."""
        for tag in tags:
            field = self.fields.get(tag.lower())
            if field is not None:
                return field
        return None

    def line_of(self, field: _Field, row: int) -> int | None:
        """The line holding value ``row`` of ``field`` (None if it cannot be located)."""
        if field.loop_width == 0:
            return field.line
        target = field.loop_width + row * field.loop_width + field.column  # tokens after loop_
        for n, (line, _) in enumerate(self._tokens(field.line)):
            if n == target + 1:  # + the ``loop_`` keyword itself
                return line
        return None

    def _tokens(self, start: int) -> Iterator[tuple[int, str]]:
        """(line, token) pairs from line ``start`` (1-based) on; a text field is one token."""
        i = start - 1
        while i < len(self.lines):
            line = self.lines[i]
            if line.startswith(";"):
                first = i
                i += 1
                while i < len(self.lines) and not self.lines[i].startswith(";"):
                    i += 1
                yield first + 1, "<text field>"
                i += 1
                continue
            for m in _TOKEN.finditer(line):
                if m.group().startswith("#"):
                    break
                yield i + 1, m.group()
            i += 1

    def where(self, line: int | None) -> str:
        return f"{self.path}:{line}" if line is not None else self.path

    def value_error(self, field: _Field, row: int, expected: str, label: str = "") -> EdkitError:
        """An error for value ``row`` of ``field``: file:line, tag, raw value, what was expected."""
        atom = f" (atom {label})" if label else ""
        return EdkitError(
            f"{self.where(self.line_of(field, row))}: {field.tag} = {field.raw[row]!r}{atom} "
            f"{expected}"
        )

    def number(self, field: _Field, row: int, expected: str, label: str = "") -> float:
        """Value ``row`` of ``field`` as a float, s.u. dropped ("4.9226(3)" → 4.9226)."""
        v = self.optional_number(field, row, expected, label)
        if v is None:
            raise self.value_error(field, row, f"is missing; expected {expected}", label)
        return v

    def optional_number(
        self, field: _Field, row: int, expected: str, label: str = ""
    ) -> float | None:
        """As :meth:`number`, but '?' and '.' (unknown, inapplicable) give None."""
        raw = field.raw[row]
        if raw in ("?", "."):
            return None
        text = gemmi.cif.as_string(raw).strip()
        if not _NUMBER.match(text):
            raise self.value_error(field, row, f"is not a number; expected {expected}", label)
        return float(text.split("(")[0])

    def text(self, field: _Field, row: int) -> str:
        """Value ``row`` of ``field`` unquoted."""
        return gemmi.cif.as_string(field.raw[row])


def _read_text(path: str) -> str:
    """The file's text; EdkitError for an empty or binary file."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise EdkitError(f"{path}: empty file; expected a CIF with a data_ block")
    # CIF is text: NUL bytes or a high share of control characters mean a binary file (an HDF5,
    # an image, a zip), which gemmi would otherwise report as a puzzling syntax error.
    controls = sum(b < 32 and b not in (9, 10, 12, 13) for b in data[:4096])
    if b"\x00" in data or controls > 0.05 * min(len(data), 4096):
        raise EdkitError(f"{path}: binary file, not a CIF (expected text with a data_ block)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # CIF 1.1 is ASCII, but old files carry Latin-1 (Å, °) in comments and text fields.
        return data.decode("latin-1")


def _parse_document(text: str, path: str) -> gemmi.cif.Document:
    try:
        return gemmi.cif.read_string(text)
    except (ValueError, RuntimeError) as e:
        # gemmi says "string:LINE:COL(POS): message"; restate it with our file name.
        m = re.match(r"^[^:]*:(\d+):[^:]*:\s*(.*)$", str(e), re.S)
        where, msg = (f"{path}:{m.group(1)}", m.group(2)) if m else (path, str(e))
        raise EdkitError(f"{where}: CIF syntax error: {msg}") from None


def _choose_block(doc: gemmi.cif.Document, path: str, name: str | None) -> gemmi.cif.Block:
    blocks = list(doc)
    if not blocks:
        raise EdkitError(f"{path}: no data block (expected a line 'data_NAME' before the items)")
    if name is not None:
        for b in blocks:
            if b.name.lower() == name.lower():
                return b
        raise EdkitError(f"{path}: no data block {name!r}; the file has {[b.name for b in blocks]}")
    for b in blocks:
        if b.find_values("_atom_site_fract_x"):
            return b
    raise EdkitError(
        f"{path}: no atom sites: no data block has _atom_site_fract_x "
        f"(blocks: {[b.name for b in blocks]})"
    )


def _read_cell(src: _Source) -> tuple[float, float, float, float, float, float]:
    values = []
    for k, tag in enumerate(_CELL_TAGS):
        field = src.get(tag)
        what = "a length in Å (e.g. 4.9226)" if k < 3 else "an angle in degrees (e.g. 90)"
        if field is None:
            raise EdkitError(f"{src.path}: {tag} is missing; expected {what}")
        v = src.number(field, 0, what)
        ok = v > 0 if k < 3 else 0 < v < 180
        if not ok:
            raise src.value_error(field, 0, f"is out of range; expected {what}")
        values.append(v)
    a, b, c, al, be, ga = values
    return (a, b, c, al, be, ga)


def _ops_from_loop(src: _Source, field: _Field) -> list[gemmi.Op]:
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


def _read_symmetry(src: _Source) -> tuple[np.ndarray, np.ndarray, str]:
    """Operators (rotations (n_ops, 3, 3), translations (n_ops, 3)) and the H-M name.

    The symop loop wins when present (it is what the authors refined in, including
    non-standard settings); otherwise the H-M symbol, the Hall symbol, then the IT number.
    """
    hm_field = src.get(*_HM_TAGS)
    hm = src.text(hm_field, 0).strip() if hm_field is not None else ""
    hm = "" if hm in ("?", ".") else hm
    ops_field = src.get(*_SYMOP_TAGS)
    name: str | None = None
    if ops_field is not None and any(v not in ("?", ".") for v in ops_field.raw):
        ops = _ops_from_loop(src, ops_field)
        name = _group_name(ops) or hm or "unknown"
    else:
        ops = []
        if hm:
            sg = gemmi.find_spacegroup_by_name(hm)
            if sg is not None:
                ops, name = list(sg.operations()), sg.xhm()
        hall_field = src.get(*_HALL_TAGS)
        if not ops and hall_field is not None and src.text(hall_field, 0) not in ("?", "."):
            try:
                group = gemmi.symops_from_hall(src.text(hall_field, 0))
            except (RuntimeError, ValueError) as e:
                raise src.value_error(
                    hall_field, 0, f"is not a Hall symbol ({e}); expected e.g. '-P 2yn'"
                ) from None
            ops = list(group)
            name = _group_name(ops) or hm or "unknown"
        number_field = src.get(*_NUMBER_TAGS)
        if not ops and not hm and number_field is not None:
            number = src.optional_number(number_field, 0, "a space-group number 1–230")
            sg = gemmi.find_spacegroup_by_number(int(number)) if number else None
            if sg is None or number != int(number):
                raise src.value_error(number_field, 0, "is not a space-group number (1–230)")
            ops, name = list(sg.operations()), sg.xhm()
        if not ops:
            if hm_field is not None:
                raise src.value_error(
                    hm_field, 0, "is not a space-group symbol gemmi knows (e.g. 'P 32 2 1')"
                )
            raise EdkitError(
                f"{src.path}: no symmetry: expected a symop loop ({' or '.join(_SYMOP_TAGS)}) "
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


def _read_atoms(src: _Source, cell: tuple[float, ...]) -> _Atoms:
    fx, fy, fz = (src.get(f"_atom_site_fract_{a}") for a in "xyz")
    if fx is None:
        raise EdkitError(f"{src.path}: no atom sites (_atom_site_fract_x is missing)")
    n = len(fx.raw)
    label_f = src.get("_atom_site_label")
    type_f = src.get("_atom_site_type_symbol")
    occ_f = src.get("_atom_site_occupancy")
    uiso_f = src.get("_atom_site_u_iso_or_equiv")
    biso_f = src.get("_atom_site_b_iso_or_equiv")
    for tag, f in (("_atom_site_fract_y", fy), ("_atom_site_fract_z", fz)):
        if f is None:
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
            u_iso[i] = np.nan if b is None else b / _EIGHT_PI2

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
    src: _Source,
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
    fields: list[_Field] = []
    for k in _ANISO_KINDS:
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
        u = np.zeros((3, 3))
        for f, v, (i, j) in zip(fields, vals, ADP_INDICES, strict=True):
            if v is None:
                raise src.value_error(f, row, f"is missing; expected {kind}_ij", label)
            u[i, j] = u[j, i] = v
        if kind == "B":
            u = u / _EIGHT_PI2
        elif kind == "beta":
            u = u / _TWO_PI2 / (n_rec[:, None] * n_rec[None, :])
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
    text = _read_text(path_str)
    doc = _parse_document(text, path_str)
    src = _Source(path_str, text, _choose_block(doc, path_str, block))
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


# ---- writing --------------------------------------------------------------------------------


def _bare(value: float) -> str:
    """A number with no s.u.: the shortest form that reads back, at most 10 decimals ('0.5')."""
    if not math.isfinite(value):
        return "?"
    s = np.format_float_positional(float(value), precision=10, unique=True, trim="-")
    return "0" if s in ("-0", "-0.") else s


def format_with_su(value: float, su: float | None = None) -> str:
    """``value`` in crystallographers' notation value(su), e.g. 0.12345(6), 1.2345(13).

    The s.u. is shown with two digits when they read 10–19, else with one digit, and the value
    is rounded to the same last decimal (half up). An s.u. of None, ≤ 0 or non-finite (a fixed
    parameter), or at rounding level (≤ 1e-12 relative), writes the bare value (shortest form
    that reads back, at most 10 decimals).
    An s.u. reaching the units place is written in units: 12345 ± 230 → "12300(200)". A
    non-finite value writes "?" (CIF's unknown).

    Examples: (0.12345, 0.00006) → "0.12345(6)"; (1.2345, 0.0013) → "1.2345(13)";
    (12.3, 1.5) → "12.3(15)"; (0.5, 0) → "0.5"; (0.0962, 0.096) → "0.10(10)".
    """
    value = float(value)
    if not math.isfinite(value):
        return "?"
    # An s.u. at rounding level (e.g. 1e-20 on a coordinate tied by site symmetry) is a fixed one.
    if su is None or not math.isfinite(float(su)) or float(su) <= 1e-12 * max(1.0, abs(value)):
        return _bare(value)
    su_d = Decimal(repr(abs(float(su))))

    def rounded(x: Decimal, digits: int) -> Decimal:
        # Round to `digits` significant figures, half up.
        return x.quantize(Decimal(1).scaleb(x.adjusted() - digits + 1), rounding=ROUND_HALF_UP)

    two = rounded(su_d, 2)  # e.g. 0.000126 → 0.00013; 0.0996 → 0.10 (adjusted grows)
    exponent = two.adjusted()
    if two.scaleb(-exponent) < 2:  # leading digits 10–19: keep two
        last = exponent - 1
        shown = two
    else:
        shown = rounded(su_d, 1)
        last = shown.adjusted()
        if shown.scaleb(-last) < 2:  # 0.096 → 0.1: a leading 1 takes the second digit
            last -= 1
    quantum = Decimal(1).scaleb(last)
    with localcontext() as ctx:
        ctx.prec = 80  # quantize needs every digit of the rounded value (1e30 ± 1e-5)
        v = Decimal(repr(value)).quantize(quantum, rounding=ROUND_HALF_UP)
    if v == 0:
        v = abs(v)  # no "-0.000"
    text = f"{v:f}" if last < 0 else f"{int(v)}"
    # The s.u. counts units of the value's last decimal; from the units place up it is the
    # s.u. itself ("12300(200)").
    su_digits = int(shown.scaleb(-last)) if last < 0 else int(shown)
    return f"{text}({su_digits})"


_WRITTEN_TAGS = {
    t.lower()
    for t in (
        *_CELL_TAGS,
        "_cell_volume",
        "_audit_creation_method",
        "_space_group_name_H-M_alt",
        "_symmetry_space_group_name_H-M",
        "_space_group_symop_id",
        "_space_group_symop_operation_xyz",
    )
}


def _triplet(rot: np.ndarray, tran: np.ndarray) -> str:
    op = gemmi.Op()
    den = gemmi.Op.DEN
    r = np.rint(rot * den)
    t = np.rint(tran * den)
    if not (np.allclose(r, rot * den, atol=1e-6) and np.allclose(t, tran * den, atol=1e-6)):
        raise EdkitError(
            f"operator R = {rot.tolist()}, t = {tran.tolist()} is not expressible as a CIF symop "
            f"(expected multiples of 1/{den})"
        )
    op.rot = r.astype(int).tolist()
    op.tran = t.astype(int).tolist()
    return op.wrap().triplet()


def _check_sigmas(crystal: Crystal, sigmas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    shapes = {
        "fract": (crystal.n_asu, 3),
        "u_cif": (crystal.n_asu, 3, 3),
        "occupancy": (crystal.n_asu,),
        "cell": (6,),
    }
    out = {}
    for key, value in sigmas.items():
        if key not in shapes:
            raise EdkitError(f"sigmas key {key!r} is not one of {sorted(shapes)}")
        a = np.asarray(value, dtype=np.float64)
        if a.shape != shapes[key]:
            raise EdkitError(f"sigmas[{key!r}] has shape {a.shape}; expected {shapes[key]}")
        out[key] = a
    return out


def _extra_value(key: str, value: object) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return format_with_su(float(value[0]), None if value[1] is None else float(value[1]))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float | np.integer | np.floating):
        return _bare(float(value))
    if isinstance(value, str):
        return gemmi.cif.quote(value)
    raise EdkitError(f"extra[{key!r}] = {value!r} is not a number, a (value, su) pair or a string")


def write_cif(
    crystal: Crystal,
    path: str | os.PathLike[str],
    *,
    sigmas: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, object] | None = None,
) -> None:
    """Write ``crystal`` as a CIF, with standard uncertainties where given.

    Writes the cell, the H-M symbol and symop loop, the atom_site loop (label, type, x, y, z,
    Uiso or Ueq, adp_type Uiso/Uani, occupancy, multiplicity) and the aniso loop (U_ij) for
    the anisotropic atoms. An isotropic atom is written with its Ueq.

    Args:
      crystal: the structure.
      path: output file.
      sigmas: optional s.u.s, keys among "fract" (n_asu, 3), "u_cif" (n_asu, 3, 3, Å²),
        "occupancy" (n_asu,), "cell" (6,, Å and °); a zero s.u. marks a fixed parameter and is
        omitted. The Uiso s.u. of an isotropic atom is sigmas["u_cif"][i, 0, 0] (U^cif_11 =
        Uiso); Ueq of anisotropic atoms is written without s.u. (it needs the covariances).
      extra: optional further items, tag → value: a number, a (value, su) pair or a string,
        e.g. {"_refine_ls_R_factor_obs": 0.0412}.

    Raises:
      EdkitError: bad ``sigmas`` keys or shapes, bad or clashing ``extra`` tags.
    """
    sig = _check_sigmas(crystal, sigmas or {})
    n = crystal.n_asu
    s_fract = sig.get("fract", np.zeros((n, 3)))
    s_u = sig.get("u_cif", np.zeros((n, 3, 3)))
    s_occ = sig.get("occupancy", np.zeros(n))
    s_cell = sig.get("cell", np.zeros(6))

    path_str = os.fspath(path)
    stem = Path(crystal.source or path_str).stem
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem) or "edkit"

    out = [f"data_{name}", f"_audit_creation_method 'edkit {__version__}'", ""]
    for k, tag in enumerate(_CELL_TAGS):
        out.append(f"{tag:<32} {format_with_su(crystal.cell[k], s_cell[k])}")
    out.append(f"{'_cell_volume':<32} {crystal.volume:.4f}")
    out.append("")
    sg = gemmi.cif.quote(crystal.space_group)
    out.append(f"{'_space_group_name_H-M_alt':<32} {sg}")
    out.append(f"{'_symmetry_space_group_name_H-M':<32} {sg}")
    out += ["", "loop_", "_space_group_symop_id", "_space_group_symop_operation_xyz"]
    for k in range(crystal.n_ops):
        out.append(f"{k + 1} {_triplet(crystal.rotations[k], crystal.translations[k])}")

    multiplicity = np.bincount(crystal.site_atom, minlength=n)
    ueq = crystal.u_iso_equivalent
    out += ["", "loop_"]
    out += [
        f"_atom_site_{t}"
        for t in (
            "label",
            "type_symbol",
            "fract_x",
            "fract_y",
            "fract_z",
            "U_iso_or_equiv",
            "adp_type",
            "occupancy",
            "site_symmetry_multiplicity",
        )
    ]
    labels = [gemmi.cif.quote(s) for s in crystal.labels]
    width = max(len(s) for s in labels) if labels else 1
    for i in range(n):
        xyz = " ".join(format_with_su(crystal.fract[i, k], s_fract[i, k]) for k in range(3))
        if crystal.anisotropic[i]:
            u = format_with_su(ueq[i], None)
        else:
            u = format_with_su(ueq[i], s_u[i, 0, 0])
        adp = "Uani" if crystal.anisotropic[i] else "Uiso"
        occ = format_with_su(crystal.occupancy[i], s_occ[i])
        out.append(
            f"{labels[i]:<{width}} {crystal.elements[i]:<2} {xyz} {u} {adp} {occ} {multiplicity[i]}"
        )

    aniso = np.flatnonzero(crystal.anisotropic)
    if aniso.size:
        out += ["", "loop_", "_atom_site_aniso_label", "_atom_site_aniso_type_symbol"]
        out += [f"_atom_site_aniso_U_{i + 1}{j + 1}" for i, j in ADP_INDICES]
        for a in aniso:
            us = " ".join(
                format_with_su(crystal.u_cif[a, i, j], s_u[a, i, j]) for i, j in ADP_INDICES
            )
            out.append(f"{labels[a]:<{width}} {crystal.elements[a]:<2} {us}")

    if extra:
        out.append("")
        taken = set(_WRITTEN_TAGS)
        for key, value in extra.items():
            if not re.match(r"^_[^\s]+$", key):
                raise EdkitError(f"extra key {key!r} is not a CIF tag (expected e.g. '_refine_…')")
            if key.lower() in taken or key.lower().startswith("_atom_site_"):
                raise EdkitError(f"extra key {key!r} clashes with an item write_cif writes itself")
            taken.add(key.lower())
            text = _extra_value(key, value)
            if text.startswith(";"):  # a text field must open at the start of its own line
                out += [key, text]
            else:
                out.append(f"{key:<32} {text}")
    out.append("")
    Path(path_str).write_text("\n".join(out), encoding="utf-8")
