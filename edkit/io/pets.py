"""PETS2 ``.cif_pets`` files as xarray Datasets: reader, writer, frame orientations.

The Dataset layout (names, dims, units) is documented in :mod:`edkit.schema`. The cell is six
0-d variables ``cell_a … cell_gamma`` (each with its own unit); :func:`cell_parameters` returns
them as one array. attrs (str only, netCDF-safe):

* ``geometry``: "continuous rotation" or "precession";
* ``source_file``: the path read (provenance);
* ``measurement_details``: the lines of ``_diffrn_measurement_details`` that have no variable of
  their own ("RC width: …", "reflection size: …", virtual-frame settings), verbatim;
* ``comments``: the file's ``#`` comment lines, verbatim (only if there are any);
* ``extra_cif``: CIF items and loops edkit does not interpret (e.g. ``_diffrn_pets_omega``, an
  ``_atom_site_`` loop), re-emitted by the writer (only if there are any);
* ``read_notes``: what the reader tolerated, e.g. a repeated scalar tag (only if anything).

CIF syntax is parsed by gemmi; the raw text is scanned only to report line numbers, to drop
repeated scalar tags (the first value wins) and to find short loop rows.
"""

import math
import re
from os import PathLike
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from gemmi import cif

from edkit import schema
from edkit.constants import voltage_from_wavelength
from edkit.errors import EdkitError
from edkit.physics.orientation import frame_rotation, orientation_matrix, real_space_basis

GEOMETRIES = ("continuous rotation", "precession")

_CELL_TAGS = {
    "cell_a": "_cell_length_a",
    "cell_b": "_cell_length_b",
    "cell_c": "_cell_length_c",
    "cell_alpha": "_cell_angle_alpha",
    "cell_beta": "_cell_angle_beta",
    "cell_gamma": "_cell_angle_gamma",
}
_WAVELENGTH_TAG = "_diffrn_radiation_wavelength"
_DETAILS_TAG = "_diffrn_measurement_details"
_VOLUME_TAG = "_cell_volume"
_UB_TAGS = [[f"_diffrn_orient_matrix_UB_{i}{j}" for j in (1, 2, 3)] for i in (1, 2, 3)]
_KNOWN_PAIRS = {
    *_CELL_TAGS.values(),
    _WAVELENGTH_TAG,
    _DETAILS_TAG,
    _VOLUME_TAG,
    *(t for row in _UB_TAGS for t in row),
}

# (file tag, dataset variable, kind) in file order; kind "int" or "float".
_ZONE_COLUMNS = [
    ("_diffrn_zone_axis_id", "frame", "int"),
    ("_diffrn_zone_axis_u", "u", "float"),
    ("_diffrn_zone_axis_v", "v", "float"),
    ("_diffrn_zone_axis_w", "w", "float"),
    ("_diffrn_zone_axis_precession_angle", "semiangle", "float"),
    ("_diffrn_zone_axis_alpha", "alpha", "float"),
    ("_diffrn_zone_axis_beta", "beta", "float"),
    ("_diffrn_zone_axis_omega", "omega", "float"),
    ("_diffrn_zone_axis_scale", "pets_scale", "float"),
]
_REFL_COLUMNS = [
    ("_refln_index_h", "h", "int"),
    ("_refln_index_k", "k", "int"),
    ("_refln_index_l", "l", "int"),
    ("_refln_intensity_meas", "I_obs", "float"),
    ("_refln_intensity_sigma", "sigma", "float"),
    ("_refln_zone_axis_id", "frame_id", "int"),
]

# Measurement-details keys with a variable of their own (lower case, single spaces).
_DETAIL_GEOMETRY = "data collection geometry"
_DETAIL_VARIABLES = {
    "dstarmax": "dstarmax",
    "mosaicity": "mosaicity",
    "rotation axis position": "rotation_axis_position",
}
_DETAIL_LINE = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")
_SU = re.compile(r"^([^()]*)\(\d+\)$")


# --------------------------------------------------------------------------------------------
# reading


class _Source:
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


def _decode(path: Path, raw: bytes) -> str:
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


def _drop_repeated_pairs(lines: list[str]) -> tuple[list[str], list[str]]:
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


def _parse_cif(source: _Source, text: str) -> cif.Block:
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
        if block.find_loop(_REFL_COLUMNS[0][0]):
            return block
    return doc[0]


def _raise_short_row(source: _Source) -> None:
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
                raise _short_row_error(source, line_no, k, count, tags)
        total = sum(count for _, count in rows)
        if total % len(tags):
            line_no = rows[-1][0] if rows else i + 1
            raise _short_row_error(source, line_no, len(rows) - 1, rows[-1][1], tags)


def _short_row_error(source: _Source, line: int, k: int, count: int, tags: list[str]) -> EdkitError:
    kind = {
        _ZONE_COLUMNS[0][0]: "zone-axis",
        _REFL_COLUMNS[0][0]: "reflection",
    }.get(tags[0].lower(), f"{tags[0]}")
    return source.error(
        line,
        f"{kind} loop ({tags[0]} … {tags[-1]}) row {k + 1} has {count} values, expected "
        f"{len(tags)}: the file is truncated or the row is incomplete",
    )


def _number(source: _Source, raw: str, tag: str, line: int | None, where: str = "") -> float:
    text = raw.strip()
    match = _SU.match(text)
    if match:
        text = match.group(1)
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise source.error(line, f"{tag}{where} = {raw!r} is not a finite number")
    return value


def _pair_line(block: cif.Block, tag: str) -> int | None:
    item = block.find_pair_item(tag)
    return item.line_number if item is not None else None


def _scalar(source: _Source, block: cif.Block, tag: str, expected: str) -> float:
    raw = block.find_value(tag)
    if raw is None:
        raise source.error(None, f"missing {tag} ({expected})")
    return _number(source, raw, tag, _pair_line(block, tag))


def _find_loop(block: cif.Block, first_tag: str) -> cif.Loop | None:
    column = block.find_loop(first_tag)
    if not column:
        return None
    return column.get_loop()


def _loop_item_line(block: cif.Block, first_tag: str) -> int | None:
    for item in block:
        if item.loop is not None and first_tag in item.loop.tags:
            return item.line_number
    return None


def _read_loop(
    source: _Source,
    block: cif.Block,
    columns: list[tuple[str, str, str]],
    what: str,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Parse one of the two PETS loops; returns {variable: array} and each row's line number."""
    first = columns[0][0]
    loop = _find_loop(block, first)
    if loop is None:
        raise source.error(None, f"no {what} loop (loop_ with {first}) found")
    tags = [t.lower() for t in loop.tags]
    loop_line = _loop_item_line(block, first) or 0
    index = {}
    for tag, _, _ in columns:
        if tag.lower() not in tags:
            raise source.error(loop_line, f"the {what} loop has no column {tag}")
        index[tag] = tags.index(tag.lower())
    width, n = loop.width(), loop.length()
    if n == 0:
        raise source.error(loop_line, f"the {what} loop ({first}) has no rows")
    rows = source.loop_rows(loop_line, width)
    for k, (line, count) in enumerate(rows):
        if count != width:
            raise _short_row_error(source, line, k, count, list(loop.tags))
    row_lines = [line for line, _ in rows] if len(rows) == n else [loop_line] * n
    values = np.asarray(list(loop.values), dtype=object).reshape(n, width)
    out: dict[str, np.ndarray] = {}
    for tag, name, kind in columns:
        column = values[:, index[tag]]
        out[name] = _column(source, column, tag, kind, row_lines)
    return out, row_lines


def _column(
    source: _Source, column: np.ndarray, tag: str, kind: str, row_lines: list[int]
) -> np.ndarray:
    dtype = np.int64 if kind == "int" else np.float64
    try:
        array = column.astype(str).astype(dtype)
    except (ValueError, OverflowError):
        array = None
    if array is not None and (kind == "int" or np.all(np.isfinite(array))):
        return array
    for k, raw in enumerate(column):  # locate the first bad value
        try:
            value = dtype(raw)
            ok = kind == "int" or math.isfinite(value)
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            expected = "an integer" if kind == "int" else "a finite number"
            raise source.error(row_lines[k], f"{tag} (row {k + 1}) = {raw!r} is not {expected}")
    raise source.error(None, f"{tag}: unreadable values")  # unreachable in practice


def _details(source: _Source, block: cif.Block) -> tuple[str, dict[str, float], str]:
    """Geometry, numeric detail variables, and the remaining detail lines (verbatim)."""
    raw = block.find_value(_DETAILS_TAG)
    if raw is None:
        raise source.error(
            None,
            f"missing {_DETAILS_TAG} (a ;-delimited text with 'data collection geometry:' and "
            "'rotation axis position:' lines)",
        )
    text = cif.as_string(raw)
    tag_line = _pair_line(block, _DETAILS_TAG) or 0
    first = tag_line  # 0-based index of the line after the tag; find the opening ";"
    while first < len(source.lines) and not source.lines[first].startswith(";"):
        first += 1
    geometry: str | None = None
    numbers: dict[str, float] = {}
    other: list[str] = []
    for j, line_text in enumerate(text.replace("\r", "").split("\n")):
        line_no = first + 1 + j  # content line j sits j lines below the opening ";"
        match = _DETAIL_LINE.match(line_text)
        key = " ".join(match.group(1).lower().split()) if match else ""
        if match and key == _DETAIL_GEOMETRY and geometry is None:
            geometry = " ".join(match.group(2).lower().split())
            if geometry not in GEOMETRIES:
                raise source.error(
                    line_no,
                    f"{_DETAILS_TAG}: data collection geometry = {match.group(2)!r}; expected "
                    f"one of {GEOMETRIES}",
                )
        elif match and key in _DETAIL_VARIABLES and _DETAIL_VARIABLES[key] not in numbers:
            numbers[_DETAIL_VARIABLES[key]] = _number(
                source, match.group(2), f"{_DETAILS_TAG}: {key}", line_no
            )
        elif line_text.strip():
            other.append(line_text.rstrip())
    if geometry is None:
        raise source.error(
            tag_line,
            f"{_DETAILS_TAG} has no 'data collection geometry:' line (expected one of "
            f"{GEOMETRIES})",
        )
    if "rotation_axis_position" not in numbers:
        raise source.error(
            tag_line,
            f"{_DETAILS_TAG} has no 'rotation axis position:' line (the in-plane angle of the "
            "goniometer axis, degrees)",
        )
    return geometry, numbers, "\n".join(other)


def _comments(lines: list[str]) -> str:
    out = []
    in_text = False
    for line in lines:
        if line.startswith(";"):
            in_text = not in_text
            continue
        if not in_text and line.lstrip().startswith("#"):
            out.append(line.rstrip())
    return "\n".join(out)


def _extra_items(block: cif.Block) -> tuple[list[str], list[str]]:
    """CIF text of the pairs and of the loops edkit does not interpret (deterministic format)."""
    known = {t.lower() for t in _KNOWN_PAIRS}
    pairs: list[str] = []
    loops: list[str] = []
    for item in block:
        if item.pair is not None:
            tag, value = item.pair
            if tag.lower() not in known:
                pairs.append(f"{tag}\n{value}" if value.startswith(";") else f"{tag} {value}")
        elif item.loop is not None:
            loop = item.loop
            tags = [t.lower() for t in loop.tags]
            if _ZONE_COLUMNS[0][0] in tags or _REFL_COLUMNS[0][0] in tags:
                continue
            width, values = loop.width(), list(loop.values)
            rows = [" ".join(values[r * width : (r + 1) * width]) for r in range(loop.length())]
            loops.append("\n".join(["loop_", *loop.tags, *rows]))
    return pairs, loops


def _extra_cif(block: cif.Block) -> str:
    """The ``extra_cif`` attr: uninterpreted pairs first, then loops, one blank line apart."""
    pairs, loops = _extra_items(block)
    return "\n\n".join(part for part in ("\n".join(pairs), "\n\n".join(loops)) if part)


def _split_extra(extra: str) -> tuple[list[str], list[str]]:
    """Lines of an ``extra_cif`` attr to write before the details (pairs) and before the
    reflection loop (loops)."""
    if not extra.strip():
        return [], []
    try:
        block = cif.read_string("data_extra\n" + extra + "\n").sole_block()
    except (RuntimeError, ValueError, IndexError) as exc:
        raise EdkitError(f"write_pets: attrs['extra_cif'] is not valid CIF: {exc}") from None
    pairs, loops = _extra_items(block)
    return pairs, ("\n\n".join(loops).split("\n") if loops else [])


def read_pets(path: str | PathLike[str]) -> xr.Dataset:
    """Read a PETS2 ``.cif_pets`` file into an xarray Dataset (layout: :mod:`edkit.schema`).

    Dims ``frame`` (the PETS zone-axis ids, int) and ``refl``; every float variable has CF
    ``units`` and ``long_name``. The Dataset survives ``to_netcdf(engine="h5netcdf")`` and
    ``open_dataset`` unchanged (``xarray.testing.assert_identical``).

    Args:
      path: the ``.cif_pets`` file.

    Raises:
      EdkitError: the file is empty, binary, not CIF, truncated, or lacks or garbles a value edkit
        needs; the message names the file, the tag and the line where there is one.
      OSError: the file cannot be opened.
    """
    path = Path(path)
    text = _decode(path, path.read_bytes())
    lines = text.splitlines()
    source = _Source(path, lines)
    cleaned, notes = _drop_repeated_pairs(lines)
    block = _parse_cif(source, "\n".join(cleaned) + "\n")

    cell = {
        name: _scalar(source, block, tag, "Å" if "length" in tag else "degrees")
        for name, tag in _CELL_TAGS.items()
    }
    for name, tag in _CELL_TAGS.items():
        if cell[name] <= 0.0 or ("angle" in tag and cell[name] >= 180.0):
            raise source.error(
                _pair_line(block, tag), f"{tag} = {cell[name]!r} is not a valid cell parameter"
            )
    cos = [math.cos(math.radians(cell[n])) for n in ("cell_alpha", "cell_beta", "cell_gamma")]
    if 1 - sum(c * c for c in cos) + 2 * cos[0] * cos[1] * cos[2] <= 0.0:
        raise source.error(
            _pair_line(block, _CELL_TAGS["cell_alpha"]),
            f"cell angles {cell['cell_alpha']}, {cell['cell_beta']}, {cell['cell_gamma']} degrees "
            "do not form a cell (zero or imaginary volume)",
        )
    wavelength = _scalar(source, block, _WAVELENGTH_TAG, "electron wavelength, Å")
    if wavelength <= 0.0:
        raise source.error(
            _pair_line(block, _WAVELENGTH_TAG),
            f"{_WAVELENGTH_TAG} = {wavelength!r} is not a wavelength in Å (e.g. 0.0251)",
        )
    ub = np.array([[_scalar(source, block, t, "UB element, Å⁻¹") for t in row] for row in _UB_TAGS])
    geometry, details, other_details = _details(source, block)

    zones, zone_lines = _read_loop(source, block, _ZONE_COLUMNS, "zone-axis")
    refl, refl_lines = _read_loop(source, block, _REFL_COLUMNS, "reflection")

    frame_ids = zones["frame"]
    unique, counts = np.unique(frame_ids, return_counts=True)
    if np.any(counts > 1):
        dup = unique[counts > 1][0]
        k = int(np.nonzero(frame_ids == dup)[0][1])
        raise source.error(
            zone_lines[k], f"_diffrn_zone_axis_id {dup} appears twice; frame ids must be unique"
        )
    orphan = ~np.isin(refl["frame_id"], frame_ids)
    if np.any(orphan):
        k = int(np.nonzero(orphan)[0][0])
        raise source.error(
            refl_lines[k],
            f"_refln_zone_axis_id (row {k + 1}) = {refl['frame_id'][k]} has no frame in the "
            "zone-axis loop",
        )
    negative = refl["sigma"] < 0.0
    if np.any(negative):
        k = int(np.nonzero(negative)[0][0])
        raise source.error(
            refl_lines[k],
            f"_refln_intensity_sigma (row {k + 1}) = {float(refl['sigma'][k])!r} is negative; "
            "expected σ(I) ≥ 0",
        )

    data_vars: dict[str, tuple] = {
        "h": ((schema.REFL,), refl["h"]),
        "k": ((schema.REFL,), refl["k"]),
        "l": ((schema.REFL,), refl["l"]),
        "frame_id": ((schema.REFL,), refl["frame_id"]),
        "I_obs": ((schema.REFL,), refl["I_obs"]),
        "sigma": ((schema.REFL,), refl["sigma"]),
        "alpha": ((schema.FRAME,), zones["alpha"]),
        "beta": ((schema.FRAME,), zones["beta"]),
        "omega": ((schema.FRAME,), zones["omega"]),
        "zone_axis": (
            (schema.FRAME, schema.UVW),
            np.stack([zones["u"], zones["v"], zones["w"]], axis=1),
        ),
        "semiangle": ((schema.FRAME,), zones["semiangle"]),
        "pets_scale": ((schema.FRAME,), zones["pets_scale"]),
        "wavelength": ((), np.float64(wavelength)),
        "voltage": ((), np.float64(voltage_from_wavelength(wavelength))),
        **{name: ((), np.float64(value)) for name, value in cell.items()},
        "UB": ((schema.UB_ROW, schema.UB_COL), ub),
        **{name: ((), np.float64(value)) for name, value in details.items()},
    }
    attrs = {"geometry": geometry, "source_file": str(path)}
    if other_details:
        attrs["measurement_details"] = other_details
    comments = _comments(lines)
    if comments:
        attrs["comments"] = comments
    extra = _extra_cif(block)
    if extra:
        attrs["extra_cif"] = extra
    if notes:
        attrs["read_notes"] = "\n".join(notes)
    dataset = xr.Dataset(
        data_vars,
        coords={"frame": ((schema.FRAME,), frame_ids), "uvw": ((schema.UVW,), ["u", "v", "w"])},
        attrs=attrs,
    )
    return schema.apply_attrs(dataset)


def cell_parameters(dataset: xr.Dataset) -> np.ndarray:
    """(a, b, c, α, β, γ) of a PETS dataset, Å and degrees, float64, shape (6,)."""
    return np.array([float(dataset[name]) for name in schema.CELL_VARIABLES], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# writing


def _fmt(value: float) -> str:
    """Shortest decimal text that reads back as the same float64 (no exponent, CIF-safe)."""
    return np.format_float_positional(np.float64(value), unique=True, trim="0")


def _columns_text(columns: list[list[str]]) -> list[str]:
    widths = [max(len(s) for s in col) for col in columns]
    return [
        " ".join(col[r].rjust(w) for col, w in zip(columns, widths, strict=True))
        for r in range(len(columns[0]))
    ]


def _require(dataset: xr.Dataset, name: str, dims: tuple[str, ...]) -> np.ndarray:
    if name not in dataset.variables:
        raise EdkitError(f"write_pets: the dataset has no variable {name!r} (dims {dims})")
    var = dataset[name]
    if var.dims != dims:
        raise EdkitError(f"write_pets: {name} has dims {var.dims}; expected {dims}")
    values = np.asarray(var.values)
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise EdkitError(f"write_pets: {name} holds NaN or infinite values")
    return values


def _check_integers(name: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise EdkitError(f"write_pets: {name} must hold integers (dtype {values.dtype})")


def _cell_volume(cell: np.ndarray) -> float:
    ca, cb, cg = np.cos(np.deg2rad(cell[3:]))
    return float(np.prod(cell[:3]) * math.sqrt(1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg))


def write_pets(dataset: xr.Dataset, path: str | PathLike[str]) -> None:
    """Write a PETS2-style ``.cif_pets`` file that :func:`read_pets` reads back identically.

    Writes the cell (and its volume, recomputed), the wavelength (the ``voltage`` variable must
    agree with it), UB, the ``_diffrn_measurement_details`` text field, ``extra_cif`` and
    ``comments`` attrs verbatim, the zone-axis loop and the reflection loop. Floats are written
    with the shortest digits that read back as the same float64, so nothing read from a file (or
    made by a simulation) is lost. ``read_pets(write_pets(read_pets(f)))`` is identical to
    ``read_pets(f)`` except for the provenance attrs ``source_file`` and ``read_notes``.

    Args:
      dataset: a Dataset with the layout of :func:`read_pets` (``mosaicity`` and ``dstarmax``
        optional).
      path: the file to write (overwritten).

    Raises:
      EdkitError: a required variable is missing, has the wrong dims, holds NaN, a negative σ, a
        reflection on an unknown frame, or a voltage that disagrees with the wavelength.
    """
    cell = np.array(
        [float(_require(dataset, name, ())) for name in schema.CELL_VARIABLES], dtype=np.float64
    )
    wavelength = float(_require(dataset, "wavelength", ()))
    if "voltage" in dataset.variables:
        voltage = float(_require(dataset, "voltage", ()))
        expected = voltage_from_wavelength(wavelength)
        if not math.isclose(voltage, expected, rel_tol=1e-6):
            raise EdkitError(
                f"write_pets: voltage = {voltage!r} V disagrees with wavelength = {wavelength!r} Å "
                f"(which gives {expected!r} V); the file stores only the wavelength"
            )
    ub = _require(dataset, "UB", (schema.UB_ROW, schema.UB_COL))
    if ub.shape != (3, 3):
        raise EdkitError(f"write_pets: UB has shape {ub.shape}; expected (3, 3)")
    geometry = str(dataset.attrs.get("geometry", ""))
    if geometry not in GEOMETRIES:
        raise EdkitError(
            f"write_pets: attrs['geometry'] = {geometry!r}; expected one of {GEOMETRIES}"
        )
    _require(dataset, "rotation_axis_position", ())

    frames = _check_integers("frame", _require(dataset, "frame", (schema.FRAME,)))
    if len(np.unique(frames)) != len(frames):
        raise EdkitError("write_pets: frame ids are not unique")
    zone = _require(dataset, "zone_axis", (schema.FRAME, schema.UVW))
    frame_vars = {
        name: _require(dataset, name, (schema.FRAME,))
        for name in ("semiangle", "alpha", "beta", "omega", "pets_scale")
    }
    refl_ints = {
        name: _check_integers(name, _require(dataset, name, (schema.REFL,)))
        for name in ("h", "k", "l", "frame_id")
    }
    i_obs = _require(dataset, "I_obs", (schema.REFL,))
    sigma = _require(dataset, "sigma", (schema.REFL,))
    if len(frames) == 0 or len(i_obs) == 0:
        raise EdkitError(
            f"write_pets: {len(frames)} frames and {len(i_obs)} reflections; a .cif_pets file "
            "needs at least one of each"
        )
    if np.any(sigma < 0):
        raise EdkitError(f"write_pets: sigma has negative values (min {float(sigma.min())!r})")
    orphan = ~np.isin(refl_ints["frame_id"], frames)
    if np.any(orphan):
        bad = int(refl_ints["frame_id"][np.nonzero(orphan)[0][0]])
        raise EdkitError(f"write_pets: frame_id {bad} is not a frame of the dataset")

    out: list[str] = ["data_pets"]
    for name, tag in _CELL_TAGS.items():
        out.append(f"{tag:<32} {_fmt(float(dataset[name]))}")
    out.append(f"{_VOLUME_TAG:<32} {_cell_volume(cell):.5f}")
    out.append(f"{_WAVELENGTH_TAG:<32} {_fmt(wavelength)}")
    for i in range(3):
        for j in range(3):
            out.append(f"{_UB_TAGS[i][j]:<32} {_fmt(ub[i, j])}")
    extra_pairs, extra_loops = _split_extra(str(dataset.attrs.get("extra_cif", "")))
    out.extend(extra_pairs)
    out.extend(["", _DETAILS_TAG, ";", f"{_DETAIL_GEOMETRY}: {geometry}"])
    for key, name in _DETAIL_VARIABLES.items():
        if name in dataset.variables:
            out.append(f"{key}: {_fmt(float(_require(dataset, name, ())))}")
    other = str(dataset.attrs.get("measurement_details", ""))
    out.extend(line for line in other.split("\n") if line.strip())
    out.append(";")
    comments = str(dataset.attrs.get("comments", ""))
    if comments:
        out.extend(["", *comments.split("\n")])

    zone_columns = [
        [str(int(f)) for f in frames],
        *([_fmt(x) for x in zone[:, c]] for c in range(3)),
        *(
            [_fmt(x) for x in frame_vars[name]]
            for name in ("semiangle", "alpha", "beta", "omega", "pets_scale")
        ),
    ]
    out.extend(["", "loop_", *(tag for tag, _, _ in _ZONE_COLUMNS)])
    out.extend(_columns_text(zone_columns))
    if extra_loops:
        out.extend(["", *extra_loops])
    refl_columns = [
        *([str(int(x)) for x in refl_ints[name]] for name in ("h", "k", "l")),
        [_fmt(x) for x in i_obs],
        [_fmt(x) for x in sigma],
        [str(int(x)) for x in refl_ints["frame_id"]],
    ]
    out.extend(["", "loop_", *(tag for tag, _, _ in _REFL_COLUMNS)])
    out.extend(_columns_text(refl_columns))
    Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# orientations


def frame_orientations(dataset: xr.Dataset) -> xr.DataArray:
    """Rotation of each frame from the crystal Cartesian frame to the lab frame, float64.

    O_i = R_z(−φ) R_z(ω_i) R_x(α_i) R_y(β_i) U with U = polar(UB · real) (see
    :mod:`edkit.physics.orientation`); O_i @ (u a + v b + w c) points along lab +z for the frame's
    zone axis [uvw], and a reflection's lab vector is O_i @ B @ hkl (Å⁻¹).

    Returns:
      DataArray ``orientation``, dims (frame, lab, crystal), coords lab = crystal =
      ["x", "y", "z"], shape (n_frame, 3, 3).
    """
    deg = np.pi / 180.0
    with jax.enable_x64(True):
        u = orientation_matrix(
            jnp.asarray(dataset["UB"].values, dtype=jnp.float64),
            jnp.asarray(cell_parameters(dataset), dtype=jnp.float64),
        )
        rotations = jax.vmap(frame_rotation, in_axes=(None, 0, 0, 0, None))(
            u,
            jnp.asarray(dataset["alpha"].values * deg, dtype=jnp.float64),
            jnp.asarray(dataset["beta"].values * deg, dtype=jnp.float64),
            jnp.asarray(dataset["omega"].values * deg, dtype=jnp.float64),
            jnp.asarray(float(dataset["rotation_axis_position"]) * deg, dtype=jnp.float64),
        )
        values = np.asarray(rotations, dtype=np.float64)
    axes = ["x", "y", "z"]
    array = xr.DataArray(
        values,
        dims=(schema.FRAME, schema.LAB, schema.CRYSTAL),
        coords={"frame": dataset["frame"].values, "lab": axes, "crystal": axes},
    )
    return schema.apply_dataarray_attrs(array, "orientation")


def zone_axes_lab(dataset: xr.Dataset, orientations: xr.DataArray | None = None) -> np.ndarray:
    """Unit lab-frame directions of each frame's zone axis u a + v b + w c, shape (n_frame, 3).

    For a consistent dataset these are all ≈ (0, 0, 1).
    """
    o = frame_orientations(dataset) if orientations is None else orientations
    with jax.enable_x64(True):
        real = np.asarray(real_space_basis(jnp.asarray(cell_parameters(dataset))))
    directions = dataset["zone_axis"].values @ real  # rows: u a + v b + w c
    lab = np.einsum("fij,fj->fi", o.values, directions)
    return lab / np.linalg.norm(lab, axis=1, keepdims=True)


def select_frames(dataset: xr.Dataset, index: Any) -> xr.Dataset:
    """The frames ``dataset.isel(frame=index)`` together with exactly their reflections.

    Args:
      dataset: from :func:`read_pets`.
      index: positional frame selection (an int array, a boolean mask or a slice).
    """
    frames = dataset.isel(frame=index)
    keep = np.isin(dataset["frame_id"].values, frames["frame"].values)
    return frames.isel(refl=np.flatnonzero(keep))


__all__ = [
    "cell_parameters",
    "frame_orientations",
    "read_pets",
    "select_frames",
    "write_pets",
    "zone_axes_lab",
]
