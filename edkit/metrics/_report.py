"""Figures of merit for reports (numpy, float64): Jana2020 and diffBloch per-frame figures.

Inputs are numpy or array-like; unusable inputs raise :class:`~edkit.errors.EdkitError`, a ratio
with nothing to sum over is NaN (never a warning). Conventions: :mod:`edkit.metrics`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from edkit.errors import EdkitError

#: Jana2020's instability factor u in w = 1/(σ_F² + (u F_o)²) (science.md §7).
JANA_INSTABILITY = 0.01
#: I_o > OBS_SIGMA_CUT · σ marks an "observed" reflection (science.md §7).
OBS_SIGMA_CUT = 3.0
#: Below I_o < WEAK_SIGMA_CUT · σ, σ_F = 5√σ replaces σ/(2F_o) (science.md §7).
WEAK_SIGMA_CUT = 0.01


# ---------------------------------------------------------------------------------------------
# numpy helpers (reporting)
# ---------------------------------------------------------------------------------------------


def _vector(name: str, x: ArrayLike, n: int | None, where: str) -> np.ndarray:
    """``x`` as a finite float64 vector of length ``n`` (any length when ``n`` is None)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        expected = "a 1-D array" if n is None else f"shape ({n},) like i_obs"
        raise EdkitError(f"{where}: {name} has shape {arr.shape}, expected {expected}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise EdkitError(
            f"{where}: {name}[{bad[0]}] = {float(arr[bad[0]])!r} is not a finite number"
        )
    return arr


def _positive_sigma(sigma: ArrayLike, n: int, where: str) -> np.ndarray:
    """σ(I) as a float64 vector of length ``n``, every entry finite and > 0."""
    s = _vector("sigma", sigma, n, where)
    bad = np.flatnonzero(s <= 0.0)
    if bad.size:
        raise EdkitError(
            f"{where}: sigma[{bad[0]}] = {float(s[bad[0]])!r}; every σ(I) must be > 0 "
            "(the weights divide by it)"
        )
    return s


def _frames(frame_index: ArrayLike, n_frames: int, n: int, where: str) -> np.ndarray:
    """Frame indices as an int64 vector of length ``n`` with values in [0, n_frames)."""
    if isinstance(n_frames, bool) or not isinstance(n_frames, int | np.integer) or n_frames < 0:
        raise EdkitError(f"{where}: n_frames = {n_frames!r}, expected an integer ≥ 0")
    idx = np.asarray(frame_index)
    if idx.ndim != 1 or idx.shape[0] != n:
        raise EdkitError(f"{where}: frame_index has shape {idx.shape}, expected ({n},) like i_obs")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise EdkitError(f"{where}: frame_index has dtype {idx.dtype}, expected integers")
    idx = idx.astype(np.int64)
    bad = np.flatnonzero((idx < 0) | (idx >= n_frames))
    if bad.size:
        raise EdkitError(
            f"{where}: frame_index[{bad[0]}] = {idx[bad[0]]} is outside [0, {n_frames}) "
            f"(n_frames = {n_frames})"
        )
    return idx


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den elementwise, NaN where den == 0, without a RuntimeWarning."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0.0)
    return out


def _amplitudes(i: np.ndarray) -> np.ndarray:
    """|F| = sqrt(max(I, 0)): negative (background-subtracted) intensities give 0."""
    return np.sqrt(np.maximum(i, 0.0))


def _jana_weights_np(i_obs: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Jana2020 weights w = 1/(σ_F² + (0.01 F_o)²) on |F| (science.md §7), float64.

    σ_F = σ/(2F_o), or 5√σ where I_o < 0.01σ. The two branches meet at I_o = 0.01σ, where
    F_o = 0.1√σ and σ/(2F_o) = 5√σ: the floor is the continuous cap on σ_F as F_o → 0.
    """
    f_o = _amplitudes(i_obs)
    weak = i_obs < WEAK_SIGMA_CUT * sigma
    sigma_f = 5.0 * np.sqrt(sigma)
    np.divide(sigma, 2.0 * f_o, out=sigma_f, where=~weak)
    return 1.0 / (sigma_f**2 + (JANA_INSTABILITY * f_o) ** 2)


# ---------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------


def frame_scale(i_obs: ArrayLike, i_calc: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Closed-form least-squares scale of one set of intensities (science.md §7).

    k* = Σ w² I_o I_c / Σ w² I_c², the exact minimiser of Σ w² (I_o − k I_c)². With
    ``weights = 1/σ`` this is the χ² (inverse-variance) scale.

    Args:
      i_obs: observed intensities, arbitrary units, shape (n,); may be negative.
      i_calc: calculated intensities, arbitrary units, shape (n,).
      weights: residual weights w (the objective squares them), shape (n,); None means w = 1.

    Returns:
      k*, dimensionless (units of I_o / I_c). 0.0 when Σ w² I_c² = 0 (no reflections, or every
      weighted I_c zero): the scale is then undefined and 0 keeps k I_c finite.
    """
    where = "frame_scale"
    i_o = _vector("i_obs", i_obs, None, where)
    n = i_o.shape[0]
    i_c = _vector("i_calc", i_calc, n, where)
    w2 = np.ones(n) if weights is None else _vector("weights", weights, n, where) ** 2
    den = float(np.sum(w2 * i_c * i_c))
    return float(np.sum(w2 * i_o * i_c)) / den if den != 0.0 else 0.0


def scale_per_frame(
    i_obs: ArrayLike,
    i_calc: ArrayLike,
    frame_index: ArrayLike,
    n_frames: int,
    weights: ArrayLike | None = None,
) -> np.ndarray:
    """Closed-form least-squares scale of each frame, :func:`frame_scale` frame by frame.

    k_f = Σ_{r∈f} w² I_o I_c / Σ_{r∈f} w² I_c², each frame independently.

    Args:
      i_obs: observed intensities, arbitrary units, shape (n_refl,).
      i_calc: calculated intensities, arbitrary units, shape (n_refl,).
      frame_index: frame of each reflection, integers in [0, n_frames), shape (n_refl,).
      n_frames: number of frames.
      weights: residual weights w, shape (n_refl,); None means w = 1.

    Returns:
      Scales k_f, float64, shape (n_frames,). A frame whose scale is undefined (no reflections,
      or Σ w² I_c² = 0 because every calculated intensity is zero) gets 0.0, so scaled
      intensities stay finite; the per-frame figures then report such a frame as NaN when it has
      nothing to score and as an honest misfit (R = 1) when it has.
    """
    where = "scale_per_frame"
    i_o = _vector("i_obs", i_obs, None, where)
    n = i_o.shape[0]
    i_c = _vector("i_calc", i_calc, n, where)
    idx = _frames(frame_index, n_frames, n, where)
    w2 = np.ones(n) if weights is None else _vector("weights", weights, n, where) ** 2
    num = np.bincount(idx, weights=w2 * i_o * i_c, minlength=n_frames)
    den = np.bincount(idx, weights=w2 * i_c * i_c, minlength=n_frames)
    return np.nan_to_num(_ratio(num, den), nan=0.0)


def jana_scale_per_frame(
    i_obs: ArrayLike,
    sigma: ArrayLike,
    i_calc: ArrayLike,
    frame_index: ArrayLike,
    n_frames: int,
) -> np.ndarray:
    """Each frame's intensity scale k_f² from Jana's amplitude scale k_f = Σ w F_o F_c / Σ w F_c²
    (Jana weights w, F = sqrt(max(I, 0))): the exact minimiser of Σ w (F_o − k_f F_c)², so that
    wR from :func:`jana_figures` on ``k_f² I_c`` is the wR the refinement minimises (the numpy
    twin of the scale inside :func:`jana_wr_loss`).

    Args:
      i_obs, sigma, i_calc: shape (n_refl,); σ > 0.
      frame_index: frame of each reflection, integers in [0, n_frames), shape (n_refl,).
      n_frames: number of frames.

    Returns:
      k_f², float64, shape (n_frames,); 0.0 where undefined (no reflection, or every F_c 0).
    """
    where = "jana_scale_per_frame"
    i_o = _vector("i_obs", i_obs, None, where)
    n = i_o.shape[0]
    s = _positive_sigma(sigma, n, where)
    f_c = _amplitudes(_vector("i_calc", i_calc, n, where))
    idx = _frames(frame_index, n_frames, n, where)
    w = _jana_weights_np(i_o, s)
    num = np.bincount(idx, weights=w * _amplitudes(i_o) * f_c, minlength=n_frames)
    den = np.bincount(idx, weights=w * f_c * f_c, minlength=n_frames)
    return np.nan_to_num(_ratio(num, den), nan=0.0) ** 2


# ---------------------------------------------------------------------------------------------
# Jana2020 figures
# ---------------------------------------------------------------------------------------------


def jana_figures(
    i_obs: ArrayLike, sigma: ArrayLike, i_calc: ArrayLike, *, n_params: int = 0
) -> dict[str, float | int]:
    """Jana2020 figures of merit on |F| (science.md §7), as fractions.

    Conventions, exactly as science.md §7 writes them:

    * F_o = sqrt(max(I_o, 0)); F_c = sqrt(max(I_c, 0)). ``i_calc`` must already be on the scale
      of ``i_obs`` (apply the per-frame scale first, e.g. with :func:`scale_per_frame`).
    * σ_F = σ/(2F_o), or 5√σ when I_o < 0.01σ (continuous at I_o = 0.01σ: a cap as F_o → 0).
    * w = 1/(σ_F² + (0.01 F_o)²).
    * "obs" = reflections with I_o > 3σ; "all" = every reflection given.
    * R = Σ|F_o − F_c| / Σ F_o; wR = sqrt(Σ w (F_o − F_c)² / Σ w F_o²).
    * GoF = sqrt(Σ w (F_o − F_c)² / (N_ref − N_par)). §7 does not say over which reflections;
      Jana prints both, so ``gof`` uses the observed reflections (N_ref = n_obs, Jana's GOF(obs))
      and ``gof_all`` every reflection (N_ref = n_all, Jana's GOF(all)).

    Args:
      i_obs: observed intensities, arbitrary units, shape (n,); negative values allowed
        (background-subtracted; they give F_o = 0).
      sigma: standard uncertainties σ(I_o), same units, shape (n,), every entry > 0.
      i_calc: calculated intensities on the scale of ``i_obs``, shape (n,); negative values are
        clipped to 0.
      n_params: number of refined parameters N_par (only the GoF uses it).

    Returns:
      ``r_obs``, ``r_all``, ``wr_obs``, ``wr_all``, ``gof``, ``gof_all`` (float fractions) and
      ``n_obs``, ``n_all`` (int). A ratio with nothing to sum over (an empty selection, Σ F_o = 0,
      or N_ref − N_par ≤ 0 for a GoF) is NaN; no exception, no warning.

    Raises:
      EdkitError: mismatched shapes, non-finite values, σ ≤ 0, or n_params not an integer ≥ 0.
    """
    where = "jana_figures"
    i_o = _vector("i_obs", i_obs, None, where)
    n = i_o.shape[0]
    s = _positive_sigma(sigma, n, where)
    i_c = _vector("i_calc", i_calc, n, where)
    if isinstance(n_params, bool) or not isinstance(n_params, int | np.integer) or n_params < 0:
        raise EdkitError(f"{where}: n_params = {n_params!r}, expected an integer ≥ 0")

    f_o = _amplitudes(i_o)
    f_c = _amplitudes(i_c)
    w = _jana_weights_np(i_o, s)
    obs = i_o > OBS_SIGMA_CUT * s
    abs_res = np.abs(f_o - f_c)
    w_res2 = w * (f_o - f_c) ** 2
    w_fo2 = w * f_o**2
    n_obs = int(np.count_nonzero(obs))

    def fig(sel: np.ndarray, n_ref: int) -> tuple[float, float, float]:
        r = _ratio(np.sum(abs_res[sel]), np.sum(f_o[sel]))
        wr2 = _ratio(np.sum(w_res2[sel]), np.sum(w_fo2[sel]))
        gof2 = _ratio(np.sum(w_res2[sel]), n_ref - n_params if n_ref > n_params else 0)
        return float(r), float(np.sqrt(wr2)), float(np.sqrt(gof2))

    r_obs, wr_obs, gof = fig(obs, n_obs)
    r_all, wr_all, gof_all = fig(np.ones(n, dtype=bool), n)
    return {
        "r_obs": r_obs,
        "r_all": r_all,
        "wr_obs": wr_obs,
        "wr_all": wr_all,
        "gof": gof,
        "gof_all": gof_all,
        "n_obs": n_obs,
        "n_all": n,
    }


# ---------------------------------------------------------------------------------------------
# diffBloch per-frame figures
# ---------------------------------------------------------------------------------------------


def frame_r_obs(
    i_obs: ArrayLike,
    sigma: ArrayLike,
    i_calc: ArrayLike,
    frame_index: ArrayLike,
    n_frames: int,
) -> np.ndarray:
    """Per-frame R_obs on |F| after a per-frame scale (diffBloch convention, science.md §7).

    Each frame f is scaled on its own by the inverse-variance closed-form scale
    k_f = Σ I_o I_c/σ² / Σ I_c²/σ² over all its reflections (:func:`scale_per_frame` with
    w = 1/σ), then R_obs,f = Σ_obs |F_o − sqrt(k_f I_c)| / Σ_obs F_o over its reflections with
    I_o > 3σ, with F = sqrt(max(I, 0)). diffBloch reports the mean of these over frames
    (:func:`mean_frame_r_obs`); it is not comparable with Jana's R_obs.

    Args:
      i_obs: observed intensities, arbitrary units, shape (n_refl,).
      sigma: σ(I_o), shape (n_refl,), every entry > 0.
      i_calc: calculated intensities on any scale, shape (n_refl,).
      frame_index: frame of each reflection, integers in [0, n_frames), shape (n_refl,).
      n_frames: number of frames.

    Returns:
      R_obs per frame as fractions, float64, shape (n_frames,); NaN for a frame without observed
      reflections.

    Raises:
      EdkitError: mismatched shapes, non-finite values, σ ≤ 0 or frame indices out of range.
    """
    where = "frame_r_obs"
    i_o = _vector("i_obs", i_obs, None, where)
    n = i_o.shape[0]
    s = _positive_sigma(sigma, n, where)
    i_c = _vector("i_calc", i_calc, n, where)
    idx = _frames(frame_index, n_frames, n, where)
    k = scale_per_frame(i_o, i_c, idx, n_frames, weights=1.0 / s)
    f_o = _amplitudes(i_o)
    f_c = _amplitudes(k[idx] * i_c)
    obs = i_o > OBS_SIGMA_CUT * s
    num = np.bincount(idx[obs], weights=np.abs(f_o - f_c)[obs], minlength=n_frames)
    den = np.bincount(idx[obs], weights=f_o[obs], minlength=n_frames)
    return _ratio(num, den)


def mean_frame_r_obs(
    i_obs: ArrayLike,
    sigma: ArrayLike,
    i_calc: ArrayLike,
    frame_index: ArrayLike,
    n_frames: int,
) -> float:
    """diffBloch mean per-frame R_obs; not comparable with Jana R_obs (science.md §7, §8).

    The mean of :func:`frame_r_obs` over the frames that have at least one observed reflection
    (I_o > 3σ); this is the number science.md §8 tabulates (there in %).

    Args:
      i_obs: observed intensities, arbitrary units, shape (n_refl,).
      sigma: σ(I_o), shape (n_refl,), every entry > 0.
      i_calc: calculated intensities on any scale, shape (n_refl,).
      frame_index: frame of each reflection, integers in [0, n_frames), shape (n_refl,).
      n_frames: number of frames.

    Returns:
      The mean per-frame R_obs as a fraction; NaN (no warning) when no frame has an observed
      reflection.
    """
    r = frame_r_obs(i_obs, sigma, i_calc, frame_index, n_frames)
    ok = np.isfinite(r)
    return float(np.sum(r[ok]) / np.count_nonzero(ok)) if ok.any() else float("nan")


def frame_wr2(
    i_obs: ArrayLike,
    sigma: ArrayLike,
    i_calc: ArrayLike,
    frame_index: ArrayLike,
    n_frames: int,
) -> np.ndarray:
    """Per-frame intensity wR2 after a per-frame scale (diffBloch's objective, science.md §7).

    wR2_f = sqrt(Σ_{r∈f} w (I_o − k_f I_c)² / Σ_{r∈f} w I_o²), w = 1/σ², with k_f the
    closed-form scale for these weights, k_f = Σ w I_o I_c / Σ w I_c². Every reflection of the
    frame counts (no 3σ cut); negative I_o enter as they are.

    Args:
      i_obs: observed intensities, arbitrary units, shape (n_refl,).
      sigma: σ(I_o), shape (n_refl,), every entry > 0.
      i_calc: calculated intensities on any scale, shape (n_refl,).
      frame_index: frame of each reflection, integers in [0, n_frames), shape (n_refl,).
      n_frames: number of frames.

    Returns:
      wR2 per frame as fractions, float64, shape (n_frames,); NaN for a frame without
      reflections (or with every I_o = 0).

    Raises:
      EdkitError: mismatched shapes, non-finite values, σ ≤ 0 or frame indices out of range.
    """
    where = "frame_wr2"
    i_o = _vector("i_obs", i_obs, None, where)
    n = i_o.shape[0]
    s = _positive_sigma(sigma, n, where)
    i_c = _vector("i_calc", i_calc, n, where)
    idx = _frames(frame_index, n_frames, n, where)
    k = scale_per_frame(i_o, i_c, idx, n_frames, weights=1.0 / s)
    w = 1.0 / s**2
    num = np.bincount(idx, weights=w * (i_o - k[idx] * i_c) ** 2, minlength=n_frames)
    den = np.bincount(idx, weights=w * i_o**2, minlength=n_frames)
    return np.sqrt(_ratio(num, den))
