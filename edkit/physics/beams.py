"""Beam selection and the index bookkeeping of the structure matrix (numpy, static shapes).

The beam set of an orientation is fixed data (not differentiated), so it is chosen here in numpy
before any tracing; the differentiable quantities (S_g, F) are then evaluated on it in JAX.
"""

import numpy as np

from edkit.physics.bloch import excitation_errors

#: Default resolution limit of the beam sets, Å⁻¹, for single patterns and frames alike. It lives
#: here, below both: the frame modules import edkit.simulate.pattern, so it cannot import them.
DEFAULT_G_MAX = 1.6  # Å⁻¹


def reflections_within(reciprocal_basis: np.ndarray, g_max: float) -> np.ndarray:
    """All Miller indices with |g| ≤ g_max, 000 first, then by increasing |g|.

    Args:
      reciprocal_basis: rows a*, b*, c* (Cartesian, Å⁻¹ without 2π), shape (3, 3).
      g_max: Å⁻¹.

    Returns:
      int array, shape (n, 3).
    """
    real_lengths = np.linalg.norm(np.linalg.inv(reciprocal_basis).T, axis=1)
    # |h| = |g·a| ≤ g_max |a| bounds each index.
    limits = np.ceil(g_max * real_lengths).astype(int)
    axes = [np.arange(-n, n + 1) for n in limits]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    g = np.linalg.norm(hkl @ reciprocal_basis, axis=1)
    keep = g <= g_max + 1e-12
    hkl, g = hkl[keep], g[keep]
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], np.round(g, 12)))
    return hkl[order]


#: Excitation errors S_g in Å⁻¹, numpy in and out: :func:`edkit.physics.bloch.excitation_errors`
#: itself (one definition), under the name the frame set-up imports.
excitation_errors_np = excitation_errors


def select_beams(
    reciprocal_basis: np.ndarray,
    k_hat: np.ndarray,
    k_mag: float,
    g_max: float,
    sg_max: float,
) -> np.ndarray:
    """Beams for one orientation: |g| ≤ g_max and |S_g| ≤ sg_max, with 000 always first.

    Args:
      reciprocal_basis: rows a*, b*, c* in the same Cartesian frame as ``k_hat``, Å⁻¹.
      k_hat: unit vector along the electrons' direction of travel, shape (3,).
      k_mag: |K| in Å⁻¹.
      g_max, sg_max: Å⁻¹.

    Returns:
      Miller indices, int, shape (n, 3), 000 first, then by increasing |g|.
    """
    hkl = reflections_within(reciprocal_basis, g_max)
    s = excitation_errors_np(hkl @ reciprocal_basis, np.asarray(k_hat, float), k_mag)
    keep = np.abs(s) <= sg_max
    keep[0] = True  # 000
    return hkl[keep]


def coupling_indices(hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct differences h_j − h_i of a beam set and where each matrix element finds its own.

    Args:
      hkl: beams' Miller indices, int, shape (n, 3).

    Returns:
      (differences, index): differences int (m, 3) with every distinct h_j − h_i, and index int
      (n, n) with ``differences[index[i, j]] == hkl[j] - hkl[i]``.
    """
    hkl = np.asarray(hkl, dtype=np.int64)
    diff = hkl[None, :, :] - hkl[:, None, :]
    differences, inverse = np.unique(diff.reshape(-1, 3), axis=0, return_inverse=True)
    return differences, inverse.reshape(hkl.shape[0], hkl.shape[0])
