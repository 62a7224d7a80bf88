"""CIF structures in and out: :func:`read_cif` → :class:`~edkit.crystal.Crystal`, :func:`write_cif`.

Reading uses gemmi's CIF parser for the syntax and space-group tables, and reads the items and
loops itself so that every value is parsed in float64 and every error names the file, the field
and (where the value can be located) the line. Conventions are those of :mod:`edkit.crystal`.

The reader is :mod:`edkit.io._cif_read` over the block model of ``_cif_source``; the writer is
``_cif_write``. Import everything from here.
"""

from edkit.io._cif_read import read_cif
from edkit.io._cif_write import format_with_su, write_cif

__all__ = ["format_with_su", "read_cif", "write_cif"]
