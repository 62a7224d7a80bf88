"""A kinematical start: positions fitted to |F|², judged and given an overall U by the
thickness search.

Why: from a far-off start (the paper's ``quartz_displaced_03.cif``: 0.29 Å RMS, every U reset to
0.1 Å²) each frame's R(t) curve is flat to a few per cent, the thickness search lands 40–77 % off
on every frame, and the refinement needs about 1000 Adam steps and restarts to recover
(README, *The paper's synthetic benchmark*). A crystallographer would first refine the model
kinematically; so does :func:`kinematic_start`, in three cheap parts:

1. **Kinematical minima** (:func:`position_candidates`): least squares on I_obs ≈ k_f |F(h)|²
   (one scale per frame, solved in closed form inside the residual), weights
   1/√(σ² + (0.1 I)²) and a soft-ℓ1 loss (dynamical intensities are far from |F|²: a robust
   fit). Resolution grows in shells (d* < 0.5, 0.7, 0.9 Å⁻¹ with point atoms and positions
   only, then 1.2 Å⁻¹ and all with the ADPs free too): a low-resolution fit has a wider basin.
   The free coefficients are the refinement's own (site symmetry, riding H; :class:`~edkit.
   models.parameters.StructureMapping`). That cost has local minima a few tenths of an ångström
   apart, and with 10–20 frames its lowest is often a wrong one; so the fit starts from the
   given positions and 24 random shifts of them (0.2 Å RMS), and the ``CANDIDATES`` lowest
   distinct minima go on. The fitted ADPs are not kept: kinematical ADPs soak up dynamical
   effects (quartz: Ueq 0.019 and 0.029 Å² against the truth's 0.009 and 0.016).
2. **The judge**: the refinement's thickness search (Bethe beams, complex64) on at most
   ``SEARCH_FRAMES`` frames spread over the rotation, each candidate and the given positions
   isotropic at ``U_PROBE``; the lowest mean per-frame R_obs wins, a kinematical minimum only
   by a margin (``MIN_GAIN``). It tells the right minimum clearly (quartz, 8 subsets of 10 and
   20 frames: 0.10–0.25 against 0.32–0.56 for the wrong ones). Chosen by the lowest
   low-resolution kinematical cost alone, 4 of those 8 had ended in a wrong minimum
   (0.23–1.19 Å off the truth); judged so, every one ended within 0.07 Å. On a heavy-atom
   crystal the kinematical fit may find no right minimum at all (CsPbBr₃-sized synthetic
   frames, 0.12–0.50 Å off: every minimum 0.3–0.9 Å off); the margin then keeps the given
   positions, and only the overall U is chosen.
3. **ADPs**: every atom isotropic at one overall U, chosen among ``U_GRID`` (and the start's
   own ADPs) by the same search's mean R, then a parabola through the best grid point and its
   neighbours. Why: the search is very sensitive to U (quartz, kinematical positions: every
   frame within 10 % of quartz.cif's thickness at U = 0.0125 Å², 8 frames off at 0.01, 88 at
   0.03), and its R is lowest where the thickness comes out right.

Measured on the paper's synthetic quartz from ``quartz_displaced_03.cif``: on all 99 frames the
positions go from 0.31 and 0.26 Å off the truth to 0.006 and 0.018 Å, and the search's
thickness is then within 10 % of quartz.cif's on every frame (at most 8.3 %; none before), in
28 s. A start that is already a kinematical refinement gains nothing (the fit moves it by the
kinematical bias, ≈ 0.02 Å). By default (``kinematic_start="auto"``) a refinement makes the
start only where the given model fits its first thickness search at a mean per-frame R_obs
above :data:`FAR_OFF_R` (:func:`far_off_r`), then sets up again from it.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from scipy.optimize import least_squares

from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.io.pets import select_frames
from edkit.models.parameters import structure_mapping
from edkit.physics.structure import structure_factors_of, structure_tables
from edkit.precision import x64
from edkit.progress import progress_bar
from edkit.refine.options import RefinementOptions
from edkit.simulate.frames import build_frame_setup
from edkit.simulate.thickness_search import thickness_search

#: Resolution shells of the position fit, d* limits in Å⁻¹ (the last: every reflection); up to
#: ``POINT_ATOMS_BELOW`` positions only, with point atoms, then positions and ADPs together.
SHELLS = (0.5, 0.7, 0.9, 1.2, math.inf)
POINT_ATOMS_BELOW = 1.0
#: Random starts of the low-resolution fits, and their spread around the start, Å.
RANDOM_STARTS, START_SPREAD = 24, 0.2
#: Kinematical minima kept for the thickness search to judge, and how far apart they must lie
#: (the largest atom distance, Å).
CANDIDATES, DISTINCT = 4, 0.05
#: The overall U (Å²) at which the search compares the candidates.
U_PROBE = 0.01
#: A kinematical minimum replaces the given positions only when its search R is this much lower
#: (relative). Why: on quartz the right minimum fitted 42–82 % better than a far-off start; on a
#: CsPbBr₃-sized synthetic set (6 frames, 0.3–0.5 Å off) every kinematical minimum was wrong
#: (0.3–0.9 Å off) yet one fitted 10 % better, and was taken before this margin.
MIN_GAIN = 0.2
#: A shell is fitted only with at least this many reflections per free coefficient.
MIN_REFLECTIONS_PER_PARAMETER = 5
#: Relative error added to σ in the fit's weights, and the soft-ℓ1 loss's scale (in σ).
RELATIVE_ERROR, LOSS_SCALE = 0.1, 3.0
#: Overall isotropic U tried for the start, Å².
U_GRID = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.03)
#: Frames of the thickness searches that choose U (spread evenly over the rotation).
SEARCH_FRAMES = 8
#: The position fit's isotropic U of each atom lies in [0, U_MAX], Å².
U_MAX = 0.2
#: ``kinematic_start="auto"`` (the default) makes the start where the given model's thickness
#: search fits at a mean per-frame R_obs above this: between the good models measured (real
#: quartz 6.8–7.6 %, albite 11.9–12.7 %, the paper's synthetic file 15–16 %) and the nearest
#: far-off start (``_01``, 18.5 %); forced, the start paid at 18.8 % and 26 % (README).
FAR_OFF_R = 0.17


@dataclass(frozen=True)
class KinematicStart:
    """What :func:`kinematic_start` did.

    Attributes:
      crystal: the start: positions fitted, every atom isotropic at ``u_overall`` (or the
        start's own ADPs when they fit best: ``u_overall`` is then NaN).
      shift: how far each asymmetric-unit atom moved, Å, (n_asu,).
      r_kinematic: Σ|I_obs − k_f|F|²| / Σ|I_obs| before and after the position fit.
      u_overall: the chosen overall U, Å² (NaN: the start's ADPs kept).
      search_r: mean per-frame R_obs of the searches by overall U (Å²).
      start_adp_r: the same with the start's own ADPs.
      candidate_r: the search's mean R of each kinematical minimum at ``U_PROBE`` (the lowest
        was taken if ``MIN_GAIN`` below ``given_r``, the given positions' at ``U_PROBE``).
    """

    crystal: Crystal
    shift: np.ndarray
    r_kinematic: tuple[float, float]
    u_overall: float
    search_r: dict[float, float]
    start_adp_r: float
    candidate_r: tuple[float, ...] = ()
    given_r: float = math.nan
    #: "auto": the given model's mean R_obs in the first search, which made it (NaN: asked for).
    far_off_r: float = math.nan

    def describe(self) -> str:
        """One line for a refinement's messages."""
        every = np.allclose(self.crystal.u_iso_equivalent, self.u_overall)
        atoms = "every atom" if every else "every atom but the riding H (Uiso fixed)"
        adp = (
            "the start's ADPs kept (they fit the search best)"
            if math.isnan(self.u_overall)
            else f"{atoms} isotropic at U = {self.u_overall:.4f} Å² (the search's best)"
        )
        why = (
            ""
            if math.isnan(self.far_off_r)
            else f" (the given model fitted the thickness search at a mean per-frame R_obs of "
            f"{100 * self.far_off_r:.1f} %, above {100 * FAR_OFF_R:g} %)"
        )
        if not self.candidate_r:
            return f"kinematical start{why}: too few reflections for a fit, positions kept; {adp}"
        return (
            f"kinematical start{why}: positions moved {np.max(self.shift, initial=0.0):.3f} Å "
            "at most "
            f"(kinematical R {100 * self.r_kinematic[0]:.1f} → {100 * self.r_kinematic[1]:.1f} "
            f"%; the best by the thickness search of {len(self.candidate_r)} kinematical "
            f"minima and the given positions); {adp}"
        )


@x64
def position_candidates(
    crystal: Crystal,
    dataset: xr.Dataset,
    shells: tuple[float, ...] = SHELLS,
    n_starts: int = RANDOM_STARTS,
    max_candidates: int = CANDIDATES,
    seed: int = 0,
) -> tuple[list[tuple[Crystal, float]], float]:
    """Kinematical fits of the free positions (module docstring, part 1): the distinct minima
    found, lowest kinematical cost first, each with its kinematical R; and the start's R. The
    ADPs and occupancies are the start's.

    Args:
      shells: d* limits of the successive fits, Å⁻¹ (see ``SHELLS``).
      n_starts: random starts besides the given one; they are shifted by ``START_SPREAD`` Å
        RMS per free coordinate.
      max_candidates: the most minima returned (``DISTINCT`` Å apart at least).
      seed: of the random starts.
    """
    mapping = structure_mapping(crystal)
    tables = structure_tables(crystal)
    pos_mask, adp_mask = mapping.position_mask, mapping.adp_mask
    n_pos, n_atoms = int(pos_mask.sum()), len(mapping.labels)
    if n_pos == 0:
        return [], math.nan
    hkl = np.stack([dataset[k].values for k in "hkl"], axis=1).astype(np.float64)
    _, frame = np.unique(dataset["frame_id"].values, return_inverse=True)
    n_frames = int(frame.max()) + 1
    i_obs = np.asarray(dataset["I_obs"].values, dtype=np.float64)
    sigma = np.asarray(dataset["sigma"].values, dtype=np.float64)
    usable = np.isfinite(i_obs) & np.isfinite(sigma) & (sigma > 0)
    weight = np.where(
        usable, 1.0 / np.sqrt(sigma**2 + (RELATIVE_ERROR * np.maximum(i_obs, 0.0)) ** 2), 0.0
    )
    i_obs = np.where(usable, i_obs, 0.0)
    metric = np.asarray(crystal.reciprocal_metric)
    d_star_2 = np.einsum("ni,ij,nj->n", hkl, metric, hkl)

    def scaled(theta: jax.Array, rows: np.ndarray) -> jax.Array:
        """k_f |F|² of the reflections ``rows``, k_f fitted to them (frames without any: 0);
        θ: position shifts, then ADP shifts from the start's (none: point atoms)."""
        positions = jnp.zeros(pos_mask.shape).at[pos_mask].set(theta[:n_pos])
        adp = jnp.zeros(adp_mask.shape).at[adp_mask].set(theta[n_pos:] if theta.size > n_pos else 0)
        params = mapping.structure(positions, adp, jnp.zeros(n_atoms))
        if theta.size == n_pos:
            params = params._replace(u_star=jnp.zeros_like(params.u_star))
        f = structure_factors_of(params, tables, hkl[rows])
        calc = f.real**2 + f.imag**2  # not abs(f)²: smooth where F = 0 (absences)
        w2, where = weight[rows] ** 2, frame[rows]
        numerator = jax.ops.segment_sum(w2 * calc * i_obs[rows], where, n_frames)
        denominator = jax.ops.segment_sum(w2 * calc * calc, where, n_frames)
        # a guard, not a tiny floor (whose derivative overflows), for frames without rows
        scale = numerator / jnp.where(denominator > 0, denominator, 1.0)
        return scale[where] * calc

    every_row = np.flatnonzero(usable)

    def r_factor(theta: np.ndarray) -> float:
        calc = np.asarray(scaled(jnp.asarray(theta), every_row))
        observed = i_obs[every_row]
        return float(np.sum(np.abs(observed - calc)) / np.sum(np.abs(observed)))

    n_adp = int(adp_mask.sum())
    r_before = r_factor(np.zeros(n_pos + n_adp))

    compiled: dict[tuple[float, int], tuple[Any, Any]] = {}  # one trace per shell and size

    def fit_shell(limit: float, theta: np.ndarray) -> tuple[np.ndarray, float]:
        """θ fitted to the reflections below ``limit``, and its cost (∞ where it failed)."""
        rows = np.flatnonzero(usable & (d_star_2 < limit**2))
        if (limit, theta.size) not in compiled:
            residuals = jax.jit(lambda t: weight[rows] * (i_obs[rows] - scaled(t, rows)))
            compiled[limit, theta.size] = residuals, jax.jit(jax.jacfwd(residuals))
        residuals, jacobian = compiled[limit, theta.size]
        fit = least_squares(
            lambda t: np.asarray(residuals(jnp.asarray(t))),
            theta,
            jac=lambda t: np.asarray(jacobian(jnp.asarray(t))),
            loss="soft_l1",
            f_scale=LOSS_SCALE,
            x_scale="jac",
        )
        return (fit.x, float(fit.cost)) if np.all(np.isfinite(fit.x)) else (theta, math.inf)

    def fit_shells(theta: np.ndarray, limits: list[float]) -> tuple[np.ndarray, float]:
        cost = math.inf
        for limit in limits:
            if limit >= POINT_ATOMS_BELOW and theta.size == n_pos:
                theta = np.append(theta, np.zeros(n_adp))  # the start's ADPs, free from here
            if np.sum(usable & (d_star_2 < limit**2)) >= MIN_REFLECTIONS_PER_PARAMETER * theta.size:
                theta, cost = fit_shell(limit, theta)
        return theta, cost

    def distinct(fits: list[tuple[np.ndarray, float]], most: int) -> list[np.ndarray]:
        """The lowest-cost fits, at most ``most``, each ``DISTINCT`` Å from those before."""
        kept: list[np.ndarray] = []
        for theta, cost in sorted(fits, key=lambda fit: fit[1]):
            if math.isfinite(cost) and all(
                np.max(_distances(moved(theta), moved(other))) >= DISTINCT for other in kept
            ):
                kept.append(theta)
            if len(kept) == most:
                break
        return kept

    def moved(theta: np.ndarray) -> Crystal:
        positions = np.zeros(pos_mask.shape)
        positions[pos_mask] = theta[:n_pos]
        return crystal.replace(fract=np.asarray(mapping.fract(jnp.asarray(positions))))

    # From the start and from random starts around it (the kinematical cost has local minima
    # a few tenths of an ångström apart): low resolution with point atoms for all, then the
    # distinct best of those (twice as many as kept) at every resolution.
    low = [limit for limit in shells if limit < POINT_ATOMS_BELOW]
    high = [limit for limit in shells if limit >= POINT_ATOMS_BELOW]
    starts = np.random.default_rng(seed).normal(0.0, START_SPREAD, (n_starts, n_pos))
    starts = np.vstack([np.zeros(n_pos), starts])
    kept = distinct([fit_shells(x, low) for x in starts], 2 * max_candidates)
    if kept:  # (none: too few low-resolution reflections for any shell; all go on as they are)
        starts = np.array(kept)
    finals = distinct([fit_shells(x, high) for x in starts], max_candidates)
    candidates = [(moved(theta), r_factor(theta)) for theta in finals]
    return candidates, r_before


def _distances(crystal: Crystal, other: Crystal) -> np.ndarray:
    """Each asymmetric-unit atom's distance from its place in ``other``, Å, (n_asu,)."""
    delta = (np.asarray(crystal.fract) - np.asarray(other.fract) + 0.5) % 1.0 - 0.5
    return np.linalg.norm(delta @ np.asarray(crystal.real_basis), axis=1)


def _with_overall_u(crystal: Crystal, u: float, opts: RefinementOptions) -> Crystal:
    """``crystal`` with every atom isotropic at ``u`` Å², but the riding H whose Uiso the
    options fix (``riding_uiso=False``): they keep the model's."""
    # The anisotropic flags stay: an anisotropic atom starts isotropic and refines its Uij.
    u_cif = Crystal.u_cif_from_iso(crystal.cell, np.full(crystal.n_asu, u))
    if opts.riding and not opts.riding_uiso and "H" in crystal.elements:
        kept = (crystal.riding_links()[0] >= 0) & ~np.asarray(crystal.anisotropic)
        u_cif = np.where(kept.reshape((-1,) + (1,) * (u_cif.ndim - 1)), crystal.u_cif, u_cif)
    return crystal.replace(u_cif=u_cif)


def _search_r(crystal: Crystal, subset: xr.Dataset, opts: RefinementOptions) -> float:
    """Mean per-frame R_obs of the refinement's thickness search on ``subset``."""
    setup = build_frame_setup(
        crystal, subset, g_max=opts.g_max, sg_max=opts.sg_max, n_sub=opts.n_sub,
        sg_weak=opts.sg_weak, bethe_terms=opts.bethe_terms,
    )  # fmt: skip
    start, stop, step = opts.thickness_grid
    grid = np.arange(start, stop + 0.5 * step, step)
    result = thickness_search(crystal, subset, grid, setup=setup, solve_dtype=jnp.complex64)
    return float(np.nanmean(result["r_obs_best"].values))


def _search_subset(dataset: xr.Dataset) -> xr.Dataset:
    """At most ``SEARCH_FRAMES`` frames spread evenly over the rotation."""
    every = max(1, math.ceil(dataset.sizes["frame"] / SEARCH_FRAMES))
    return select_frames(dataset, slice(every // 2, None, every))


def choose_overall_u(
    crystal: Crystal,
    subset: xr.Dataset,
    opts: RefinementOptions,
    tick: Callable[[], object] = lambda: None,
) -> tuple[Crystal, float, dict[float, float], float]:
    """The start's ADPs or one overall isotropic U, whichever the thickness search on the
    frames ``subset`` fits best (module docstring, part 3). Returns the crystal, U (NaN: the
    start's ADPs kept), the search's mean R by U and with the start's ADPs; ``tick`` is called
    after each search."""

    def search_r_at(u: float | None) -> float:
        value = _search_r(crystal if u is None else _with_overall_u(crystal, u, opts), subset, opts)
        tick()
        return value

    search_r = {u: search_r_at(u) for u in U_GRID}
    grid, values = np.array(U_GRID), np.array([search_r[u] for u in U_GRID])
    best = int(np.nanargmin(values))
    if 0 < best < grid.size - 1:  # the parabola's vertex through the best and its neighbours
        a, b, _ = np.polyfit(grid[best - 1 : best + 2], values[best - 1 : best + 2], 2)
        if a > 0:
            vertex = float(np.clip(-b / (2 * a), grid[best - 1], grid[best + 1]))
            search_r[vertex] = search_r_at(vertex)
    start_r = search_r_at(None)
    u = min(search_r, key=search_r.__getitem__)
    if start_r <= search_r[u]:
        return crystal, math.nan, search_r, start_r
    return _with_overall_u(crystal, u, opts), u, search_r, start_r


def joint_member_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of a joint refinement's members: no kinematical start in any of them, each
    dataset would fit a start of its own ("auto" is off there). Raises :class:`EdkitError`
    for ``kinematic_start=True``, naming what to do instead."""
    if options.get("kinematic_start") is True:
        raise EdkitError(
            "kinematic_start fits one dataset; pass the crystal of edkit.refine.kinematic."
            "kinematic_start(crystal, dataset) instead"
        )
    return {**options, "kinematic_start": False}


def far_off_r(search: xr.Dataset | None, opts: RefinementOptions) -> float | None:
    """The mean per-frame R_obs of a refinement's first thickness search where it asks for a
    kinematical start (``kinematic_start="auto"`` and above :data:`FAR_OFF_R`), else None.
    ``search``: the refinement's ``thickness_search_result`` (None: the thickness was given)."""
    if opts.kinematic_start != "auto" or search is None:
        return None
    best = np.asarray(search["r_obs_best"].values, dtype=np.float64)
    if not np.isfinite(best).any():  # no frame scored: nothing to judge by
        return None
    mean = float(np.nanmean(best))
    return mean if mean > FAR_OFF_R else None


def start_plan(opts: RefinementOptions) -> str:
    """What a refinement with these options does about the kinematical start, in words (for
    ``edkit validate``, which runs no thickness search and so cannot judge the start)."""
    if opts.kinematic_start is True:
        return "kinematical start: made before the set-up (--kinematic-start)"
    if opts.kinematic_start is False:
        return "kinematical start: none (--no-kinematic-start)"
    return (
        f"kinematical start: made if the model fits the first thickness search at a mean "
        f"per-frame R_obs above {100 * FAR_OFF_R:g} % (judged when refining)"
    )


@dataclass
class FarOffJudge:
    """``kinematic_start="auto"``'s gate, called with a refinement's first thickness search
    (:func:`edkit.refine.prepare.prepare`'s ``stop_after_search``): True where the given model
    fits it badly (:func:`far_off_r`), keeping that R in ``r_obs`` for the start's message."""

    opts: RefinementOptions
    r_obs: float = math.nan

    def __call__(self, search: xr.Dataset) -> bool:
        r_obs = far_off_r(search, self.opts)
        self.r_obs = math.nan if r_obs is None else r_obs
        return r_obs is not None


def kinematic_start(
    crystal: Crystal,
    dataset: xr.Dataset,
    opts: RefinementOptions | None = None,
    progress: bool | None = None,
    far_off_r: float = math.nan,
) -> KinematicStart:
    """A start for a dynamical refinement from a far-off model (module docstring): positions
    fitted to |F|², the minimum and an overall U (or the start's ADPs) chosen by the thickness
    search. Quartz, 99 frames: 28 s.

    Args:
      crystal: the starting structure (its cell matches the dataset's).
      dataset: from :func:`edkit.read_pets`.
      opts: the refinement's options (beams, thickness grid); default: the defaults.
      progress: a bar over the fit and the searches (None: where someone watches).
      far_off_r: what made it (``kinematic_start="auto"``): the given model's mean per-frame
        R_obs in the refinement's search; kept in the result for its description.

    Raises:
      EdkitError: a dataset without usable observations.
    """
    opts = opts or RefinementOptions()
    sigma = np.asarray(dataset["sigma"].values, dtype=np.float64)
    if not np.any(np.isfinite(dataset["I_obs"].values) & (sigma > 0)):
        source = dataset.attrs.get("source_file", "the dataset")
        raise EdkitError(f"{source}: no reflection with a finite I_obs and sigma > 0")
    total = 1 + (CANDIDATES + 1) + (len(U_GRID) + 2)  # fits, probes, U's (and a vertex), ADPs
    with progress_bar(total, "kinematical start", "search", progress) as bar:
        bar.set_postfix_str("kinematical fits")
        candidates, r_start = position_candidates(crystal, dataset)
        bar.update()
        bar.set_postfix_str("which minimum")
        subset = _search_subset(dataset)
        probes = [_with_overall_u(c, U_PROBE, opts) for c, _ in candidates]
        probe_r = []
        for probe in probes:
            probe_r.append(_search_r(probe, subset, opts))
            bar.update()
        given = _with_overall_u(crystal, U_PROBE, opts)
        given_r = _search_r(given, subset, opts) if probes else math.nan
        bar.update(1 + CANDIDATES - len(candidates))
        moved, r_kinematic = crystal, r_start
        if probe_r and min(probe_r) < (1.0 - MIN_GAIN) * given_r:
            moved, r_kinematic = candidates[int(np.argmin(probe_r))]
        bar.set_postfix_str("overall U")
        chosen, u, search_r, start_r = choose_overall_u(moved, subset, opts, bar.update)
        bar.update(max(0, total - bar.n))
    return KinematicStart(
        chosen, _distances(moved, crystal), (r_start, r_kinematic), u, search_r, start_r,
        tuple(probe_r), given_r, far_off_r,
    )  # fmt: skip
