"""Geometric and ADP restraints with SHELX semantics, as weighted residuals.

Each restraint is one or more residuals r = (value − target)/σ. Their squares are added to
the refinement's weighted sum of squares, in the Adam loss (Jana's wR numerator, so
wR = sqrt((Σ w ΔF² + Σ r²)/Σ w F_o²)) and in the normal equations of the least squares, and
each residual counts as one observation in the GoF (SHELX's and Jana's convention).

Instructions, one per string (SHELX syntax; atoms by label; numbers in Å and Å²):

* ``DFIX d [σ=0.02] A1 A2 [A3 A4 …]``: the distances A1–A2 (A3–A4, …) equal d.
* ``DANG d [σ=0.04] A1 A3 …``: 1,3-distances (which fix the angle at the atom between) equal d.
* ``SIMU [σ=0.04 [σ_terminal=2σ [d_max=2.0]]] [atoms]``: bonded atoms (distance < d_max and
  within the sum of covalent radii + 0.5 Å) have similar Cartesian Uij, 6 residuals per pair;
  σ_terminal where an atom has a single bonded neighbour. Default atoms: every non-H atom.
* ``RIGU [σ=0.004] [atoms]``: rigid bond (Hirshfeld): bonded atoms have equal mean-square
  displacement along the bond (SHELX's RIGU also restrains the 1,3 pairs and two more
  components; edkit restrains this one). Default atoms: every non-H atom.

The partner of a pair is the image of the second atom (any symmetry operator, any lattice
shift) nearest to the first in the starting structure, as SHELX does without ``_$n`` suffixes.
"""

import math

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from edkit.crystal import Crystal
from edkit.errors import EdkitError

__all__ = ["KINDS", "RestraintTables", "parse_restraints", "restraint_residuals"]

KINDS = ("DFIX", "DANG", "SIMU", "RIGU")
_DEFAULT_SIGMA = {"DFIX": 0.02, "DANG": 0.04, "SIMU": 0.04, "RIGU": 0.004}
_BOND_TOLERANCE = 0.5  # Å beyond the sum of covalent radii (SHELX's CONN default)
_SHIFTS = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)


@struct.dataclass
class RestraintTables:
    """Fixed data of the restraints (a pytree). Pairs (m per kind): atom ``i``, atom ``j`` and
    the operator (R (m, 3, 3), t (m, 3), lattice shift included) that makes j's partner image
    x' = R x_j + t; ``target`` (Å) and ``sigma`` per pair. ``descriptions``: one text per
    pair (static), e.g. "DFIX C2–H1 1.090(20)"."""

    distance_i: jax.Array
    distance_j: jax.Array
    distance_rotation: jax.Array
    distance_translation: jax.Array
    distance_target: jax.Array
    distance_sigma: jax.Array
    simu_i: jax.Array
    simu_j: jax.Array
    simu_rotation: jax.Array
    simu_sigma: jax.Array
    rigu_i: jax.Array
    rigu_j: jax.Array
    rigu_rotation: jax.Array
    rigu_translation: jax.Array
    rigu_sigma: jax.Array
    descriptions: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @property
    def n_residuals(self) -> int:
        """Residuals (observations) the restraints add: 1 per DFIX/DANG/RIGU pair, 6 per SIMU."""
        return int(self.distance_i.shape[0] + 6 * self.simu_i.shape[0] + self.rigu_i.shape[0])


def _nearest_image(crystal: Crystal, i: int, j: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(R, t, distance): the image R x_j + t of atom j nearest to atom i, not i itself."""
    images = np.einsum("kab,b->ka", crystal.rotations, crystal.fract[j]) + crystal.translations
    d = images - crystal.fract[i]
    base = -np.round(d)
    candidates = d[:, None, :] + base[:, None, :] + _SHIFTS  # (ops, 27, 3)
    length = np.linalg.norm(candidates @ crystal.real_basis, axis=-1)
    # An image within 0.1 Å is the atom itself (a special position given to a few decimals).
    length = np.where(length < 0.1, np.inf, length)
    k, s = np.unravel_index(np.argmin(length), length.shape)
    translation = crystal.translations[k] + base[k] + _SHIFTS[s]
    return crystal.rotations[k], translation, float(length[k, s])


def _bonds(
    crystal: Crystal, atoms: list[int], d_max: float
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Every bond (i, j, R, t) among ``atoms`` (i ≤ j, each image R x_j + t of j bonded to i):
    distance under d_max and under the sum of covalent radii + 0.5 Å, over 0.1 Å."""
    radius = [gemmi.Element(e).covalent_r for e in crystal.elements]
    bonds = []
    for a, i in enumerate(atoms):
        for j in atoms[a:]:
            cutoff = min(d_max, radius[i] + radius[j] + _BOND_TOLERANCE)
            images = np.einsum("kab,b->ka", crystal.rotations, crystal.fract[j])
            images = images + crystal.translations
            d = images - crystal.fract[i]
            base = -np.round(d)
            candidates = d[:, None, :] + base[:, None, :] + _SHIFTS  # (ops, 27, 3)
            length = np.linalg.norm(candidates @ crystal.real_basis, axis=-1)
            seen: list[np.ndarray] = []
            for k, s in zip(*np.nonzero((length > 0.1) & (length < cutoff)), strict=True):
                position = candidates[k, s]
                if any(np.allclose(position, p, atol=1e-6) for p in seen):
                    continue  # the same image reached by two operators (a special position)
                seen.append(position)
                translation = crystal.translations[k] + base[k] + _SHIFTS[s]
                bonds.append((int(i), int(j), crystal.rotations[k], translation))
    return bonds


def _split(instruction: str) -> tuple[str, list[float], list[str]]:
    words = instruction.replace(",", " ").split()
    if not words or words[0].upper() not in KINDS:
        raise EdkitError(
            f"restraint {instruction!r}: expected an instruction among {', '.join(KINDS)}"
        )
    numbers: list[float] = []
    rest = words[1:]
    while rest:
        try:
            numbers.append(float(rest[0]))
        except ValueError:
            break
        rest = rest[1:]
    return words[0].upper(), numbers, rest


def parse_restraints(
    instructions: tuple[str, ...] | list[str], crystal: Crystal
) -> RestraintTables:
    """The restraints of ``instructions`` (module docstring) on ``crystal``'s atoms.

    Raises:
      EdkitError: an unknown instruction or atom label, an odd atom count for DFIX/DANG, a
        target or σ that is not positive, or no pair at all for SIMU/RIGU.
    """
    index = {label.upper(): n for n, label in enumerate(crystal.labels)}
    distance: list[tuple] = []
    simu: list[tuple] = []
    rigu: list[tuple] = []
    texts: dict[str, list[str]] = {"distance": [], "simu": [], "rigu": []}

    def atom(label: str, instruction: str) -> int:
        if label.upper() not in index:
            raise EdkitError(
                f"restraint {instruction!r}: no atom {label!r}; the atoms are {crystal.labels}"
            )
        return index[label.upper()]

    for instruction in instructions:
        kind, numbers, labels = _split(instruction)
        if any(not (math.isfinite(v) and v > 0) for v in numbers):
            raise EdkitError(f"restraint {instruction!r}: every number must be > 0")
        if kind in ("DFIX", "DANG"):
            if not numbers or len(numbers) > 2 or not labels or len(labels) % 2:
                raise EdkitError(
                    f"restraint {instruction!r}: expected {kind} d [σ] and pairs of atoms"
                )
            target, sigma = numbers[0], numbers[1] if len(numbers) > 1 else _DEFAULT_SIGMA[kind]
            for a, b in zip(labels[::2], labels[1::2], strict=True):
                i, j = atom(a, instruction), atom(b, instruction)
                rotation, translation, _ = _nearest_image(crystal, i, j)
                distance.append((i, j, rotation, translation, target, sigma))
                texts["distance"].append(f"{kind} {a}–{b} {target:g}({sigma:g})")
            continue
        chosen = [atom(a, instruction) for a in labels] or [
            n for n, e in enumerate(crystal.elements) if e != "H"
        ]
        sigma = numbers[0] if numbers else _DEFAULT_SIGMA[kind]
        terminal_sigma = numbers[1] if len(numbers) > 1 else 2.0 * sigma
        d_max = numbers[2] if len(numbers) > 2 else 2.0
        pairs = _bonds(crystal, chosen, d_max)
        if not pairs:
            raise EdkitError(f"restraint {instruction!r}: no bonded pair among its atoms")
        # Bonded neighbours of each atom (every image; i–i' counts once for i).
        neighbours = np.bincount(
            [i for i, j, _, _ in pairs] + [j for i, j, _, _ in pairs if j != i],
            minlength=crystal.n_asu,
        )
        for i, j, rotation, translation in pairs:
            pair = f"{crystal.labels[i]}–{crystal.labels[j]}"
            if kind == "SIMU":
                s = terminal_sigma if min(neighbours[i], neighbours[j]) <= 1 else sigma
                simu.append((i, j, rotation, s))
                texts["simu"].append(f"SIMU {pair} ({s:g} Å²)")
            else:
                rigu.append((i, j, rotation, translation, sigma))
                texts["rigu"].append(f"RIGU {pair} ({sigma:g} Å²)")

    def column(rows: list[tuple], k: int, shape: tuple[int, ...], dtype: type = float) -> jax.Array:
        if not rows:
            return jnp.zeros((0, *shape), dtype=dtype)
        return jnp.asarray(np.array([r[k] for r in rows], dtype=dtype))

    return RestraintTables(
        distance_i=column(distance, 0, (), int),
        distance_j=column(distance, 1, (), int),
        distance_rotation=column(distance, 2, (3, 3)),
        distance_translation=column(distance, 3, (3,)),
        distance_target=column(distance, 4, ()),
        distance_sigma=column(distance, 5, ()),
        simu_i=column(simu, 0, (), int),
        simu_j=column(simu, 1, (), int),
        simu_rotation=column(simu, 2, (3, 3)),
        simu_sigma=column(simu, 3, ()),
        rigu_i=column(rigu, 0, (), int),
        rigu_j=column(rigu, 1, (), int),
        rigu_rotation=column(rigu, 2, (3, 3)),
        rigu_translation=column(rigu, 3, (3,)),
        rigu_sigma=column(rigu, 4, ()),
        descriptions=(*texts["distance"], *texts["simu"], *texts["rigu"]),
    )


def restraint_residuals(
    tables: RestraintTables,
    fract: jax.Array | np.ndarray,
    u_star: jax.Array | np.ndarray,
    real_basis: jax.Array | np.ndarray,
) -> jax.Array:
    """Every restraint residual (value − target)/σ, (tables.n_residuals,).

    Args:
      tables: from :func:`parse_restraints`.
      fract: fractional coordinates of the asymmetric unit, (n, 3).
      u_star: U* tensors (exp(−2π² hᵀU*h)), (n, 3, 3).
      real_basis: rows a, b, c in Å, (3, 3); Cartesian x = fract @ real_basis, and the
        Cartesian displacement tensor is U_cart = Bᵀ U* B.
    """
    basis = jnp.asarray(real_basis)
    fract, u_star = jnp.asarray(fract), jnp.asarray(u_star)

    def partner(j, rotation, translation):
        return jnp.einsum("mab,mb->ma", rotation, fract[j]) + translation

    def cartesian(u, rotation=None):
        if rotation is not None:
            u = jnp.einsum("mab,mbc,mdc->mad", rotation, u, rotation)
        return jnp.einsum("ba,mbc,cd->mad", basis, u, basis)

    parts = []
    t = tables
    if t.distance_i.shape[0]:
        vector = (partner(t.distance_j, t.distance_rotation, t.distance_translation)
                  - fract[t.distance_i]) @ basis  # fmt: skip
        length = jnp.sqrt(jnp.sum(vector**2, axis=-1))
        parts.append((length - t.distance_target) / t.distance_sigma)
    if t.simu_i.shape[0]:
        difference = cartesian(u_star[t.simu_i]) - cartesian(u_star[t.simu_j], t.simu_rotation)
        rows, cols = np.triu_indices(3)
        parts.append((difference[:, rows, cols] / t.simu_sigma[:, None]).ravel())
    if t.rigu_i.shape[0]:
        bond = (partner(t.rigu_j, t.rigu_rotation, t.rigu_translation) - fract[t.rigu_i]) @ basis
        unit = bond / jnp.sqrt(jnp.sum(bond**2, axis=-1, keepdims=True))
        difference = cartesian(u_star[t.rigu_i]) - cartesian(u_star[t.rigu_j], t.rigu_rotation)
        parts.append(jnp.einsum("ma,mab,mb->m", unit, difference, unit) / t.rigu_sigma)
    if not parts:
        return jnp.zeros((0,), dtype=fract.dtype)
    return jnp.concatenate(parts)
