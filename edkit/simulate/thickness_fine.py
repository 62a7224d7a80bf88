"""The thickness search's fine part (numpy): a chunk's scored reflections as rows, the lowest
local minima of a coarse R curve, and the zooms around them (nine points per level, from the
same eigensystems through ``evaluate``). Used by :mod:`edkit.simulate.thickness_search`."""

from typing import Any

import numpy as np

from edkit import metrics
from edkit.simulate.setup import FrameSetup

#: Points per zoom level (the level spans the neighbouring points of the previous one).
ZOOM_POINTS = 9


def local_minima(curve: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` lowest local minima of a curve (ends included), lowest first;
    padded with the lowest one. A curve without finite values gives zeros."""
    finite = np.where(np.isfinite(curve), curve, np.inf)
    if not np.isfinite(finite).any():
        return np.zeros(count, dtype=np.int64)
    left = np.concatenate([[np.inf], finite[:-1]])
    right = np.concatenate([finite[1:], [np.inf]])
    index = np.flatnonzero((finite <= left) & (finite <= right) & np.isfinite(finite))
    index = index[np.argsort(finite[index], kind="stable")][:count]
    return np.concatenate([index, np.full(count - index.size, index[0])]).astype(np.int64)


class ScoredRows:
    """A chunk's scored reflections laid out as rows (c, r) of beam positions."""

    def __init__(self, setup: FrameSetup, refl: list[np.ndarray], n_rows: int):
        self.refl = refl  # each frame's scored reflections (indices into the dataset)
        self.rows = np.zeros((len(refl), n_rows), dtype=np.int32)
        for i, frame_refl in enumerate(refl):
            self.rows[i, : frame_refl.size] = setup.refl_beam[frame_refl]
        self.local = np.concatenate([np.full(r.size, i) for i, r in enumerate(self.refl)])
        self.position = np.concatenate([np.arange(r.size) for r in self.refl])
        self.index = np.concatenate(self.refl)

    def r_obs(self, i_obs: np.ndarray, sigma: np.ndarray, intensities: np.ndarray) -> np.ndarray:
        """Per-frame R_obs (c, n_t) from row intensities (c, n_t, r): every (frame, column) pair
        is one 'frame' of :func:`edkit.metrics.frame_r_obs`, its one definition."""
        c, n_t = intensities.shape[:2]
        per_refl = intensities[self.local, :, self.position]  # (n_refl, n_t)
        groups = (self.local[:, None] * n_t + np.arange(n_t)[None, :]).ravel()
        r = metrics.frame_r_obs(
            np.repeat(i_obs[self.index], n_t), np.repeat(sigma[self.index], n_t),
            per_refl.ravel(), groups, c * n_t,
        )  # fmt: skip
        return r.reshape(c, n_t)


def zoom(
    chunk: ScoredRows,
    evaluate: Any,
    grid: np.ndarray,
    start: np.ndarray,
    levels: int,
    observed: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Refine candidates (c, k) (grid indices) by ``levels`` zooms of nine points; returns the
    best thickness (c, k), Å, and its R (c, k). Level 1 spans the neighbouring grid points."""
    c, k = start.shape
    lo = grid[np.maximum(start - 1, 0)]
    hi = grid[np.minimum(start + 1, grid.size - 1)]
    best_t, best_r = grid[start], np.full((c, k), np.inf)
    for _ in range(levels):
        points = lo[..., None] + (hi - lo)[..., None] * np.linspace(0.0, 1.0, ZOOM_POINTS)
        r = chunk.r_obs(*observed, evaluate(points.reshape(c, k * ZOOM_POINTS)))
        r = np.where(np.isfinite(r), r, np.inf).reshape(c, k, ZOOM_POINTS)
        pick = np.argmin(r, axis=2)
        t_pick = np.take_along_axis(points, pick[..., None], 2)[..., 0]
        r_pick = np.take_along_axis(r, pick[..., None], 2)[..., 0]
        better = r_pick < best_r
        best_t, best_r = np.where(better, t_pick, best_t), np.where(better, r_pick, best_r)
        step = (hi - lo) / (ZOOM_POINTS - 1)
        lo, hi = np.maximum(best_t - step, lo), np.minimum(best_t + step, hi)
    return best_t, best_r
