"""The PETS2 ``.cif_pets`` vocabulary shared by the reader and the writer: tags, loop columns,
measurement-details keys, and the uninterpreted CIF items both carry through verbatim."""

import re
from typing import cast

from gemmi import cif

GEOMETRIES = ("continuous rotation", "precession")

CELL_TAGS = {
    "cell_a": "_cell_length_a",
    "cell_b": "_cell_length_b",
    "cell_c": "_cell_length_c",
    "cell_alpha": "_cell_angle_alpha",
    "cell_beta": "_cell_angle_beta",
    "cell_gamma": "_cell_angle_gamma",
}
WAVELENGTH_TAG = "_diffrn_radiation_wavelength"
DETAILS_TAG = "_diffrn_measurement_details"
VOLUME_TAG = "_cell_volume"
UB_TAGS = [[f"_diffrn_orient_matrix_UB_{i}{j}" for j in (1, 2, 3)] for i in (1, 2, 3)]
KNOWN_PAIRS = {
    *CELL_TAGS.values(),
    WAVELENGTH_TAG,
    DETAILS_TAG,
    VOLUME_TAG,
    *(t for row in UB_TAGS for t in row),
}

# (file tag, dataset variable, kind) in file order; kind "int" or "float".
ZONE_COLUMNS = [
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
REFL_COLUMNS = [
    ("_refln_index_h", "h", "int"),
    ("_refln_index_k", "k", "int"),
    ("_refln_index_l", "l", "int"),
    ("_refln_intensity_meas", "I_obs", "float"),
    ("_refln_intensity_sigma", "sigma", "float"),
    ("_refln_zone_axis_id", "frame_id", "int"),
]

# Measurement-details keys with a variable of their own (lower case, single spaces).
DETAIL_GEOMETRY = "data collection geometry"
DETAIL_VARIABLES = {
    "dstarmax": "dstarmax",
    "mosaicity": "mosaicity",
    "rotation axis position": "rotation_axis_position",
}
DETAIL_LINE = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")
SU = re.compile(r"^([^()]*)\(\d+\)$")


def extra_items(block: cif.Block) -> tuple[list[str], list[str]]:
    """CIF text of the pairs and of the loops edkit does not interpret (deterministic format)."""
    known = {t.lower() for t in KNOWN_PAIRS}
    pairs: list[str] = []
    loops: list[str] = []
    for item in block:
        if item.pair is not None:
            # gemmi's stub types Item.pair as object; it is a (tag, value) pair of str.
            tag, value = cast(tuple[str, str], item.pair)
            if tag.lower() not in known:
                pairs.append(f"{tag}\n{value}" if value.startswith(";") else f"{tag} {value}")
        elif item.loop is not None:
            loop = item.loop
            tags = [t.lower() for t in loop.tags]
            if ZONE_COLUMNS[0][0] in tags or REFL_COLUMNS[0][0] in tags:
                continue
            width, values = loop.width(), list(loop.values)
            rows = [" ".join(values[r * width : (r + 1) * width]) for r in range(loop.length())]
            loops.append("\n".join(["loop_", *loop.tags, *rows]))
    return pairs, loops
