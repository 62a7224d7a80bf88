"""The raw text of a ``.cif_pets`` file: decoding, repeated tags, gemmi parsing, line numbers.

gemmi parses the CIF syntax; the raw lines are kept to report line numbers, to drop repeated
scalar tags (the first value wins) and to find short loop rows, which gemmi reports without one.
"""

import re
from pathlib import Path

from gemmi import cif

from edkit.errors import EdkitError
from edkit.io._pets_format import REFL_COLUMNS, ZONE_COLUMNS


class Source:
    """The raw text of a file, for line numbers and messages."""

    def __init__(self, path: Path, lines: list[str]) -> None:
        self.path = path
        self.lines = lines

    def error(self, line: int | None, message: str) -> EdkitError:
        where = f"{self.path}:{line}" if line else f"{self.path}"
        return EdkitError(f"{where}: {message}")

    def loop_rows(self, loop_line: int, width: int) -> list[tuple[int, int]]:
        """(line, number of values) of each data line of the loop whose ``loop_`` is at loop_line.

        Assumes unquoted, whitespace-separated values (true of the numeric PETS loops).
        """
        i = loop_line  # 0-based index of the line after "loop_"
        lines = self.lines
        while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("_")):
            i += 1
        rows = []
        while i < len(lines):
            stripped = lines[i].split("#", 1)[0].strip()
            if stripped.lower().startswith(("loop_", "data_", "save_", "_")):
                break
            if stripped.startswith(";"):
                break
            if stripped:
                rows.append((i + 1, len(stripped.split())))
            i += 1
        return rows


def decode(path: Path, raw: bytes) -> str:
    if not raw.strip():
        raise EdkitError(f"{path}: the file is empty; expected a PETS2 .cif_pets text file")
    head = raw[:65536]
    control = sum(b < 32 and b not in (9, 10, 12, 13) for b in head)
    if b"\x00" in head or control > 0.01 * len(head):
        raise EdkitError(
            f"{path}: binary content (NUL or control bytes); expected a PETS2 .cif_pets text file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def drop_repeated_pairs(lines: list[str]) -> tuple[list[str], list[str]]:
    """Blank the lines of a scalar tag seen before (first value wins); returns lines and notes.

    Only tags outside loops are considered; a repeated tag whose value is a semicolon text field
    loses the whole field. Line count is kept, so gemmi's line numbers still match the file.
    """
    out = list(lines)
    notes: list[str] = []
    seen: dict[str, int] = {}
    in_loop_header = False
    i = 0
    while i < len(out):
        stripped = out[i].strip()
        if out[i].startswith(";"):  # a text field not attached to a tag we handle: skip it
            i += 1
            while i < len(out) and not out[i].startswith(";"):
                i += 1
            i += 1
            continue
        low = stripped.lower()
        if low.startswith("loop_"):
            in_loop_header = True
        elif stripped.startswith("_"):
            tag = stripped.split()[0]
            if in_loop_header:
                pass
            elif tag.lower() in seen:
                end = i + 1
                if len(stripped.split(maxsplit=1)) == 1:  # value on the following line(s)
                    if end < len(out) and out[end].startswith(";"):
                        end += 1
                        while end < len(out) and not out[end].startswith(";"):
                            end += 1
                        end += 1
                    else:
                        end += 1
                notes.append(
                    f"line {i + 1}: repeated {tag} ignored (the first, line "
                    f"{seen[tag.lower()]}, is kept)"
                )
                for j in range(i, min(end, len(out))):
                    out[j] = ""
                i = end
                continue
            else:
                seen[tag.lower()] = i + 1
        elif stripped and not stripped.startswith("#"):
            in_loop_header = False
        i += 1
    return out, notes


def parse_cif(source: Source, text: str) -> cif.Block:
    try:
        doc = cif.read_string(text)
    except (RuntimeError, ValueError, IndexError) as exc:
        message = re.sub(r"^string:", "line ", str(exc))
        if "number of values in loop" in message:
            _raise_short_row(source)
        raise source.error(None, f"not readable as CIF: {message}") from None
    if len(doc) == 0:
        raise source.error(None, "no data block (data_...) found; not a PETS2 .cif_pets file")
    for block in doc:
        if block.find_loop(REFL_COLUMNS[0][0]):
            return block
    return doc[0]


def _raise_short_row(source: Source) -> None:
    """Find the loop row whose value count differs from its tag count and raise on it."""
    for i, line in enumerate(source.lines):
        if not line.strip().lower().startswith("loop_"):
            continue
        tags = []
        j = i + 1
        while j < len(source.lines) and source.lines[j].strip().startswith("_"):
            tags.append(source.lines[j].split()[0])
            j += 1
        if not tags:
            continue
        rows = source.loop_rows(i + 1, len(tags))
        for k, (line_no, count) in enumerate(rows):
            if count != len(tags):
                raise short_row_error(source, line_no, k, count, tags)
        total = sum(count for _, count in rows)
        if total % len(tags):
            line_no = rows[-1][0] if rows else i + 1
            raise short_row_error(source, line_no, len(rows) - 1, rows[-1][1], tags)


def short_row_error(source: Source, line: int, k: int, count: int, tags: list[str]) -> EdkitError:
    kind = {
        ZONE_COLUMNS[0][0]: "zone-axis",
        REFL_COLUMNS[0][0]: "reflection",
    }.get(tags[0].lower(), f"{tags[0]}")
    return source.error(
        line,
        f"{kind} loop ({tags[0]} … {tags[-1]}) row {k + 1} has {count} values, expected "
        f"{len(tags)}: the file is truncated or the row is incomplete",
    )
