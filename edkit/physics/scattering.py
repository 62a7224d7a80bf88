"""Electron scattering factors of neutral atoms: the Lobato–Van Dyck (2014) parametrisation.

f(g) = Σᵢ₌₁⁵ aᵢ (2 + bᵢ g²) / (1 + bᵢ g²)² (science.md §3; I. Lobato & D. Van Dyck, Acta Cryst.
A70 (2014) 636), with g = |g| in Å⁻¹ without 2π, aᵢ in Å, bᵢ in Å², f in Å; f(0) = 2 Σᵢ aᵢ.
The table for Z = 1..103 is package data (``edkit/data/lobato_2014.csv``; provenance and licence
in ``edkit/data/README.md``).
"""

import csv
import functools
import re
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from edkit.crystal import atomic_number as element_number
from edkit.errors import EdkitError

#: Package-data file holding the table (Z, symbol, a1..a5, b1..b5).
LOBATO_TABLE = "lobato_2014.csv"
#: Atomic numbers the table covers.
LOBATO_Z_MIN, LOBATO_Z_MAX = 1, 103

# An element symbol with an optional charge: "Fe", "SI", "O2-", "Fe3+", "O-2", "Na+".
_TYPE_SYMBOL = re.compile(r"^([A-Za-z]{1,2})(?:\d*[+-]|[+-]\d*)?$")


@functools.cache
def _lobato_table() -> tuple[np.ndarray, np.ndarray]:
    """The whole table, read once: (a, b), float64, shape (103, 5) each, row Z - 1."""
    source = resources.files("edkit") / "data" / LOBATO_TABLE
    text = source.read_text(encoding="utf-8")
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    z = np.array([int(row["Z"]) for row in rows])
    expected = np.arange(LOBATO_Z_MIN, LOBATO_Z_MAX + 1)
    if z.shape != expected.shape or np.any(z != expected):
        raise EdkitError(
            f"{source}: column Z must run {LOBATO_Z_MIN}..{LOBATO_Z_MAX} in order; got {z.tolist()}"
        )
    a = np.array([[float(row[f"a{i}"]) for i in range(1, 6)] for row in rows], dtype=np.float64)
    b = np.array([[float(row[f"b{i}"]) for i in range(1, 6)] for row in rows], dtype=np.float64)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def lobato_parameters(
    atomic_numbers: int | np.ndarray | list[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Lobato–Van Dyck parameters of each atom.

    Args:
      atomic_numbers: atomic numbers Z, integers in 1..103, a scalar or shape (n,).

    Returns:
      (a, b): float64 arrays of shape (n, 5) (n = 1 for a scalar); a in Å, b in Å², for
      ``lobato_form_factor``. Fresh copies: changing them does not change the table.

    Raises:
      EdkitError: a value is not an integer or lies outside 1..103 (the message names it).
    """
    z = np.atleast_1d(np.asarray(atomic_numbers))
    if z.ndim != 1:
        raise EdkitError(f"atomic_numbers: expected a scalar or shape (n,); got shape {z.shape}")
    if z.dtype == np.bool_ or not (
        np.issubdtype(z.dtype, np.integer)
        or (
            np.issubdtype(z.dtype, np.floating)
            and np.all(np.isfinite(z))
            and np.all(z == z.round())
        )
    ):
        raise EdkitError(f"atomic_numbers: expected integers 1..103; got {z.tolist()!r}")
    z = z.astype(np.int64)
    bad = np.nonzero((z < LOBATO_Z_MIN) | (z > LOBATO_Z_MAX))[0]
    if bad.size:
        i = int(bad[0])
        raise EdkitError(
            f"atomic_numbers[{i}]: Z = {int(z[i])} has no Lobato–Van Dyck parameters; "
            f"expected {LOBATO_Z_MIN}..{LOBATO_Z_MAX}"
        )
    a, b = _lobato_table()
    return a[z - 1], b[z - 1]


def lobato_form_factor(
    a: jax.Array | np.ndarray, b: jax.Array | np.ndarray, g: jax.Array | np.ndarray
) -> jax.Array:
    """Electron scattering factor f(g) in Å, Lobato–Van Dyck form (science.md §3).

    f(g) = Σᵢ aᵢ (2 + bᵢ g²) / (1 + bᵢ g²)². Pure ``jax.numpy``, differentiable in a, b and g
    (smooth for all real g, including g = 0); the dtype follows the inputs (float64 with x64 on).

    Args:
      a: amplitudes in Å, shape (..., 5).
      b: widths in Å², shape (..., 5), same rank as a.
      g: scattering-vector lengths |g| in Å⁻¹ without 2π, shape (...) with one axis fewer than a
        and b; the leading axes broadcast, e.g. a, b (n_atoms, 1, 5) with g (1, n_beams) give
        (n_atoms, n_beams).

    Returns:
      f in Å, shape broadcast(a.shape[:-1], b.shape[:-1], g.shape).
    """
    b_g2 = b * jnp.square(g)[..., None]
    return jnp.sum(a * (2.0 + b_g2) / jnp.square(1.0 + b_g2), axis=-1)


def atomic_number(symbol: str) -> int:
    """Atomic number Z of a CIF type symbol: :func:`edkit.crystal.atomic_number` of its element.

    Case is ignored ("Si", "SI", "si") and a trailing charge is stripped, as in CIF
    ``_atom_type_symbol`` values ("O2-", "Fe3+", "O-2", "Na+").

    Args:
      symbol: element symbol, optionally with a charge.

    Returns:
      Z ≥ 1 (deuterium "D" and tritium "T" give 1).

    Raises:
      EdkitError: the symbol is not an element (e.g. "Xx", "X", "", "C1").
    """
    match = _TYPE_SYMBOL.match(symbol.strip()) if isinstance(symbol, str) else None
    element = match.group(1).capitalize() if match else ""  # "SI" → "Si"; "" is no element
    try:
        return element_number(element)
    except EdkitError:
        raise EdkitError(
            f"element symbol {symbol!r} is not a chemical element; "
            "expected e.g. 'Si', 'O2-', 'Fe3+'"
        ) from None
