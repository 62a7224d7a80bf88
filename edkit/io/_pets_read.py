"""Reading a PETS2 ``.cif_pets`` file into an xarray Dataset (layout: :mod:`edkit.schema`)."""

import math
from os import PathLike
from pathlib import Path

import numpy as np
import xarray as xr
from gemmi import cif

from edkit import schema
from edkit.constants import voltage_from_wavelength
from edkit.io._pets_format import (
    CELL_TAGS,
    DETAIL_GEOMETRY,
    DETAIL_LINE,
    DETAIL_VARIABLES,
    DETAILS_TAG,
    GEOMETRIES,
    REFL_COLUMNS,
    SU,
    UB_TAGS,
    WAVELENGTH_TAG,
    ZONE_COLUMNS,
    extra_items,
)
from edkit.io._pets_text import (
    Source,
    decode,
    drop_repeated_pairs,
    parse_cif,
    short_row_error,
)


def _number(source: Source, raw: str, tag: str, line: int | None, where: str = "") -> float:
    text = raw.strip()
    match = SU.match(text)
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


def _scalar(source: Source, block: cif.Block, tag: str, expected: str) -> float:
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
    source: Source,
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
            raise short_row_error(source, line, k, count, list(loop.tags))
    row_lines = [line for line, _ in rows] if len(rows) == n else [loop_line] * n
    values = np.asarray(list(loop.values), dtype=object).reshape(n, width)
    out: dict[str, np.ndarray] = {}
    for tag, name, kind in columns:
        column = values[:, index[tag]]
        out[name] = _column(source, column, tag, kind, row_lines)
    return out, row_lines


def _column(
    source: Source, column: np.ndarray, tag: str, kind: str, row_lines: list[int]
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


def _details(source: Source, block: cif.Block) -> tuple[str, dict[str, float], str]:
    """Geometry, numeric detail variables, and the remaining detail lines (verbatim)."""
    raw = block.find_value(DETAILS_TAG)
    if raw is None:
        raise source.error(
            None,
            f"missing {DETAILS_TAG} (a ;-delimited text with 'data collection geometry:' and "
            "'rotation axis position:' lines)",
        )
    text = cif.as_string(raw)
    tag_line = _pair_line(block, DETAILS_TAG) or 0
    first = tag_line  # 0-based index of the line after the tag; find the opening ";"
    while first < len(source.lines) and not source.lines[first].startswith(";"):
        first += 1
    geometry: str | None = None
    numbers: dict[str, float] = {}
    other: list[str] = []
    for j, line_text in enumerate(text.replace("\r", "").split("\n")):
        line_no = first + 1 + j  # content line j sits j lines below the opening ";"
        match = DETAIL_LINE.match(line_text)
        key = " ".join(match.group(1).lower().split()) if match else ""
        if match and key == DETAIL_GEOMETRY and geometry is None:
            geometry = " ".join(match.group(2).lower().split())
            if geometry not in GEOMETRIES:
                raise source.error(
                    line_no,
                    f"{DETAILS_TAG}: data collection geometry = {match.group(2)!r}; expected "
                    f"one of {GEOMETRIES}",
                )
        elif match and key in DETAIL_VARIABLES and DETAIL_VARIABLES[key] not in numbers:
            numbers[DETAIL_VARIABLES[key]] = _number(
                source, match.group(2), f"{DETAILS_TAG}: {key}", line_no
            )
        elif line_text.strip():
            other.append(line_text.rstrip())
    if geometry is None:
        raise source.error(
            tag_line,
            f"{DETAILS_TAG} has no 'data collection geometry:' line (expected one of {GEOMETRIES})",
        )
    if "rotation_axis_position" not in numbers:
        raise source.error(
            tag_line,
            f"{DETAILS_TAG} has no 'rotation axis position:' line (the in-plane angle of the "
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


def _extra_cif(block: cif.Block) -> str:
    """The ``extra_cif`` attr: uninterpreted pairs first, then loops, one blank line apart."""
    pairs, loops = extra_items(block)
    return "\n\n".join(part for part in ("\n".join(pairs), "\n\n".join(loops)) if part)


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
    text = decode(path, path.read_bytes())
    lines = text.splitlines()
    source = Source(path, lines)
    cleaned, notes = drop_repeated_pairs(lines)
    block = parse_cif(source, "\n".join(cleaned) + "\n")

    cell = {
        name: _scalar(source, block, tag, "Å" if "length" in tag else "degrees")
        for name, tag in CELL_TAGS.items()
    }
    for name, tag in CELL_TAGS.items():
        if cell[name] <= 0.0 or ("angle" in tag and cell[name] >= 180.0):
            raise source.error(
                _pair_line(block, tag), f"{tag} = {cell[name]!r} is not a valid cell parameter"
            )
    cos = [math.cos(math.radians(cell[n])) for n in ("cell_alpha", "cell_beta", "cell_gamma")]
    if 1 - sum(c * c for c in cos) + 2 * cos[0] * cos[1] * cos[2] <= 0.0:
        raise source.error(
            _pair_line(block, CELL_TAGS["cell_alpha"]),
            f"cell angles {cell['cell_alpha']}, {cell['cell_beta']}, {cell['cell_gamma']} degrees "
            "do not form a cell (zero or imaginary volume)",
        )
    wavelength = _scalar(source, block, WAVELENGTH_TAG, "electron wavelength, Å")
    if wavelength <= 0.0:
        raise source.error(
            _pair_line(block, WAVELENGTH_TAG),
            f"{WAVELENGTH_TAG} = {wavelength!r} is not a wavelength in Å (e.g. 0.0251)",
        )
    ub = np.array([[_scalar(source, block, t, "UB element, Å⁻¹") for t in row] for row in UB_TAGS])
    geometry, details, other_details = _details(source, block)

    zones, zone_lines = _read_loop(source, block, ZONE_COLUMNS, "zone-axis")
    refl, refl_lines = _read_loop(source, block, REFL_COLUMNS, "reflection")

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
