"""A crystal structure: cell, asymmetric unit, space-group expansion, site-symmetry projectors.

Conventions (science.md §3):

- Fractional coordinates x; a space-group operator acts as x' = R x + t (R, t in fractional
  coordinates, as the CIF symop triplets write them).
- Crystal-Cartesian axes: a along x, b in the xy plane, right-handed; lengths in Å.
- Reciprocal vectors in Å⁻¹ WITHOUT 2π: a*·a = 1.
- ADPs are stored as U^cif (Å², the Uij of a CIF), U* = N U^cif N with N = diag(|a*|, |b*|, |c*|)
  is the covariance of the fractional displacement, so the Debye–Waller factor is
  exp(−2π² hᵀU*h) and a symmetry copy carries U*' = R U* Rᵀ. An isotropic atom has U* = Uiso G*.

numpy only: this package is the fixed, validated description a refinement starts from; the JAX
kernels take its arrays (see :mod:`edkit.physics.structure`).

The package's modules: ``_elements`` (symbols, atomic numbers), ``_cell`` (the real basis,
ADP 6-vectors ↔ tensors, Ueq), ``_sites`` (space-group expansion, stabilisers) and ``_model``
(:class:`Crystal`); everything is imported from ``edkit.crystal``.
"""

from edkit.crystal._cell import (
    ADP_INDICES,
    adp_matrix,
    adp_vector,
    cartesian_adp_map,
    cell_basis_rows,
    real_basis_of,
    ueq,
)
from edkit.crystal._elements import ELEMENTS, atomic_number
from edkit.crystal._model import RIDING_DISTANCE, Crystal
from edkit.crystal._sites import SITE_TOLERANCE, expand_sites, site_stabilisers

__all__ = [
    "ADP_INDICES",
    "ELEMENTS",
    "RIDING_DISTANCE",
    "SITE_TOLERANCE",
    "Crystal",
    "adp_matrix",
    "adp_vector",
    "atomic_number",
    "cartesian_adp_map",
    "cell_basis_rows",
    "expand_sites",
    "real_basis_of",
    "site_stabilisers",
    "ueq",
]
