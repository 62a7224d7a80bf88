"""Writing a PETS2-style ``.cif_pets`` file that :func:`edkit.io.pets.read_pets` reads back."""

import math
from os import PathLike

import numpy as np
import xarray as xr
from gemmi import cif

from edkit import schema
from edkit.constants import voltage_from_wavelength
from edkit.errors import EdkitError
from edkit.io._pets_format import (
    CELL_TAGS,
    DETAIL_GEOMETRY,
    DETAIL_VARIABLES,
    DETAILS_TAG,
    GEOMETRIES,
    REFL_COLUMNS,
    UB_TAGS,
    VOLUME_TAG,
    WAVELENGTH_TAG,
    ZONE_COLUMNS,
    extra_items,
)
from edkit.io.atomic import write_atomically


def _split_extra(extra: str) -> tuple[list[str], list[str]]:
    """Lines of an ``extra_cif`` attr to write before the details (pairs) and before the
    reflection loop (loops)."""
    if not extra.strip():
        return [], []
    try:
        block = cif.read_string("data_extra\n" + extra + "\n").sole_block()
    except (RuntimeError, ValueError, IndexError) as exc:
        raise EdkitError(f"write_pets: attrs['extra_cif'] is not valid CIF: {exc}") from None
    pairs, loops = extra_items(block)
    return pairs, ("\n\n".join(loops).split("\n") if loops else [])


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
    for name, tag in CELL_TAGS.items():
        out.append(f"{tag:<32} {_fmt(float(dataset[name]))}")
    out.append(f"{VOLUME_TAG:<32} {_cell_volume(cell):.5f}")
    out.append(f"{WAVELENGTH_TAG:<32} {_fmt(wavelength)}")
    for i in range(3):
        for j in range(3):
            out.append(f"{UB_TAGS[i][j]:<32} {_fmt(ub[i, j])}")
    extra_pairs, extra_loops = _split_extra(str(dataset.attrs.get("extra_cif", "")))
    out.extend(extra_pairs)
    out.extend(["", DETAILS_TAG, ";", f"{DETAIL_GEOMETRY}: {geometry}"])
    for key, name in DETAIL_VARIABLES.items():
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
    out.extend(["", "loop_", *(tag for tag, _, _ in ZONE_COLUMNS)])
    out.extend(_columns_text(zone_columns))
    if extra_loops:
        out.extend(["", *extra_loops])
    refl_columns = [
        *([str(int(x)) for x in refl_ints[name]] for name in ("h", "k", "l")),
        [_fmt(x) for x in i_obs],
        [_fmt(x) for x in sigma],
        [str(int(x)) for x in refl_ints["frame_id"]],
    ]
    out.extend(["", "loop_", *(tag for tag, _, _ in REFL_COLUMNS)])
    out.extend(_columns_text(refl_columns))
    write_atomically(path, lambda p: p.write_text("\n".join(out) + "\n", encoding="utf-8"))
