"""The :class:`Crystal` data model: cell, asymmetric unit, expansion, site-symmetry projectors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edkit.crystal._cell import adp_matrix, adp_vector, real_basis_of, ueq
from edkit.crystal._elements import atomic_number
from edkit.crystal._sites import SITE_TOLERANCE, expand_sites, site_stabilisers, wrap_fractional
from edkit.errors import EdkitError

RIDING_DISTANCE = 1.3
"""Å: the longest X–H bond :meth:`Crystal.riding_links` accepts by default.

Terminal X–H bonds are 0.8–1.25 Å (X-ray lengths); bridging B–H–B hydrogens (1.3–1.4 Å in
borane.cif) fall outside on purpose: they have no single parent to ride on."""


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _formula(elements: Sequence[str], counts: Sequence[float] | np.ndarray) -> str:
    """Hill-order formula (C, H first when C is present, then alphabetical), e.g. "SiO2"."""
    totals: dict[str, float] = {}
    for e, c in zip(elements, counts, strict=True):
        e = "H" if e in ("D", "T") else e
        totals[e] = totals.get(e, 0.0) + float(c)
    if all(abs(v - round(v)) < 1e-6 for v in totals.values()) and totals:
        g = 0
        for v in totals.values():
            g = math.gcd(g, round(v))
        if g > 1:
            totals = {e: v / g for e, v in totals.items()}
    order = sorted(totals)
    if "C" in totals:
        order = ["C"] + (["H"] if "H" in totals else []) + [e for e in order if e not in ("C", "H")]
    parts = []
    for e in order:
        v = totals[e]
        n = "" if abs(v - 1) < 1e-6 else (f"{round(v)}" if abs(v - round(v)) < 1e-6 else f"{v:.3g}")
        parts.append(f"{e}{n}")
    return "".join(parts)


@dataclass(frozen=True, eq=False)
class Crystal:
    """A crystal structure: cell, space group and asymmetric unit, with its unit-cell expansion.

    Build one with :func:`edkit.io.cif.read_cif` or :meth:`Crystal.from_asu` (which computes the
    expansion); the constructor checks shapes and stores read-only float64/int64/bool copies.

    Attributes:
      cell: (a, b, c, α, β, γ), Å and degrees.
      space_group: Hermann–Mauguin symbol as gemmi names it (e.g. "P 32 2 1").
      labels: asymmetric-unit atom labels, (n_asu,).
      elements: element symbols, (n_asu,).
      atomic_numbers: int, (n_asu,).
      fract: fractional coordinates, (n_asu, 3).
      u_cif: U^cif (Å²), symmetric, (n_asu, 3, 3); for an isotropic atom Uiso·N⁻¹G*N⁻¹.
      anisotropic: bool, (n_asu,): True where the source gave Uij.
      occupancy: (n_asu,).
      rotations: (n_ops, 3, 3); translations: (n_ops, 3): operators x' = R x + t (fractional).
      site_atom: int (n_cell,): asymmetric-unit index of each unit-cell atom.
      site_op: int (n_cell,): operator index generating it.
      source: the file it came from ("" if none).
    """

    cell: tuple[float, float, float, float, float, float]
    space_group: str
    labels: tuple[str, ...]
    elements: tuple[str, ...]
    atomic_numbers: np.ndarray
    fract: np.ndarray
    u_cif: np.ndarray
    anisotropic: np.ndarray
    occupancy: np.ndarray
    rotations: np.ndarray
    translations: np.ndarray
    site_atom: np.ndarray
    site_op: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        # Validate at the boundary (style.md §7): everything downstream trusts these shapes.
        set_ = object.__setattr__  # frozen dataclass: the one sanctioned way to normalise fields
        cell = tuple(float(v) for v in self.cell)
        real_basis_of(cell)  # raises on a degenerate cell
        set_(self, "cell", cell)
        set_(self, "labels", tuple(str(s) for s in self.labels))
        set_(self, "elements", tuple(str(s) for s in self.elements))
        n = len(self.labels)

        def arr(name: str, dtype: type, shape: tuple[int | None, ...]) -> None:
            a: np.ndarray = np.array(
                getattr(self, name), dtype=dtype
            )  # a copy: callers keep their arrays
            ok = a.ndim == len(shape) and all(
                s is None or s == d for s, d in zip(shape, a.shape, strict=False)
            )
            if not ok:
                want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
                raise EdkitError(
                    f"Crystal.{name} has shape {a.shape}; expected {want} (n_asu = {n} labels)"
                )
            set_(self, name, _readonly(a))

        if len(self.elements) != n:
            raise EdkitError(f"Crystal.elements has {len(self.elements)} entries; expected {n}")
        arr("atomic_numbers", np.int64, (n,))
        arr("fract", np.float64, (n, 3))
        arr("u_cif", np.float64, (n, 3, 3))
        arr("anisotropic", np.bool_, (n,))
        arr("occupancy", np.float64, (n,))
        arr("rotations", np.float64, (None, 3, 3))
        n_ops = self.rotations.shape[0]
        arr("translations", np.float64, (n_ops, 3))
        arr("site_atom", np.int64, (None,))
        arr("site_op", np.int64, (self.site_atom.shape[0],))
        if n_ops == 0:
            raise EdkitError("Crystal.rotations is empty; expected at least the identity")
        if self.site_atom.size and (self.site_atom.min() < 0 or self.site_atom.max() >= n):
            raise EdkitError(f"Crystal.site_atom has indices outside [0, {n})")
        if self.site_op.size and (self.site_op.min() < 0 or self.site_op.max() >= n_ops):
            raise EdkitError(f"Crystal.site_op has indices outside [0, {n_ops})")
        for name in ("fract", "u_cif", "occupancy"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise EdkitError(f"Crystal.{name} has non-finite values")
        if not np.allclose(self.u_cif, np.swapaxes(self.u_cif, -1, -2), rtol=0, atol=1e-12):
            raise EdkitError("Crystal.u_cif is not symmetric (U_ij must equal U_ji)")

    @classmethod
    def from_asu(
        cls,
        cell: Sequence[float],
        space_group: str,
        labels: Sequence[str],
        elements: Sequence[str],
        fract: np.ndarray,
        u_cif: np.ndarray,
        anisotropic: np.ndarray,
        occupancy: np.ndarray,
        rotations: np.ndarray,
        translations: np.ndarray,
        *,
        source: str = "",
        tolerance: float = SITE_TOLERANCE,
    ) -> Crystal:
        """A Crystal from its asymmetric unit, computing atomic numbers and the expansion.

        Args: as the attributes of :class:`Crystal`; ``tolerance`` (Å) as in :func:`expand_sites`.
        """
        basis = real_basis_of(cell)
        fract = np.asarray(fract, dtype=np.float64)
        rotations = np.asarray(rotations, dtype=np.float64)
        translations = np.asarray(translations, dtype=np.float64)
        if fract.ndim != 2 or fract.shape[1] != 3:
            raise EdkitError(f"fract has shape {fract.shape}; expected (n_asu, 3)")
        if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
            raise EdkitError(f"rotations has shape {rotations.shape}; expected (n_ops, 3, 3)")
        if translations.shape != (rotations.shape[0], 3):
            raise EdkitError(
                f"translations has shape {translations.shape}; expected ({rotations.shape[0]}, 3)"
            )
        site_atom, site_op = expand_sites(fract, rotations, translations, basis, tolerance)
        return cls(
            cell=tuple(float(v) for v in cell),  # type: ignore[arg-type]
            space_group=space_group,
            labels=tuple(labels),
            elements=tuple(elements),
            atomic_numbers=np.array([atomic_number(e) for e in elements], dtype=np.int64),
            fract=fract,
            u_cif=u_cif,
            anisotropic=anisotropic,
            occupancy=occupancy,
            rotations=rotations,
            translations=translations,
            site_atom=site_atom,
            site_op=site_op,
            source=source,
        )

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def n_asu(self) -> int:
        """Number of asymmetric-unit atoms."""
        return len(self.labels)

    @property
    def n_cell(self) -> int:
        """Number of unit-cell atoms (after dropping coincident copies)."""
        return int(self.site_atom.shape[0])

    @property
    def n_ops(self) -> int:
        """Number of space-group operators (including centring translations)."""
        return int(self.rotations.shape[0])

    # ---- metric ------------------------------------------------------------------------------

    @property
    def real_basis(self) -> np.ndarray:
        """Rows a, b, c in crystal-Cartesian axes (a ∥ x, b in xy, right-handed), Å, (3, 3)."""
        return real_basis_of(self.cell)

    @property
    def reciprocal_basis(self) -> np.ndarray:
        """Rows a*, b*, c* in crystal-Cartesian axes, Å⁻¹ without 2π (a*·a = 1), (3, 3)."""
        return np.linalg.inv(self.real_basis).T

    @property
    def volume(self) -> float:
        """Unit-cell volume Ω, Å³."""
        return float(np.linalg.det(self.real_basis))

    @property
    def reciprocal_metric(self) -> np.ndarray:
        """G* = B* B*ᵀ (B* rows a*, b*, c*), Å⁻², (3, 3); |g|² = hᵀG*h."""
        b = self.reciprocal_basis
        return b @ b.T

    @property
    def _n(self) -> np.ndarray:
        """(|a*|, |b*|, |c*|), Å⁻¹, (3,): the diagonal of N in U* = N U^cif N."""
        return np.linalg.norm(self.reciprocal_basis, axis=1)

    # ---- displacement parameters -------------------------------------------------------------

    @property
    def u_star(self) -> np.ndarray:
        """U* = N U^cif N (dimensionless, fractional covariance), (n_asu, 3, 3).

        exp(−2π² hᵀU*h) is the Debye–Waller factor; an isotropic atom has U* = Uiso G*.
        """
        n = self._n
        return self.u_cif * n[:, None] * n[None, :]

    @property
    def u_iso_equivalent(self) -> np.ndarray:
        """Ueq = tr(U_cart)/3, Å², (n_asu,), U_cart = A U* Aᵀ (A columns a, b, c): :func:`ueq`."""
        return ueq(self.u_cif, self.real_basis)

    @staticmethod
    def u_cif_from_iso(cell: Sequence[float], u_iso: np.ndarray) -> np.ndarray:
        """U^cif of isotropic atoms, Uiso·N⁻¹G*N⁻¹, Å², (n, 3, 3) from Uiso (n,) in Å²."""
        b = np.linalg.inv(real_basis_of(cell)).T
        n = np.linalg.norm(b, axis=1)
        shape = (b @ b.T) / (n[:, None] * n[None, :])  # unit diagonal: U^cif_ii = Uiso
        return np.asarray(u_iso, dtype=np.float64)[:, None, None] * shape

    # ---- expansion ---------------------------------------------------------------------------

    @property
    def cell_fract(self) -> np.ndarray:
        """Unit-cell fractional coordinates R x + t wrapped to [0, 1), (n_cell, 3)."""
        rot = self.rotations[self.site_op]
        x = (
            np.einsum("nij,nj->ni", rot, self.fract[self.site_atom])
            + self.translations[self.site_op]
        )
        return wrap_fractional(x)

    @property
    def cell_u_star(self) -> np.ndarray:
        """Unit-cell U*' = R U* Rᵀ, (n_cell, 3, 3)."""
        rot = self.rotations[self.site_op]
        return np.einsum("nij,njk,nlk->nil", rot, self.u_star[self.site_atom], rot)

    # ---- site symmetry -----------------------------------------------------------------------

    def stabilisers(self, tolerance: float = SITE_TOLERANCE) -> list[np.ndarray]:
        """Operator indices of each asymmetric-unit atom's site stabiliser (n_asu int arrays).

        Operators with R x + t ≡ x modulo lattice translations within ``tolerance`` Å.
        """
        return site_stabilisers(
            self.fract, self.rotations, self.translations, self.real_basis, tolerance
        )

    def position_projectors(self, tolerance: float = SITE_TOLERANCE) -> np.ndarray:
        """Projectors of fractional position shifts onto the site-allowed subspace, (n_asu, 3, 3).

        P = mean of the stabiliser's rotations: P² = P and R P = P for every stabiliser R, so
        x + P δ stays on the special position for any shift δ (fractional). P is the orthogonal
        projector in the Cartesian metric (an oblique one in fractional coordinates). Its rank
        is the number of free coordinates (0 at a point site, 3 in a general position).
        """
        return np.stack([self.rotations[s].mean(axis=0) for s in self.stabilisers(tolerance)])

    def _adp_map(self, rot: np.ndarray) -> np.ndarray:
        """6×6 matrix of U^cif ↦ R̃ U^cif R̃ᵀ, R̃ = N⁻¹ R N, on (U11, U22, U33, U12, U13, U23).

        U*' = R U* Rᵀ with U* = N U N gives U' = (N⁻¹RN) U (N⁻¹RN)ᵀ; using R itself on U^cif is
        wrong whenever R mixes axes of different reciprocal lengths.
        """
        n = self._n
        r = rot * n[None, :] / n[:, None]
        basis = adp_matrix(np.eye(6))  # (6, 3, 3): column k of the map is the image of e_k
        return adp_vector(np.einsum("ij,kjl,ml->kim", r, basis, r)).T

    def adp_projectors(self, tolerance: float = SITE_TOLERANCE) -> np.ndarray:
        """Projectors of U^cif 6-vectors (U11, U22, U33, U12, U13, U23) onto the site-allowed Uij.

        The mean over the stabiliser of U^cif ↦ R̃ U^cif R̃ᵀ (R̃ = N⁻¹ R N, the U^cif form of
        U*' = R U* Rᵀ): idempotent, and a projected U satisfies R U* Rᵀ = U* for every
        stabiliser R. Shape (n_asu, 6, 6), acting on column vectors.
        """
        return np.stack(
            [
                np.mean([self._adp_map(self.rotations[k]) for k in s], axis=0)
                for s in self.stabilisers(tolerance)
            ]
        )

    # ---- hydrogen riding ---------------------------------------------------------------------

    def riding_links(
        self, max_distance: float = RIDING_DISTANCE
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each H atom, the nearest non-H atom image within ``max_distance`` Å.

        The parent image is R[op] x[parent] + t[op] + shift, the one closest to the H atom's own
        (asymmetric-unit) position, so a riding model can place H relative to it.

        Returns:
          parent: int (n_asu,), asymmetric-unit index of the parent, −1 for non-H atoms and for
            H atoms with no non-H atom within ``max_distance``.
          op: int (n_asu,), the operator index of the parent image (−1 where parent is −1).
          shift: int (n_asu, 3), lattice translation of the parent image (0 where parent is −1).
        """
        n = self.n_asu
        parent = np.full(n, -1, dtype=np.int64)
        op = np.full(n, -1, dtype=np.int64)
        shift = np.zeros((n, 3), dtype=np.int64)
        heavy = np.flatnonzero(self.atomic_numbers != 1)
        if heavy.size == 0:
            return parent, op, shift
        basis = self.real_basis
        images = np.einsum("kij,nj->nki", self.rotations, self.fract[heavy]) + self.translations
        # Rounding gives the nearest lattice image only in near-orthogonal cells; trying the 27
        # neighbouring translations too makes it exact for any cell with these short distances.
        neighbours = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)
        for i in np.flatnonzero(self.atomic_numbers == 1):
            d = images - self.fract[i]  # (n_heavy, n_ops, 3)
            base = -np.round(d)
            cand = d[..., None, :] + base[..., None, :] + neighbours  # (n_heavy, n_ops, 27, 3)
            dist = np.linalg.norm(cand @ basis, axis=-1)
            j, k, m = np.unravel_index(np.argmin(dist), dist.shape)
            if dist[j, k, m] <= max_distance:
                parent[i] = heavy[j]
                op[i] = k
                shift[i] = (base[j, k] + neighbours[m]).astype(np.int64)
        return parent, op, shift

    def riding_parents(self, max_distance: float = RIDING_DISTANCE) -> np.ndarray:
        """For each H atom, the asymmetric-unit index of the nearest non-H atom, int (n_asu,).

        Symmetry copies and lattice translations count (see :meth:`riding_links`); −1 for non-H
        atoms and for H atoms with no non-H atom within ``max_distance`` Å.
        """
        return self.riding_links(max_distance)[0]

    # ---- misc --------------------------------------------------------------------------------

    @property
    def formula(self) -> str:
        """Hill formula of the unit-cell contents (occupancy-weighted) reduced by Z, e.g. "SiO2"."""
        counts = np.bincount(
            self.site_atom, weights=self.occupancy[self.site_atom], minlength=self.n_asu
        )
        return _formula(self.elements, counts)

    def replace(self, **changes: object) -> Crystal:
        """A new Crystal with some fields changed (``dataclasses.replace``), validated again.

        The expansion (``site_atom``, ``site_op``) is kept unless given: shifts along the
        site-allowed subspace (``position_projectors``) never change it, and keeping it keeps
        array shapes fixed during a refinement. Use :meth:`from_asu` to expand afresh.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise EdkitError(
                f"Crystal.replace: unknown field(s) {sorted(unknown)}; expected among "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def without(self, *labels: str) -> Crystal:
        """The same crystal with the atoms ``labels`` removed (an omit model, e.g. for a
        difference map); the unit cell is expanded afresh.

        Raises:
          EdkitError: a label that is not an atom of this crystal, or removing every atom.
        """
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise EdkitError(f"Crystal.without: no atom {unknown}; the atoms are {self.labels}")
        keep = [i for i, label in enumerate(self.labels) if label not in labels]
        if not keep:
            raise EdkitError("Crystal.without: removing every atom leaves no structure")
        return Crystal.from_asu(
            self.cell, self.space_group, [self.labels[i] for i in keep],
            [self.elements[i] for i in keep], self.fract[keep], self.u_cif[keep],
            self.anisotropic[keep], self.occupancy[keep], self.rotations, self.translations,
            source=self.source,
        )  # fmt: skip

    def __repr__(self) -> str:
        a, b, c, al, be, ga = self.cell
        name = f" from {self.source}" if self.source else ""
        return (
            f"Crystal({self.formula}, {self.space_group}, a={a:g} b={b:g} c={c:g} Å, "
            f"α={al:g} β={be:g} γ={ga:g}°, {self.n_asu} atoms in the asymmetric unit, "
            f"{self.n_cell} in the cell{name})"
        )
