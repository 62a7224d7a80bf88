"""A CIF data block as edkit reads it: raw values by tag, with the file line of each value.

gemmi parses the syntax; :class:`Source` keeps every item's raw text and locates a loop value's
line by tokenising the file itself, so that errors name file:line, the tag and the raw value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import gemmi

from edkit.errors import EdkitError

CELL_TAGS = (
    "_cell_length_a",
    "_cell_length_b",
    "_cell_length_c",
    "_cell_angle_alpha",
    "_cell_angle_beta",
    "_cell_angle_gamma",
)
SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_symmetry_equiv_pos_as_xyz")
HM_TAGS = ("_space_group_name_h-m_alt", "_symmetry_space_group_name_h-m")
HALL_TAGS = ("_space_group_name_hall", "_symmetry_space_group_name_hall")
NUMBER_TAGS = ("_space_group_it_number", "_symmetry_int_tables_number")
ANISO_KINDS = ("U", "B", "beta")

# A CIF number: optional sign, digits with optional point, optional exponent, optional s.u.
NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:\(\d+\))?$")
# One CIF 1.1 token on a line: a quoted string (a quote closes only before blank or end of
# line), a comment, or a bare word.
TOKEN = re.compile(r"""'.*?'(?=\s|$)|".*?"(?=\s|$)|#.*|\S+""")


@dataclass(frozen=True)
class Field:
    """One tag of the chosen data block: its raw values and where it sits in the file."""

    tag: str  # as written in the file
    raw: list[str]  # raw values, quotes kept (one for a pair item)
    line: int  # line of the pair item, or of the ``loop_`` keyword
    loop_width: int  # number of tags of its loop, 0 for a pair item
    column: int  # index of the tag in its loop


class Source:
    """The chosen data block, indexed by lower-case tag (CIF tags are case-insensitive)."""

    def __init__(self, path: str, text: str, block: gemmi.cif.Block) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.fields: dict[str, Field] = {}
        for item in block:
            if item.pair is not None:
                # gemmi's stub types Item.pair as object; it is a (tag, value) pair of str.
                tag, value = cast(tuple[str, str], item.pair)
                self.fields[tag.lower()] = Field(tag, [value], item.line_number, 0, 0)
            elif item.loop is not None:
                loop = item.loop
                width = loop.width()
                for c, tag in enumerate(loop.tags):
                    raw = list(loop.values[c::width])
                    self.fields[tag.lower()] = Field(tag, raw, item.line_number, width, c)

    def get(self, *tags: str) -> Field | None:
        """The first of ``tags`` present in the block (None if none is)."""
        for tag in tags:
            field = self.fields.get(tag.lower())
            if field is not None:
                return field
        return None

    def line_of(self, field: Field, row: int) -> int | None:
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
            for m in TOKEN.finditer(line):
                if m.group().startswith("#"):
                    break
                yield i + 1, m.group()
            i += 1

    def where(self, line: int | None) -> str:
        return f"{self.path}:{line}" if line is not None else self.path

    def value_error(self, field: Field, row: int, expected: str, label: str = "") -> EdkitError:
        """An error for value ``row`` of ``field``: file:line, tag, raw value, what was expected."""
        atom = f" (atom {label})" if label else ""
        return EdkitError(
            f"{self.where(self.line_of(field, row))}: {field.tag} = {field.raw[row]!r}{atom} "
            f"{expected}"
        )

    def number(self, field: Field, row: int, expected: str, label: str = "") -> float:
        """Value ``row`` of ``field`` as a float, s.u. dropped ("4.9226(3)" → 4.9226)."""
        v = self.optional_number(field, row, expected, label)
        if v is None:
            raise self.value_error(field, row, f"is missing; expected {expected}", label)
        return v

    def optional_number(
        self, field: Field, row: int, expected: str, label: str = ""
    ) -> float | None:
        """As :meth:`number`, but '?' and '.' (unknown, inapplicable) give None."""
        raw = field.raw[row]
        if raw in ("?", "."):
            return None
        text = gemmi.cif.as_string(raw).strip()
        if not NUMBER.match(text):
            raise self.value_error(field, row, f"is not a number; expected {expected}", label)
        return float(text.split("(")[0])

    def text(self, field: Field, row: int) -> str:
        """Value ``row`` of ``field`` unquoted."""
        return gemmi.cif.as_string(field.raw[row])


def read_text(path: str) -> str:
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


def parse_document(text: str, path: str) -> gemmi.cif.Document:
    try:
        return gemmi.cif.read_string(text)
    except (ValueError, RuntimeError) as e:
        # gemmi says "string:LINE:COL(POS): message"; restate it with our file name.
        m = re.match(r"^[^:]*:(\d+):[^:]*:\s*(.*)$", str(e), re.S)
        where, msg = (f"{path}:{m.group(1)}", m.group(2)) if m else (path, str(e))
        raise EdkitError(f"{where}: CIF syntax error: {msg}") from None


def choose_block(doc: gemmi.cif.Document, path: str, name: str | None) -> gemmi.cif.Block:
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
