"""Per-frame thickness search: a coarse grid, a fine search from the same eigensystems, and a
smoothness prior over the rotation that keeps one bad frame from pulling its thickness away.

The cost of a search is the number of Bloch solves (one eigendecomposition per sub-orientation of
every frame), not the number of thicknesses: ψ_g(t) = Σ_j a_gj e^{itλ_j} for every t from one
decomposition (science.md §4). So each chunk of frames is decomposed once, its coarse R curves
are evaluated from the eigensystems, and the few lowest local minima of each frame are refined
by zooming in (two levels of nine points: to 1.6 Å on a 25 Å grid) from the *same*
eigensystems before the chunk's memory is released. Only the amplitudes of the frame's scored
reflections are kept (n_s × n_scored × n per frame, not n_s × n²).

Per-frame minima alone are noisy (flat curves, several minima of similar depth, worse from a
far-off structure); neighbouring frames (about 1° apart) hardly differ in thickness, so a
smoothness prior joins them (:mod:`edkit.simulate.thickness_prior`). A frame whose own best
minimum lies unusually far from the result is flagged as an outlier.
Why a prior, and what it recovers: :mod:`edkit.simulate.thickness_prior`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit.constants import potential_prefactor
from edkit.cores import devices_for
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.physics import bloch
from edkit.physics.rocking import INERT_EXCITATION_ERROR, chebyshev_fit, sub_orientation_beams
from edkit.physics.structure import structure_params, structure_tables
from edkit.progress import progress_bar
from edkit.simulate.setup import FrameSetup, build_frame_setup
from edkit.simulate.sharding import sharded_map
from edkit.simulate.stack import (
    FrameArrays,
    StackConfig,
    frame_arrays,
    stack_config,
)
from edkit.simulate.stack import sub_batch_size as _sub_batch_size
from edkit.simulate.stream import chunk_layout, potentials_jit
from edkit.simulate.thickness_fine import ScoredRows, local_minima, zoom
from edkit.simulate.thickness_prior import (
    DEFAULT_OUTLIER_TOLERANCE,
    DEFAULT_SMOOTHNESS,
    outlier_frames,
    pair_weights,
    robust_thickness,
)

DEFAULT_THICKNESS_GRID = np.arange(50.0, 2001.0, 25.0)  # Å
#: Local minima of each frame's coarse curve refined from the eigensystems.
DEFAULT_CANDIDATES = 3
#: Zoom levels of the fine search (nine points each, the interval shrinking 4× per level): two
#: reach 1.6 Å on a 25 Å grid.
DEFAULT_LEVELS = 2


def _frame_eigensystems(
    inputs: tuple, shared: tuple, reciprocal: jax.Array, config: StackConfig, sub_batch: Any
) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (n_s, n) and amplitudes (n_s, r, n) of one frame's sub-orientations.

    The structure matrix is built exactly as :func:`edkit.physics.rocking.frame_intensities`
    and :func:`edkit.physics.bloch.bloch_intensities` build it (Bethe beams, absorption through
    the general eigendecomposition), so that ψ_r(t) = Σ_j amplitude_rj exp(i t λ_j) reproduces
    their intensities |ψ_r|² at every thickness t (Å) for the rows r (beam positions).
    """
    rotation, angles, hkl, valid, coupling, rows = inputs[:6]
    f_values, wave_number, kappa = shared
    prefactor = potential_prefactor(config.voltage)
    solve_dtype = None if config.solve_dtype is None else jnp.dtype(config.solve_dtype)
    k_hats = sub_orientation_beams(rotation, angles)
    g_cart = hkl.astype(reciprocal.dtype) @ reciprocal
    coupled = valid[:, None] & valid[None, :]

    def gather(index):
        return prefactor * f_values.at[index].get(mode="promise_in_bounds")

    potential = jnp.where(coupled, gather(coupling), 0.0)
    absorptive = kappa * potential if config.absorbing else None
    has_weak = len(inputs) > 6
    n_sub = angles.shape[0]
    n_terms = config.bethe_terms if has_weak else None
    shared_bethe = n_terms is not None and n_terms < n_sub
    basis = np.zeros((n_sub, 0))
    if has_weak:
        weak_hkl, weak_valid, index_out, index_in = inputs[6:]
        weak_g = weak_hkl.astype(reciprocal.dtype) @ reciprocal
        coupling_out = jnp.where(valid[:, None] & weak_valid[None, :], gather(index_out), 0.0)
        coupling_in = jnp.where(weak_valid[:, None] & valid[None, :], gather(index_in), 0.0)
        if config.absorbing:  # U + iU' with U' = κU
            coupling_out = coupling_out * (1.0 + 1j * kappa)
            coupling_in = coupling_in * (1.0 + 1j * kappa)
        if n_terms is not None and n_terms < n_sub:
            basis, fit = chebyshev_fit(n_sub, n_terms)
            s_weak = jax.vmap(lambda k: bloch.excitation_errors(weak_g, k, wave_number))(k_hats)
            s_weak = jnp.where(weak_valid[None, :], s_weak, INERT_EXCITATION_ERROR)
            inverse = jnp.where(weak_valid[None, :], 1.0 / (2.0 * wave_number * s_weak), 0.0)
            terms = bloch.bethe_terms(coupling_out, coupling_in, jnp.asarray(fit) @ inverse)

    def cast(x):
        if solve_dtype is None:
            return x
        return x.astype(solve_dtype if jnp.iscomplexobj(x) else jnp.finfo(solve_dtype).dtype)

    def one(k_hat, basis_row):
        s = bloch.excitation_errors(g_cart, k_hat, wave_number)
        s = jnp.where(valid, s, INERT_EXCITATION_ERROR)
        metric = bloch.metric_factors(jnp.where(valid, g_cart @ k_hat, 0.0), wave_number)
        outer = metric[:, None] * metric[None, :]
        bethe = None
        if shared_bethe:
            bethe = jnp.einsum("k,kij->ij", basis_row.astype(terms.real.dtype), terms)
        elif has_weak:
            s_weak = bloch.excitation_errors(weak_g, k_hat, wave_number)
            s_weak = jnp.where(weak_valid, s_weak, INERT_EXCITATION_ERROR)
            bethe = bloch.bethe_correction(coupling_out, coupling_in, s_weak, wave_number)
        scale = jnp.pi / wave_number
        if absorptive is None:
            a = bloch.structure_matrix(s, metric, potential, wave_number)
            if bethe is not None:
                a = a - outer * (0.5 * (bethe + jnp.conj(bethe).T))
            eigenvalues, right = jnp.linalg.eigh(cast(scale * a))
            entrance = jnp.conj(right[0])
        else:
            b = bloch.structure_matrix(s, metric, potential, wave_number, absorptive)
            if bethe is not None:
                b = b - outer * bethe
            eigenvalues, right = jnp.linalg.eig(cast(scale * b))
            entrance = jnp.linalg.inv(right)[:, 0]
        # ψ = M W e^{itΛ} W⁻¹ M⁻¹ e₀ with M₀ = 1: the metric of each row joins its amplitude.
        row_metric = (metric[rows] / metric[0]).astype(right.real.dtype)
        amplitudes = right[rows, :] * entrance[None, :] * row_metric[:, None]
        return eigenvalues, amplitudes

    xs = (k_hats, jnp.asarray(basis))
    if sub_batch is None or sub_batch >= n_sub:
        return jax.vmap(one)(*xs)
    return jax.lax.map(lambda x: one(*x), xs, batch_size=sub_batch)


def _eigensystems(
    pot: tuple, reciprocal: jax.Array, arrays: FrameArrays, rows: jax.Array, config: StackConfig
) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (c, n_s, n) and row amplitudes (c, n_s, r, n) of a chunk of c frames."""
    n_frames, size = arrays.hkl.shape[0], arrays.hkl.shape[1]
    sub_batch = _sub_batch_size(n_frames, size, arrays.angles.shape[1], config.batch_size)
    inputs: tuple = (*arrays[:2], *arrays[3:6], rows)
    if arrays.weak_hkl is not None:
        inputs = (*inputs, *arrays[6:10])  # the frame's beams (runs are not used here)

    def map_frames(shared: tuple, *frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.lax.map(
            lambda x: _frame_eigensystems(x, shared, reciprocal, config, sub_batch),
            frames,
            batch_size=config.batch_size,
        )

    inputs = tuple(jnp.asarray(x) for x in inputs)
    if config.devices > 1:
        return sharded_map(map_frames, tuple(pot), inputs, config.devices)
    return map_frames(tuple(pot), *inputs)


def _intensities(
    eigenvalues: jax.Array, amplitudes: jax.Array, weights: jax.Array, thickness: jax.Array
) -> jax.Array:
    """Σ_s w_s |Σ_j a_srj e^{itλ_sj}|² of a chunk: (c, n_t, r) for thicknesses (c, n_t), Å."""

    def one(x):
        lam, amp, w, t = x
        phases = jnp.exp(1j * t[:, None, None] * lam[None, :, :])  # (n_t, n_s, n)
        # Real amplitudes (real symmetric solves of centric crystals) keep complex phases.
        complex_dtype = jnp.result_type(amp.dtype, jnp.complex64)
        psi = jnp.einsum("tsn,srn->tsr", phases.astype(complex_dtype), amp.astype(complex_dtype))
        return jnp.einsum("s,tsr->tr", w, jnp.abs(psi) ** 2)

    return jax.lax.map(one, (eigenvalues, amplitudes, weights, thickness))


def _coarse_pass(
    pot: tuple,
    reciprocal: jax.Array,
    arrays: FrameArrays,
    rows: jax.Array,
    grid: jax.Array,
    config: StackConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A chunk's eigensystems and its row intensities on the coarse grid, (c, n_t, r), in one
    program (one compile per chunk shape, as the frame stack)."""
    eigenvalues, amplitudes = _eigensystems(pot, reciprocal, arrays, rows, config)
    thickness = jnp.broadcast_to(grid[None, :], (rows.shape[0], grid.shape[0]))
    return eigenvalues, amplitudes, _intensities(eigenvalues, amplitudes, arrays.weights, thickness)


_coarse_pass_jit = jax.jit(_coarse_pass, static_argnums=(5,))
_intensities_jit = jax.jit(_intensities)


def thickness_search(
    crystal: Crystal,
    dataset: xr.Dataset,
    grid: Any = DEFAULT_THICKNESS_GRID,
    *,
    setup: FrameSetup | None = None,
    absorption: float | None = None,
    chunk_frames: int = 8,
    levels: int = DEFAULT_LEVELS,
    candidates: int = DEFAULT_CANDIDATES,
    robust: bool = True,
    smoothness: float = DEFAULT_SMOOTHNESS,
    outlier_tolerance: float = DEFAULT_OUTLIER_TOLERANCE,
    solve_dtype: Any = None,
    progress: bool | None = None,
    at: np.ndarray | None = None,
    devices: int | None = None,
    **setup_options: Any,
) -> xr.Dataset:
    """Per-frame thickness: a coarse grid, a fine search from the same eigensystems, and a
    smoothness prior over the rotation (see the module docstring).

    Each frame is scaled (closed form) and scored by its per-frame R_obs on |F| (diffBloch
    convention) over its scored reflections.

    Args:
      crystal, dataset: as for :func:`edkit.simulate.frames.simulate_frames`.
      grid: coarse thicknesses, Å, 1-D.
      setup: a ready :func:`build_frame_setup` result (a refinement's own, with its Bethe
        beams); else built with ``setup_options``.
      absorption: κ of the proportional absorption model, or None.
      chunk_frames: frames decomposed at a time; memory is one chunk's working set plus its
        kept amplitudes (n_s × n_scored × n complex per frame).
      levels: zoom levels of the fine search around each candidate (0: the coarse grid only).
      candidates: lowest local minima of each frame's coarse curve refined.
      robust: choose with the smoothness prior; False: each frame's own best minimum.
      smoothness: relative thickness change per √degree the prior expects, > 0.
      outlier_tolerance: a frame is flagged when its own best thickness lies further than this
        (relative) from the chosen one and further than 3 robust standard deviations of that
        distance over the frames.
      solve_dtype: complex dtype of the solves (``jnp.complex64``: faster, intensities to
        ~1e-5); None keeps complex128.
      progress: a progress bar over the frames with ETA (tqdm: stderr or a notebook widget);
        None: where someone watches (an interactive terminal or a notebook).
      at: (n_frames,) thicknesses, Å, at which each frame's R is also wanted (e.g. a
        refinement's): ``r_obs_at`` in the result, from the same eigensystems.
      devices: shard each chunk's frames over this many devices; None: every local device
        (:func:`edkit.cores.devices_for`), a divisor of ``chunk_frames``.

    Returns:
      Dataset on ``frame`` (and ``thickness``, the coarse grid): ``r_obs_frame`` (frame,
      thickness) — the coarse curves —, ``thickness_best`` (Å; NaN for frames with no observed
      scored reflection) and ``r_obs_best``; ``thickness_raw`` and ``r_obs_raw`` (each frame's
      own best minimum), ``thickness_trend`` (the prior's most probable coarse path, Å, every
      frame), ``outlier`` (bool), ``thickness_candidates`` and ``r_obs_candidates`` (frame,
      candidate: the refined local minima); with ``at``, ``thickness_at`` and ``r_obs_at``.
    """
    grid = np.asarray(grid, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid < 0):
        raise EdkitError(f"grid: expected a 1-D array of thicknesses ≥ 0 Å, got {grid!r}")
    if not (isinstance(levels, int) and levels >= 0):
        raise EdkitError(f"levels = {levels!r}: expected an integer ≥ 0")
    if not (isinstance(candidates, int) and candidates >= 1):
        raise EdkitError(f"candidates = {candidates!r}: expected an integer ≥ 1")
    for name, value in (("smoothness", smoothness), ("outlier_tolerance", outlier_tolerance)):
        if not (np.isfinite(value) and value > 0):
            raise EdkitError(f"{name} = {value!r}: expected a positive number")
    if absorption is not None and not (np.isfinite(absorption) and absorption >= 0):
        raise EdkitError(f"absorption = {absorption!r}: expected κ ≥ 0 (U' = κU) or None")
    grid = np.sort(grid)
    if setup is None:
        setup = build_frame_setup(crystal, dataset, **setup_options)
    n_frames, k = setup.n_frames, int(min(candidates, grid.size))
    if at is not None:
        at = np.asarray(at, dtype=float)
        if at.shape != (n_frames,) or not np.all(np.isfinite(at)) or np.any(at < 0):
            raise EdkitError(f"at: expected {n_frames} finite thicknesses ≥ 0 Å, got {at!r}")
    r_at = np.full(n_frames, np.nan)
    i_obs = np.asarray(dataset["I_obs"].values, dtype=float)
    sigma = np.asarray(dataset["sigma"].values, dtype=float)
    scored = setup.scored
    n_scored = np.bincount(setup.refl_frame[scored], minlength=n_frames)
    n_obs = np.bincount(setup.refl_frame[scored & (i_obs > 3.0 * sigma)], minlength=n_frames)
    n_rows = max(8, -(-int(n_scored.max(initial=1)) // 8) * 8)  # few compiled shapes
    scored_index = np.flatnonzero(scored)
    by_frame = np.split(
        scored_index[np.argsort(setup.refl_frame[scored], kind="stable")], np.cumsum(n_scored)[:-1]
    )
    curves = np.full((n_frames, grid.size), np.nan)
    cand_t = np.full((n_frames, k), np.nan)
    cand_r = np.full((n_frames, k), np.nan)
    with jax.enable_x64(True):
        params, tables = structure_params(crystal), structure_tables(crystal)
        real = bool(setup.settings.get("centric", False))
        kappa = None if absorption is None else float(absorption)
        pot = potentials_jit(params, tables, setup.differences, float(setup.voltage), kappa, real)
        if devices is None:
            devices = devices_for(n_frames, chunk_frames)
        config = stack_config(
            setup, absorption is not None, "eig", solve_dtype, devices=max(1, int(devices))
        )
        bar = progress_bar(n_frames, "thickness search", "frame", progress)
        for frames, size, n_w in chunk_layout(setup, chunk_frames):
            chunk = ScoredRows(setup, [by_frame[f] for f in frames], n_rows)
            if chunk.index.size == 0:  # nothing scored: no solve needed
                bar.update(len(frames))
                continue
            arrays = frame_arrays(setup, frames, size, n_w)
            eigenvalues, amplitudes, coarse_intensities = _coarse_pass_jit(
                pot, tables.reciprocal_basis, arrays, jnp.asarray(chunk.rows), jnp.asarray(grid),
                config,
            )  # fmt: skip
            weights = jnp.asarray(arrays.weights)

            def evaluate(t: np.ndarray, lam=eigenvalues, amp=amplitudes, w=weights) -> np.ndarray:
                return np.asarray(_intensities_jit(lam, amp, w, jnp.asarray(t)))

            coarse = chunk.r_obs(i_obs, sigma, np.asarray(coarse_intensities))
            curves[frames] = coarse
            if at is not None:
                r_at[frames] = chunk.r_obs(i_obs, sigma, evaluate(at[frames, None]))[:, 0]
            start = np.stack([local_minima(row, k) for row in coarse])
            if levels > 0:
                t_fine, r_fine = zoom(chunk, evaluate, grid, start, levels, (i_obs, sigma))
            else:
                t_fine, r_fine = grid[start], np.take_along_axis(coarse, start, 1)
            r_fine = np.where(np.isfinite(r_fine), r_fine, np.nan)
            order = np.argsort(np.where(np.isfinite(r_fine), r_fine, np.inf), axis=1, kind="stable")
            cand_t[frames] = np.take_along_axis(t_fine, order, 1)
            cand_r[frames] = np.take_along_axis(r_fine, order, 1)
            bar.update(len(frames))
        bar.close()
    result = _result(setup, grid, curves, cand_t, cand_r, n_obs, robust, smoothness,
                     outlier_tolerance)  # fmt: skip
    if at is not None:
        result["thickness_at"] = ("frame", at, {"units": "angstrom", "long_name": "thickness"})
        result["r_obs_at"] = ("frame", r_at, {"units": "1", "long_name": "per-frame R_obs at it"})
    return result


def _result(
    setup: FrameSetup,
    grid: np.ndarray,
    curves: np.ndarray,
    cand_t: np.ndarray,
    cand_r: np.ndarray,
    n_obs: np.ndarray,
    robust: bool,
    smoothness: float,
    tolerance: float,
) -> xr.Dataset:
    """Choose per frame (raw or robust) and assemble the Dataset."""
    finite = np.isfinite(cand_r[:, 0])
    raw_t = np.where(finite, cand_t[:, 0], np.nan)
    raw_r = np.where(finite, cand_r[:, 0], np.nan)
    safe_r = np.where(np.isfinite(cand_r), cand_r, np.inf)
    safe_t = np.where(np.isfinite(cand_t), cand_t, grid[0])
    best_t, best_r, trend = robust_thickness(
        curves, grid, safe_t, safe_r, n_obs, pair_weights(setup, smoothness)
    )
    if not robust:
        best_t, best_r = raw_t, raw_r
    best_t, best_r = np.where(finite, best_t, np.nan), np.where(finite, best_r, np.nan)
    outlier = outlier_frames(raw_t, best_t, tolerance)

    def per_frame(values: np.ndarray, units: str | None, long_name: str) -> tuple:
        attrs = {"long_name": long_name} | ({"units": units} if units else {})
        return ("frame", values, attrs)

    r_attrs = {"units": "1", "long_name": "per-frame R_obs on |F| (diffBloch convention)"}
    return xr.Dataset(
        {
            "r_obs_frame": (("frame", "thickness"), curves, r_attrs),
            "thickness_best": per_frame(best_t, "angstrom", "thickness"),
            "r_obs_best": per_frame(best_r, "1", "per-frame R_obs at the chosen thickness"),
            "thickness_raw": per_frame(raw_t, "angstrom", "each frame's own best thickness"),
            "r_obs_raw": per_frame(raw_r, "1", "per-frame R_obs at its own best"),
            "thickness_trend": per_frame(
                trend, "angstrom", "most probable thickness path (coarse grid)"
            ),
            "outlier": per_frame(outlier, None, "own best unusually far from the chosen thickness"),
            "thickness_candidates": (
                ("frame", "candidate"),
                cand_t,
                {"units": "angstrom", "long_name": "refined local minima, best first"},
            ),
            "r_obs_candidates": (("frame", "candidate"), cand_r, r_attrs),
        },
        coords={
            "frame": setup.frame,
            "thickness": ("thickness", grid, {"units": "angstrom", "long_name": "thickness"}),
        },
        attrs={
            **{k: v for k, v in setup.settings.items() if v is not None},
            "robust": int(robust),
            "smoothness": float(smoothness),
        },
    )
