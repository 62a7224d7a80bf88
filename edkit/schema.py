"""Names, dimensions, units and long names of edkit's xarray datasets, in one place (style.md §5).

Readers, writers and panels take every variable name, unit and label from here, so that a plot
labelled by xarray (``long_name [units]``) and a file written by edkit always agree.

Units are CF strings: "angstrom", "1/angstrom", "degree", "V", "1" (dimensionless or arbitrary
counts). Integer variables (Miller indices, frame ids) carry a ``long_name`` only.

Layout of a PETS2 dataset (see :func:`edkit.io.pets.read_pets`):

========================  =====================  ==========  ====================================
name                      dims                   units       meaning
========================  =====================  ==========  ====================================
frame (coord, int64)      (frame,)               —           PETS zone-axis id of the frame
uvw (coord, str)          (uvw,)                 —           "u", "v", "w"
h, k, l (int64)           (refl,)                —           Miller indices
frame_id (int64)          (refl,)                —           id of the frame the reflection is on
I_obs                     (refl,)                "1"         integrated intensity (can be < 0)
sigma                     (refl,)                "1"         standard uncertainty of I_obs, ≥ 0
alpha, beta, omega        (frame,)               degree      goniometer angles of the frame
zone_axis                 (frame, uvw)           "1"         zone axis [uvw] (real-space lattice)
semiangle                 (frame,)               degree      precession / rocking semi-angle
pets_scale                (frame,)               "1"         PETS frame scale
wavelength                ()                     angstrom    electron wavelength
voltage                   ()                     V           accelerating voltage
cell_a, cell_b, cell_c    ()                     angstrom    cell lengths
cell_alpha/beta/gamma     ()                     degree      cell angles
UB                        (ub_row, ub_col)       1/angstrom  PETS orientation matrix
rotation_axis_position    ()                     degree      in-plane angle of the goniometer axis
mosaicity                 ()                     degree      (only if the file gives it)
dstarmax                  ()                     1/angstrom  resolution limit (only if given)
========================  =====================  ==========  ====================================
"""

from typing import NamedTuple

import numpy as np
import xarray as xr

# Dimension names (the one vocabulary of style.md §5).
FRAME = "frame"
REFL = "refl"
UVW = "uvw"
UB_ROW = "ub_row"
UB_COL = "ub_col"
LAB = "lab"
CRYSTAL = "crystal"

ANGSTROM = "angstrom"
PER_ANGSTROM = "1/angstrom"
DEGREE = "degree"
VOLT = "V"
DIMENSIONLESS = "1"


class VariableSpec(NamedTuple):
    """What one variable of an edkit dataset is: its dims, CF units (None for integers), label."""

    dims: tuple[str, ...]
    units: str | None
    long_name: str


#: Every variable and coordinate name an edkit PETS dataset may hold.
VARIABLES: dict[str, VariableSpec] = {
    # coordinates
    "frame": VariableSpec((FRAME,), None, "frame (PETS zone-axis id)"),
    "uvw": VariableSpec((UVW,), None, "zone-axis index"),
    "lab": VariableSpec((LAB,), None, "lab Cartesian axis"),
    "crystal": VariableSpec((CRYSTAL,), None, "crystal Cartesian axis"),
    # reflections
    "h": VariableSpec((REFL,), None, "Miller index h"),
    "k": VariableSpec((REFL,), None, "Miller index k"),
    "l": VariableSpec((REFL,), None, "Miller index l"),
    "frame_id": VariableSpec((REFL,), None, "frame of the reflection (PETS zone-axis id)"),
    "I_obs": VariableSpec((REFL,), DIMENSIONLESS, "observed integrated intensity"),
    "sigma": VariableSpec((REFL,), DIMENSIONLESS, "standard uncertainty of the intensity"),
    # frames
    "alpha": VariableSpec((FRAME,), DEGREE, "goniometer tilt alpha"),
    "beta": VariableSpec((FRAME,), DEGREE, "goniometer tilt beta"),
    "omega": VariableSpec((FRAME,), DEGREE, "in-plane rotation omega"),
    "zone_axis": VariableSpec((FRAME, UVW), DIMENSIONLESS, "zone axis [uvw]"),
    "semiangle": VariableSpec((FRAME,), DEGREE, "precession semi-angle"),
    "pets_scale": VariableSpec((FRAME,), DIMENSIONLESS, "PETS frame scale"),
    # experiment and crystal
    "wavelength": VariableSpec((), ANGSTROM, "electron wavelength"),
    "voltage": VariableSpec((), VOLT, "accelerating voltage"),
    "cell_a": VariableSpec((), ANGSTROM, "cell length a"),
    "cell_b": VariableSpec((), ANGSTROM, "cell length b"),
    "cell_c": VariableSpec((), ANGSTROM, "cell length c"),
    "cell_alpha": VariableSpec((), DEGREE, "cell angle alpha"),
    "cell_beta": VariableSpec((), DEGREE, "cell angle beta"),
    "cell_gamma": VariableSpec((), DEGREE, "cell angle gamma"),
    "UB": VariableSpec((UB_ROW, UB_COL), PER_ANGSTROM, "PETS orientation matrix UB"),
    "rotation_axis_position": VariableSpec((), DEGREE, "rotation axis position"),
    "mosaicity": VariableSpec((), DEGREE, "mosaicity"),
    "dstarmax": VariableSpec((), PER_ANGSTROM, "resolution limit d*max"),
    # derived
    "orientation": VariableSpec(
        (FRAME, LAB, CRYSTAL), DIMENSIONLESS, "rotation from crystal Cartesian to lab frame"
    ),
}

#: The six cell parameters, in CIF order (Å, Å, Å, degree, degree, degree).
CELL_VARIABLES: tuple[str, ...] = (
    "cell_a",
    "cell_b",
    "cell_c",
    "cell_alpha",
    "cell_beta",
    "cell_gamma",
)

#: Attributes that describe one read of a file, not the data; round trips may differ in them.
PROVENANCE_ATTRS: tuple[str, ...] = ("source_file", "read_notes")


def variable_attrs(name: str) -> dict[str, str]:
    """The ``units`` (floats only) and ``long_name`` attrs of a known variable.

    Raises:
      KeyError: ``name`` is not in :data:`VARIABLES`.
    """
    spec = VARIABLES[name]
    attrs = {"long_name": spec.long_name}
    if spec.units is not None:
        attrs["units"] = spec.units
    return attrs


def apply_attrs(dataset: xr.Dataset) -> xr.Dataset:
    """Set ``units`` and ``long_name`` on every known variable and coordinate, in place.

    Variables not in :data:`VARIABLES` are left as they are. Returns ``dataset`` for chaining.
    """
    for name in list(dataset.variables):
        if name in VARIABLES:
            dataset[name].attrs.update(variable_attrs(str(name)))
    return dataset


def apply_dataarray_attrs(array: xr.DataArray, name: str) -> xr.DataArray:
    """Name a DataArray and set its and its known coordinates' attrs, in place; returns it."""
    array.name = name
    array.attrs.update(variable_attrs(name))
    for coord in array.coords:
        if coord in VARIABLES:
            array.coords[coord].attrs.update(variable_attrs(str(coord)))
    return array


def cell_parameters(dataset: xr.Dataset) -> np.ndarray:
    """(a, b, c, α, β, γ) of a PETS dataset, Å and degrees, float64, shape (6,)."""
    return np.array([float(dataset[name]) for name in CELL_VARIABLES], dtype=np.float64)
