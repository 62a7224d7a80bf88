"""PETS2 ``.cif_pets`` files as xarray Datasets: reader, writer, frame selection.

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

The reader lives in :mod:`edkit.io._pets_read` (raw text handling in ``_pets_text``), the writer
in ``_pets_write``, the shared tag tables in ``_pets_format``. The frames' crystal → lab
rotations are physics: :func:`edkit.physics.geometry.frame_orientations`.
"""

from typing import Any

import numpy as np
import xarray as xr

from edkit.errors import EdkitError
from edkit.io._pets_format import GEOMETRIES
from edkit.io._pets_read import read_pets
from edkit.io._pets_write import write_pets
from edkit.schema import cell_parameters


def select_frames(dataset: xr.Dataset, index: Any) -> xr.Dataset:
    """The frames ``dataset.isel(frame=index)`` together with exactly their reflections.

    Args:
      dataset: from :func:`read_pets`.
      index: positional frame selection (an int array, a boolean mask or a slice); positions
        0 … n_frames − 1, not PETS frame ids (``dataset.sel(frame=ids)`` selects by id).

    Raises:
      EdkitError: a position outside the dataset's frames, or a mask of the wrong length.
    """
    try:
        frames = dataset.isel(frame=index)
    except IndexError as error:
        source = dataset.attrs.get("source_file", "the dataset")
        raise EdkitError(
            f"select_frames: {source} has {dataset.sizes['frame']} frames (positions 0–"
            f"{dataset.sizes['frame'] - 1}); the selection does not fit: {error}"
        ) from None
    keep = np.isin(dataset["frame_id"].values, frames["frame"].values)
    return frames.isel(refl=np.flatnonzero(keep))


__all__ = [
    "GEOMETRIES",
    "cell_parameters",
    "read_pets",
    "select_frames",
    "write_pets",
]
