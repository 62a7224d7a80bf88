"""Beam selection and the index bookkeeping of the structure matrix (numpy, static shapes).

The beam set of an orientation is fixed data (not differentiated), so it is chosen here in numpy
before any tracing; the differentiable quantities (S_g, F) are then evaluated on it in JAX.
"""

from collections.abc import Sequence

import gemmi
import numpy as np

from edkit.errors import EdkitError
from edkit.physics.bloch import excitation_errors

#: Default resolution limit of the beam sets, Å⁻¹, for single patterns and frames alike. It lives
#: here, below both: the frame modules import edkit.simulate.pattern, so it cannot import them.
DEFAULT_G_MAX = 1.6  # Å⁻¹
#: Largest dense table (entries) of hkl differences; beyond it the keys are sorted instead.
DENSE_TABLE_LIMIT = 1 << 26
_CENTRING_TOLERANCE = 1e-6


def centring_translations(rotations: np.ndarray, translations: np.ndarray) -> np.ndarray:
    """The lattice-centring vectors of a space group given by its operators.

    gemmi splits the operators into a coset list and the pure translations (identity rotation),
    so any setting works (A/B/C, I, F, R obverse or reverse, non-standard cells), and a Crystal
    whose operators lack the centring simply has none.

    Args:
      rotations: operators' rotation parts, fractional, (n_ops, 3, 3).
      translations: operators' translations, fractional, (n_ops, 3).

    Returns:
      Centring vectors in [0, 1), fractional, (n_c, 3); the first is 000 (n_c = 1: primitive).
    """
    ops = []
    for rot, tran in zip(np.asarray(rotations), np.asarray(translations), strict=True):
        op = gemmi.Op()
        op.rot = np.rint(rot * gemmi.Op.DEN).astype(int).tolist()
        op.tran = np.rint(tran * gemmi.Op.DEN).astype(int).tolist()
        ops.append(op.wrap())
    vectors = np.array(gemmi.GroupOps(ops).cen_ops, dtype=np.float64) / gemmi.Op.DEN
    return vectors.reshape(-1, 3) if vectors.size else np.zeros((1, 3))


def centring_allowed(hkl: np.ndarray, centring: np.ndarray) -> np.ndarray:
    """Reflections the lattice centring allows: h·t integer for every centring vector t.

    For the others F(h) = 0 in every structure of the group, and so is U(h_j − h_i) between an
    allowed and a forbidden beam: the structure matrix splits into blocks and 000 lies in the
    allowed one, so forbidden beams never get intensity and can be dropped exactly. (Screw-axis
    and glide absences are not lattice absences and are excited by double diffraction.)

    Args:
      hkl: Miller indices, (n, 3).
      centring: centring vectors, fractional, (n_c, 3) (:func:`centring_translations`).

    Returns:
      bool, (n,).
    """
    phase = np.asarray(hkl, dtype=np.float64) @ np.asarray(centring, dtype=np.float64).T
    return np.all(np.abs(phase - np.rint(phase)) < _CENTRING_TOLERANCE, axis=1)


def reflections_within(
    reciprocal_basis: np.ndarray, g_max: float, centring: np.ndarray | None = None
) -> np.ndarray:
    """All Miller indices with |g| ≤ g_max, 000 first, then by increasing |g|.

    Args:
      reciprocal_basis: rows a*, b*, c* (Cartesian, Å⁻¹ without 2π), shape (3, 3).
      g_max: Å⁻¹.
      centring: keep only what this lattice centring allows (:func:`centring_allowed`); None
        keeps everything.

    Returns:
      int array, shape (n, 3).
    """
    hkl, g_squared = _sphere(reciprocal_basis, g_max, centring)
    return _by_length(hkl, g_squared)


def _sphere(
    reciprocal_basis: np.ndarray, g_max: float, centring: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices with |g| ≤ g_max (and allowed by ``centring``), in box order, and |g|², Å⁻²."""
    reciprocal_basis = np.asarray(reciprocal_basis, dtype=np.float64)
    real_lengths = np.linalg.norm(np.linalg.inv(reciprocal_basis).T, axis=1)
    # |h| = |g·a| ≤ g_max |a| bounds each index.
    limits = np.ceil(g_max * real_lengths).astype(int)
    # The box and its |g|² are the costly part (~60k points at CsPbBr₃, g_max 2 Å⁻¹): filled by
    # broadcasting, a matmul and einsum (not meshgrid, .sum(axis=1), norm: 3–5× slower).
    hkl = np.empty((*(2 * limits + 1), 3), dtype=np.int64)
    for axis, n in enumerate(limits):
        shape = [1, 1, 1]
        shape[axis] = 2 * n + 1
        hkl[..., axis] = np.arange(-n, n + 1).reshape(shape)
    hkl = hkl.reshape(-1, 3)
    g_cart = hkl @ reciprocal_basis
    g_squared = np.einsum("ij,ij->i", g_cart, g_cart)
    keep = g_squared <= (g_max + 1e-12) ** 2
    if centring is not None and len(centring) > 1:  # a primitive lattice forbids nothing
        keep[keep] = centring_allowed(hkl[keep], centring)
    index = np.flatnonzero(keep)
    return hkl[index], g_squared[index]


def _by_length(hkl: np.ndarray, g_squared: np.ndarray) -> np.ndarray:
    """``hkl`` sorted by |g| (rounded to 1e-12 Å⁻¹), ties by h, k, l: 000 first."""
    g = np.round(np.sqrt(g_squared), 12)
    return hkl[np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], g))]


#: Excitation errors S_g in Å⁻¹, numpy in and out: :func:`edkit.physics.bloch.excitation_errors`
#: itself (one definition), under the name the frame set-up imports.
excitation_errors_np = excitation_errors


def select_beams(
    reciprocal_basis: np.ndarray,
    k_hat: np.ndarray,
    k_mag: float,
    g_max: float,
    sg_max: float,
    centring: np.ndarray | None = None,
) -> np.ndarray:
    """Beams for one orientation: |g| ≤ g_max and |S_g| ≤ sg_max, with 000 always first.

    Args:
      reciprocal_basis: rows a*, b*, c* in the same Cartesian frame as ``k_hat``, Å⁻¹.
      k_hat: unit vector along the electrons' direction of travel, shape (3,).
      k_mag: |K| in Å⁻¹.
      g_max, sg_max: Å⁻¹.
      centring: drop what this lattice centring forbids (:func:`centring_allowed`); None: none.

    Returns:
      Miller indices, int, shape (n, 3), 000 first, then by increasing |g|.
    """
    reciprocal_basis = np.asarray(reciprocal_basis, dtype=np.float64)
    k_hat = np.asarray(k_hat, dtype=np.float64)
    hkl = _shell_candidates(reciprocal_basis, k_hat, k_mag, g_max, sg_max)
    g_cart = hkl @ reciprocal_basis
    g_squared = np.einsum("ij,ij->i", g_cart, g_cart)
    # The exact test on the candidates: S_g = −g·k̂ − |g|²/2K (excitation_errors_np); 000 stays.
    s = -(g_cart @ k_hat) - g_squared / (2.0 * k_mag)
    keep = ((np.abs(s) <= sg_max) & (g_squared <= (g_max + 1e-12) ** 2)) | (g_squared == 0.0)
    if centring is not None and len(centring) > 1:
        keep[keep] = centring_allowed(hkl[keep], centring)
    index = np.flatnonzero(keep)
    # Sorting only the kept beams gives reflections_within's order, filtered.
    return _by_length(hkl[index], g_squared[index])


def _shell_candidates(
    reciprocal_basis: np.ndarray, k_hat: np.ndarray, k_mag: float, g_max: float, sg_max: float
) -> np.ndarray:
    """A few more than the indices with |g| ≤ g_max and |S_g| ≤ sg_max, (n, 3) int, no repeats.

    Instead of the whole sphere (~60k points at CsPbBr₃, g_max 2 Å⁻¹, for ~600 beams), each
    (h, k) column g = g₀ + l c* is cut analytically: S(l) and |g(l)|² are quadratics in l, so
    S ≥ −sg_max and |g| ≤ g_max hold on an interval and S > sg_max inside another. Each bound
    is widened by one index (rounding), the caller applies the exact test.
    """
    limits = np.ceil(g_max * np.linalg.norm(np.linalg.inv(reciprocal_basis).T, axis=1))
    h, k = np.meshgrid(*[np.arange(-n, n + 1) for n in limits[:2].astype(int)], indexing="ij")
    h, k = h.ravel(), k.ravel()
    g0 = h[:, None] * reciprocal_basis[0] + k[:, None] * reciprocal_basis[1]
    c = reciprocal_basis[2]
    w = float(c @ c)
    r, p0, q0 = g0 @ c, g0 @ k_hat, np.einsum("ij,ij->i", g0, g0)

    def roots(linear: np.ndarray, constant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # l² + linear·l + constant = 0; without real roots the vertex (the closest l).
        half = -0.5 * linear
        spread = np.sqrt(np.maximum(half**2 - constant, 0.0))
        return half - spread, half + spread

    linear = 2.0 * (k_mag * (c @ k_hat) + r) / w
    low, high = roots(linear, (q0 + 2.0 * k_mag * (p0 - sg_max)) / w)  # S ≥ −sg_max
    sphere_low, sphere_high = roots(2.0 * r / w, (q0 - g_max**2) / w)  # |g| ≤ g_max
    start = np.floor(np.maximum(low, sphere_low)).astype(np.int64)
    end = np.ceil(np.minimum(high, sphere_high)).astype(np.int64)
    # S > sg_max strictly between these roots: leave out the integers a whole index inside.
    constant = (q0 + 2.0 * k_mag * (p0 + sg_max)) / w
    has_gap = 0.25 * linear**2 > constant
    gap_low, gap_high = roots(linear, constant)
    first_end = np.minimum(end, np.floor(gap_low).astype(np.int64) + 1)
    second_start = np.maximum(start, np.ceil(gap_high).astype(np.int64) - 1)
    split = has_gap & (second_start > first_end + 1)
    first_end = np.where(split, first_end, end)
    column = np.concatenate([np.arange(len(h)), np.flatnonzero(split)])
    starts = np.concatenate([start, second_start[split]])
    counts = np.maximum(np.concatenate([first_end, end[split]]) - starts + 1, 0)
    rows = np.repeat(np.arange(len(starts)), counts)
    offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    col = column[rows]
    return np.stack([h[col], k[col], starts[rows] + offsets], axis=1)


def index_differences(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    out: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct differences h_to[j] − h_from[i] over several beam-list pairs, and their index.

    Every difference lies in the box [min h_to − max h_from, max h_to − min h_from] per axis, so
    its mixed-radix number (h most significant) is a dense integer key, and the key of a
    difference is the difference of two per-beam keys: an O(n²) subtraction, no sort. The used
    keys are marked in a table over the box, numbered in increasing (= lexicographic) order and
    looked up. A box larger than :data:`DENSE_TABLE_LIMIT` falls back to sorting the keys.

    Args:
      pairs: (h_from (a, 3), h_to (b, 3)) Miller indices, int.
      out: optional int arrays, one (a, b) per pair (e.g. views into larger padded arrays), that
        receive the indices one pair at a time: the peak memory is then one pair's keys, not
        every pair's indices at once.

    Returns:
      (differences, indices): differences int64 (m, 3), every distinct difference, sorted
      lexicographically (as ``np.unique(axis=0)``); indices, one (a, b) per pair (``out`` itself
      where given, else int32), with ``differences[index[i, j]] == h_to[j] - h_from[i]``.
    """
    pairs = [
        (np.asarray(f, np.int64).reshape(-1, 3), np.asarray(t, np.int64).reshape(-1, 3))
        for f, t in pairs
    ]
    if out is not None and [o.shape for o in out] != [(len(f), len(t)) for f, t in pairs]:
        raise EdkitError(
            "index_differences: out must hold one (len(h_from), len(h_to)) array per pair"
        )
    filled = [(f, t) for f, t in pairs if len(f) and len(t)]
    if not filled:
        empty = [np.zeros((len(f), len(t)), np.int32) for f, t in pairs]
        return np.zeros((0, 3), np.int64), empty if out is None else list(out)
    low = np.min([t.min(axis=0) - f.max(axis=0) for f, t in filled], axis=0)
    high = np.max([t.max(axis=0) - f.min(axis=0) for f, t in filled], axis=0)
    extent = high - low + 1
    size = int(np.prod(extent))
    radix = np.array([extent[1] * extent[2], extent[2], 1], dtype=np.int64)
    dense = size <= DENSE_TABLE_LIMIT
    # Dense keys (and every partial key below) stay far inside int32: half the memory traffic.
    key_type = np.dtype(np.int32 if dense else np.int64)

    def keys(h_from: np.ndarray, h_to: np.ndarray) -> np.ndarray:
        # key(h_to − h_from − low) = key(h_to) − (key(h_from) + key(low)), each in [0, size).
        start = (h_from @ radix + int(low @ radix)).astype(key_type)
        return np.subtract((h_to @ radix).astype(key_type)[None, :], start[:, None])

    if dense:
        used = np.zeros(size, dtype=bool)
        for f, t in filled:
            k = keys(f, t).ravel()
            if size <= 2 * k.size:  # a count over the table: ~2.5× faster than a scatter
                used |= np.bincount(k, minlength=size).astype(bool)
            else:
                used[k] = True
        unique = np.flatnonzero(used)
        rank = np.empty(size, dtype=np.int32)  # only the used entries are ever read
        rank[unique] = np.arange(len(unique), dtype=np.int32)
    else:
        unique = np.unique(np.concatenate([np.unique(keys(f, t)) for f, t in filled]))

    def lookup(f: np.ndarray, t: np.ndarray) -> np.ndarray:
        k = keys(f, t)
        return np.take(rank, k) if dense else np.searchsorted(unique, k).astype(np.int32)

    if out is None:
        indices = [lookup(f, t) for f, t in pairs]
    else:
        indices = list(out)
        for target, (f, t) in zip(indices, pairs, strict=True):
            target[...] = lookup(f, t)
    digits = (unique[:, None] // radix[None, :]) % extent[None, :]
    return (digits + low[None, :]).astype(np.int64), indices


def coupling_indices(hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct differences h_j − h_i of a beam set and where each matrix element finds its own.

    Args:
      hkl: beams' Miller indices, int, shape (n, 3).

    Returns:
      (differences, index): differences int (m, 3) with every distinct h_j − h_i, sorted
      lexicographically, and index int32 (n, n) with ``differences[index[i, j]] == hkl[j] -
      hkl[i]``.
    """
    differences, (index,) = index_differences([(hkl, hkl)])
    return differences, index
