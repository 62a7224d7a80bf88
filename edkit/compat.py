"""Opt-in emulation of the numerics of the paper's PyTorch code (diffBloch), never a default.

The shared synthetic quartz set (``quartz_synthetic.cif_pets``) was made by that code, whose
numerics no model in edkit's physics can absorb: its truth fits it at a mean per-frame R_obs of
13.4 %. :func:`diffbloch_paper` gives the inputs and the simulation that reproduce the generator
(0.90 %; Poisson floor 0.42 %). These are that code's artefacts, not physics: use them for data it
made, never for measured data. Emulated, as read in Differentiable-Electron-Crystallography/
diffBloch (``preprocess/orientation.py``, ``preprocess/coupling.py``, ``core/products.py``,
``core/scattering.py``, ``specs.py``) and checked on the synthetic set:

1. The lattice of the non-orthonormal U = UB·B⁻¹ (det 1.033 on the quartz file): reciprocal
   vectors from the inverse transpose of the rotated real cell, g = U⁻ᵀ·B·hkl = UB⁻ᵀ·G*·hkl (G* =
   BᵀB of the file's cell). The dataset gets UB′ = UB⁻ᵀ·G* and the cell′ of metric UB′ᵀUB′ (quartz:
   4.97524, 4.98032, 5.45751 Å, 89.9805°, 89.9173°, 120.0338°); UB′·B′⁻¹ is then a pure rotation,
   so edkit's polar U′ is exact and puts the lattice where the generator did.
2. Structure factors in the file's cell (volume, |g| of the form factors, U*) while the geometry
   is in cell′. A :class:`~edkit.crystal.Crystal` has one cell, so only
   :meth:`PaperNumerics.simulate` does this; edkit's own functions compute F in cell′.
3. A rocking sum over N = 42 tilts at ``linspace(−θ, θ, N)``: edkit's midpoint sub-orientations
   with semi-angle′ = θ·N/(N − 1), n_sub = N and mosaicity 0 are exactly these.
4. A width-5 moving average over the tilts, zero-padded, then summed: tilt k weighs the number of
   windows holding it (1, 2, 3, 4, 5, …, 5, 4, 3, 2, 1).
5. Beam sets per tilt segment: 12 contiguous segments (remainder first: 4,…,4,3,…,3), each
   solving the beams with |g| < 1.9 Å⁻¹ and |S_g| < 0.01 Å⁻¹ at either of its boundary tilts; a
   reflection outside a segment's set gets nothing from it. 200 kV (the file's λ is rounded).
"""

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import xarray as xr

from edkit import metrics
from edkit.constants import electron_wavelength
from edkit.crystal import Crystal, real_basis_of
from edkit.errors import EdkitError
from edkit.physics.beams import centring_translations, index_differences, reflections_within
from edkit.physics.orientation import rotation_x
from edkit.physics.rocking import LAB_BEAM
from edkit.physics.structure import structure_params, structure_tables
from edkit.schema import CELL_VARIABLES, cell_parameters
from edkit.simulate.frames import (
    CELL_MISMATCH,
    FrameSetup,
    bucket_size,
    build_frame_setup,
    check_cell,
    frame_comparison,
    thickness_nodes,
)
from edkit.simulate.stream import stream_frames

__all__ = [
    "PaperNumerics",
    "cell_from_ub",
    "diffbloch_paper",
    "moving_average_weights",
    "paper_orientation",
    "segment_boundaries",
]

PAPER_N_TILTS, PAPER_WINDOW, PAPER_SEGMENTS = 42, 5, 12  # tilts, moving average, segments
PAPER_G_MAX = 1.9  # Å⁻¹
PAPER_SG_MAX = 0.01  # Å⁻¹
PAPER_VOLTAGE_KV = 200.0
_THICKNESS = {"units": "angstrom", "long_name": "thickness"}


def cell_from_ub(ub: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """The cell (a, b, c in Å; α, β, γ in degrees) of reciprocal metric UBᵀ·UB (UB in Å⁻¹)."""
    metric = np.linalg.inv(np.asarray(ub, dtype=float).T @ np.asarray(ub, dtype=float))
    lengths = np.sqrt(np.diag(metric))
    pairs = ((1, 2), (0, 2), (0, 1))
    angles = [np.degrees(np.arccos(metric[i, j] / (lengths[i] * lengths[j]))) for i, j in pairs]
    return (*(float(x) for x in lengths), *(float(x) for x in angles))  # type: ignore[return-value]


def paper_orientation(
    ub: np.ndarray, cell: Any
) -> tuple[np.ndarray, tuple[float, float, float, float, float, float]]:
    """UB′ = UB⁻ᵀ·G* and its cell′: the lattice of the paper code's non-orthonormal U.

    That code keeps U = UB·B⁻¹ unorthonormalised and takes reciprocal vectors from the inverse
    transpose of the rotated real cell: g = U⁻ᵀ·B·hkl = UB⁻ᵀ·BᵀB·hkl. With UB′ and cell′, edkit's
    U′ = polar(UB′·B′⁻¹) is exact (UB′·B′⁻¹ is already a rotation) and g = UB′·hkl.

    Args:
      ub: the file's UB, Å⁻¹, (3, 3). cell: its (a, b, c, α, β, γ), Å and degrees.

    Returns:
      (UB′ (3, 3) in Å⁻¹, cell′).
    """
    ub = np.asarray(ub, dtype=float)
    if ub.shape != (3, 3) or not np.all(np.isfinite(ub)) or abs(np.linalg.det(ub)) < 1e-12:
        raise EdkitError(f"UB = {ub.tolist()!r}: expected a finite, non-singular (3, 3) matrix")
    b = np.linalg.inv(real_basis_of(tuple(float(x) for x in cell)))  # columns a*, b*, c*
    ub_prime = np.linalg.inv(ub).T @ (b.T @ b)
    return ub_prime, cell_from_ub(ub_prime)


def moving_average_weights(n_tilts: int, window: int) -> np.ndarray:
    """Per-tilt weights of the paper code's moving average, summing to 1, shape (n_tilts,).

    It averages ``window`` consecutive tilts, zero-pads the n − w + 1 means and sums them: tilt k
    counts once per window holding it. ``window`` 1 gives uniform weights.
    """
    counts = np.zeros(n_tilts)
    for start in range(n_tilts - window + 1):
        counts[start : start + window] += 1.0
    return counts / counts.sum()


def segment_boundaries(n_tilts: int, n_segments: int) -> np.ndarray:
    """Boundary tilts of the paper code's contiguous tilt segments, int, (≤ n_segments + 1,).

    Even sizes with the remainder front-loaded; the last boundary is the last tilt. Segment i
    covers tilts [b_i, b_{i+1}), the last one [b_{−2}, n_tilts). Needs 1 ≤ n_segments < n_tilts.
    """
    base, extra = divmod(n_tilts, n_segments)
    sizes = [base + 1] * extra + [base] * (n_segments - extra)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    bounds[-1] = n_tilts - 1
    return np.unique(bounds)


@dataclass(frozen=True, eq=False)
class PaperNumerics:
    """Inputs that reproduce the paper code's numerics (see :mod:`edkit.compat`).

    Attributes:
      dataset: the dataset with UB′, cell′, semi-angle′ = θ·N/(N − 1), mosaicity 0 and the
        voltage; observations untouched. attrs["emulation"] says so.
      crystal: the structure in cell′ (for edkit's own functions: its geometry matches the
        generator's, its F are computed in cell′).
      options: ``g_max``, ``sg_max``, ``n_sub`` for :func:`~edkit.simulate.frames.simulate_frames`,
        :func:`~edkit.simulate.frames.build_frame_setup` and :class:`~edkit.Refinement`.
      refinement_options: ``options`` plus ``sg_weak=None`` (no Bethe beams) and the moving
        average as ``tilt_weights``, for a Refinement (one beam set per frame, F in cell′).
      tilt_weights: the moving average's per-tilt weights, (N,), sum 1.
      boundaries: the tilt segments' boundary tilts (:func:`segment_boundaries`).
      source_cell: the file's cell, in which :meth:`simulate` computes structure factors.
    """

    dataset: xr.Dataset
    crystal: Crystal
    options: dict[str, Any]
    tilt_weights: np.ndarray
    boundaries: np.ndarray
    source_cell: tuple[float, ...]
    refinement_options: dict[str, Any] = field(default_factory=dict)

    def setup(self) -> FrameSetup:
        """:func:`build_frame_setup` of the transformed inputs with the moving-average weights.

        Feed it to ``simulate_frames(numerics.crystal, numerics.dataset, t, setup=...)`` or
        ``thickness_search(..., setup=...)``: the paper's tilts and averaging with edkit's beam
        sets (the union over each frame's tilts) and F in cell′ (≈2.2 % on the synthetic set).
        """
        setup = build_frame_setup(self.crystal, self.dataset, mosaicity=0.0, **self.options)
        weights = np.broadcast_to(self.tilt_weights, setup.weights.shape)
        return dataclasses.replace(setup, weights=np.ascontiguousarray(weights))

    @functools.cached_property
    def _segments(self) -> "_Segments":
        return _segment_plan(self)

    def _intensities(
        self, crystal: Crystal, thickness: np.ndarray, source_metric: bool
    ) -> np.ndarray:
        """Reflection intensities at each of every frame's thicknesses (n_f, n_t) → (n_r, n_t);
        F in the crystal's own cell (in cell′ without ``source_metric``), geometry in cell′."""
        _check_cell_near(
            crystal, self.source_cell, *(() if source_metric else (self.crystal.cell,))
        )
        plan = self._segments
        crystal = crystal if source_metric else crystal.replace(cell=self.crystal.cell)
        params, tables = (
            structure_params(crystal),
            structure_tables(crystal)._replace(
                reciprocal_basis=np.asarray(self.crystal.reciprocal_basis, dtype=np.float64)
            ),
        )
        n_seg = plan.refl_beam.shape[1]
        with jax.enable_x64(True):
            stack = stream_frames(params, tables, plan.setup, np.repeat(thickness, n_seg, axis=0))
        pseudo = plan.main.refl_frame[:, None] * n_seg + np.arange(n_seg)[None, :]
        values = stack[pseudo, :, np.maximum(plan.refl_beam, 0)]  # (n_r, n_seg, n_t)
        return np.where(plan.refl_beam[..., None] >= 0, values, 0.0).sum(axis=1)

    def simulate(
        self, crystal: Crystal, thickness: Any, *, source_metric: bool = True
    ) -> xr.Dataset:
        """Simulate every frame as the paper code did and compare with the observations.

        Per-segment beam sets, the moving average, the 42-tilt sum, lattice in cell′ and (with
        ``source_metric``) structure factors in ``crystal``'s own cell.

        Args:
          crystal: the structure in the file's cell (e.g. ``quartz_kinematical.cif`` or a
            refined model); with ``source_metric=False`` in either cell, F then in cell′.
          thickness: Å, as :func:`~edkit.simulate.frames.simulate_frames` takes it (a scalar, one
            value per frame, or a per-frame distribution).
          source_metric: structure factors in the crystal's cell (the generator); False: in cell′.

        Returns:
          :func:`~edkit.simulate.frames.simulate_frames`' Dataset (``I_calc``, ``scale``,
          ``r_obs_frame``, …); ``scored`` excludes reflections no segment solves; ``n_beams`` is
          that of :meth:`setup` (the union over all the frame's tilts).
        """
        plan = self._segments
        values, weights = thickness_nodes(thickness, plan.main.n_frames)
        i_all = self._intensities(crystal, values, source_metric)
        i_calc = np.einsum("rt,rt->r", i_all, weights[plan.main.refl_frame])
        return frame_comparison(plan.score, self.dataset, i_calc, values, weights)

    def thickness_scan(
        self, crystal: Crystal, grid: Any, *, source_metric: bool = True
    ) -> xr.Dataset:
        """Per-frame R_obs over a thickness grid (one decomposition serves every thickness).

        Args:
          crystal, source_metric: as for :meth:`simulate`.
          grid: thicknesses, Å, 1-D; memory ≈ 12 n_f × len(grid) × n beams × 8 bytes.

        Returns:
          Dataset: ``r_obs_frame`` (frame, thickness), ``thickness_best`` (Å) and ``r_obs_best``
          on frame (NaN where a frame has no observed scored reflection).
        """
        grid = np.asarray(grid, dtype=float)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid) & (grid >= 0)):
            raise EdkitError(f"grid: expected a 1-D array of thicknesses ≥ 0 Å, got {grid!r}")
        plan = self._segments
        n_f = plan.main.n_frames
        i_all = self._intensities(crystal, np.broadcast_to(grid, (n_f, grid.size)), source_metric)
        s = plan.score.scored
        i_obs, sigma = self.dataset["I_obs"].values[s], self.dataset["sigma"].values[s]
        frames = plan.score.refl_frame[s]
        r = np.stack(
            [metrics.frame_r_obs(i_obs, sigma, i_all[s, t], frames, n_f) for t in range(grid.size)],
            axis=1,
        )
        has = np.any(np.isfinite(r), axis=1)
        best = np.where(has, np.argmin(np.where(np.isfinite(r), r, np.inf), axis=1), 0)
        r_best = np.where(has, r[np.arange(n_f), best], np.nan)
        per_frame = {"units": "1", "long_name": "per-frame R_obs (diffBloch convention)"}
        return xr.Dataset(
            {
                "r_obs_frame": (("frame", "thickness"), r, per_frame),
                "thickness_best": ("frame", np.where(has, grid[best], np.nan), _THICKNESS),
                "r_obs_best": ("frame", r_best, per_frame),
            },
            coords={"frame": plan.main.frame, "thickness": ("thickness", grid, _THICKNESS)},
        )


@dataclass(frozen=True, eq=False)
class _Segments:
    """The per-segment beam sets as one FrameSetup of n_f·n_seg pseudo-frames, and the lookups.

    main: the transformed inputs' set-up (tilts, rotations, reflections). setup: pseudo-frame
    f·n_seg + i solves segment i of frame f (its tilts, weights, beams). score: ``main`` with
    ``scored`` limited to reflections some segment solves. refl_beam: each reflection's position
    in each of its frame's segments, −1 when absent, (n_r, n_seg).
    """

    main: FrameSetup
    setup: FrameSetup
    score: FrameSetup
    refl_beam: np.ndarray


def _segment_plan(numerics: PaperNumerics) -> _Segments:
    """Beam sets per tilt segment: |S_g| < sg_max and |g| < g_max at either boundary tilt."""
    main = build_frame_setup(numerics.crystal, numerics.dataset, mosaicity=0.0, **numerics.options)
    crystal, k_mag = numerics.crystal, main.wave_number
    g_max, sg_max = numerics.options["g_max"], numerics.options["sg_max"]
    reciprocal = np.asarray(crystal.reciprocal_basis)
    pool = reflections_within(
        reciprocal, g_max, centring_translations(crystal.rotations, crystal.translations)
    )
    g = pool @ reciprocal
    inside = np.einsum("ij,ij->i", g, g) < g_max**2  # strict, as the paper code (000 first)
    pool, g = pool[inside], g[inside]
    g_half_squared = np.einsum("ij,ij->i", g, g) / (2.0 * k_mag)
    bounds = numerics.boundaries
    n_tilts = main.angles.shape[1]
    covers = [np.arange(a, b) for a, b in itertools.pairwise(bounds)]
    covers[-1] = np.arange(bounds[-2], n_tilts)  # the last segment holds the last tilt
    width = max(len(c) for c in covers)
    beams, angles, weights = [], [], []
    for rotation, frame_angles in zip(main.rotations, main.angles, strict=True):
        excited = {}
        for b in bounds:
            k_hat = (rotation_x(frame_angles[b], xp=np) @ rotation).T @ LAB_BEAM
            excited[b] = np.abs(-(g @ k_hat) - g_half_squared) < sg_max
        for i, cover in enumerate(covers):
            keep = excited[bounds[i]] | excited[bounds[i + 1]]
            keep[0] = True  # 000
            beams.append(pool[keep])
            pad = width - len(cover)
            angles.append(np.pad(frame_angles[cover], (0, pad), mode="edge"))
            weights.append(np.pad(numerics.tilt_weights[cover], (0, pad)))  # padding weighs 0
    sizes = np.array([bucket_size(len(b)) for b in beams])
    n = int(sizes.max())
    hkl = np.zeros((len(beams), n, 3), dtype=np.int64)
    valid = np.zeros((len(beams), n), dtype=bool)
    coupling = np.full((len(beams), n, n), -1, dtype=np.int32)
    zero, zero_index = np.zeros((1, 3), dtype=np.int64), np.zeros((1, 1), dtype=np.int32)
    for p, b in enumerate(beams):
        hkl[p, : len(b)], valid[p, : len(b)] = b, True
    differences, _ = index_differences(
        [(zero, zero)] + [(b, b) for b in beams],
        [zero_index] + [coupling[p, : len(b), : len(b)] for p, b in enumerate(beams)],
    )
    np.copyto(coupling, zero_index[0, 0], where=coupling < 0)  # padding points at 000
    n_seg = len(covers)
    none = np.zeros(0, dtype=np.int64)  # pseudo-frames carry no reflections of their own
    setup = FrameSetup(
        frame=np.arange(len(beams)), rotations=np.repeat(main.rotations, n_seg, axis=0),
        angles=np.stack(angles), weights=np.stack(weights), hkl=hkl, valid=valid,
        differences=differences, coupling=coupling, refl_frame=none, refl_beam=none,
        excitation_error=np.zeros(0), scored=none.astype(bool), voltage=main.voltage,
        wave_number=k_mag, settings=dict(main.settings),
        buckets=tuple(np.flatnonzero(sizes == s) for s in np.unique(sizes)),
        bucket_sizes=tuple(int(s) for s in np.unique(sizes)),
    )  # fmt: skip
    refl_hkl = np.stack([numerics.dataset[n].values for n in ("h", "k", "l")], axis=1).tolist()
    lookup = [{tuple(row): j for j, row in enumerate(b.tolist())} for b in beams]
    refl_beam = np.array(
        [
            [lookup[f * n_seg + i].get(tuple(h), -1) for i in range(n_seg)]
            for f, h in zip(main.refl_frame, refl_hkl, strict=True)
        ],
        dtype=np.int64,
    ).reshape(-1, n_seg)
    score = dataclasses.replace(main, scored=main.scored & np.any(refl_beam >= 0, axis=1))
    return _Segments(main, setup, score, refl_beam)


def _check_cell_near(crystal: Crystal, *cells: tuple[float, ...]) -> None:
    """Raise EdkitError unless ``crystal.cell`` is within 1 % of one of ``cells``."""
    for cell in cells:
        relative = np.abs(np.asarray(crystal.cell) - cell) / np.abs(np.asarray(cell))
        if np.all(relative <= CELL_MISMATCH):
            return
    raise EdkitError(
        f"the structure ({crystal.source or 'crystal'}) has cell {crystal.cell}; expected one "
        f"within {100 * CELL_MISMATCH:g} % of the file's {tuple(round(x, 5) for x in cells[0])} "
        "(F are computed in it; with source_metric=False, cell′ is accepted too)"
    )


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high], else EdkitError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EdkitError(f"{name} = {value!r}: expected an integer")
    if not low <= value <= high:
        raise EdkitError(f"{name} = {value!r}: expected an integer ≥ {low} and ≤ {high}")
    return int(value)


def diffbloch_paper(
    dataset: xr.Dataset,
    crystal: Crystal,
    *,
    n_tilts: int = PAPER_N_TILTS,
    window: int = PAPER_WINDOW,
    segments: int = PAPER_SEGMENTS,
    voltage: float = PAPER_VOLTAGE_KV,
    g_max: float = PAPER_G_MAX,
    sg_max: float = PAPER_SG_MAX,
    non_orthonormal: bool = True,
) -> PaperNumerics:
    """Emulate the paper code's numerics for ``dataset`` and ``crystal`` (opt-in, never default).

    See :mod:`edkit.compat` for what is emulated and what it is for: data made by that code.

    Args:
      dataset: from :func:`edkit.read_pets` (UB, cell, goniometer angles, semi-angles).
      crystal: the structure in the file's cell (within 1 %).
      n_tilts: tilts N of the rocking sum, at ``linspace(−θ, θ, N)``; ≥ 2.
      window: width of the moving average over the tilts, 1 ≤ window ≤ n_tilts (1: none).
      segments: tilt segments with their own beam sets, 1 ≤ segments < n_tilts.
      voltage: accelerating voltage, kV (the dataset's wavelength is replaced to match).
      g_max: the beams' |g| < g_max, Å⁻¹ (in cell′).
      sg_max: a segment solves beams with |S_g| < sg_max at either boundary tilt, Å⁻¹.
      non_orthonormal: the lattice of the non-orthonormal U (UB′, cell′); False keeps UB and the
        cell (only for measuring what that part does).

    Returns:
      :class:`PaperNumerics`: ``dataset``, ``crystal``, ``options`` for edkit's own functions and
      :meth:`~PaperNumerics.simulate` / :meth:`~PaperNumerics.thickness_scan` for the exact
      emulation.

    Raises:
      EdkitError: a bad argument, a dataset without UB / cell / semi-angles, a singular UB, or a
        crystal whose cell is more than 1 % from the dataset's.
    """
    n_tilts = _integer("n_tilts", n_tilts, 2, 10_000)
    window = _integer("window", window, 1, n_tilts)
    segments = _integer("segments", segments, 1, n_tilts - 1)
    for name, value in (("voltage", voltage), ("g_max", g_max), ("sg_max", sg_max)):
        if isinstance(value, bool) or not (
            isinstance(value, (int, float, np.floating)) and np.isfinite(value) and value > 0
        ):
            raise EdkitError(f"{name} = {value!r}: expected a positive number")
    missing = [n for n in ("UB", "semiangle", "I_obs", *CELL_VARIABLES) if n not in dataset]
    if missing:
        raise EdkitError(f"the dataset lacks {missing}: expected one from edkit.read_pets")
    check_cell(crystal, dataset)
    semiangle = dataset["semiangle"]
    if not np.all(np.isfinite(semiangle.values) & (semiangle.values > 0)):
        raise EdkitError("the dataset's semi-angles must be finite and > 0 degrees")
    source_cell = tuple(float(x) for x in cell_parameters(dataset))
    out = dataset.copy()
    cell = source_cell
    if non_orthonormal:
        ub, cell = paper_orientation(dataset["UB"].values, source_cell)
        out["UB"] = (dataset["UB"].dims, ub, dataset["UB"].attrs)
        for name, value in zip(CELL_VARIABLES, cell, strict=True):
            out[name] = ((), value, dataset[name].attrs)
    widened = semiangle * (n_tilts / (n_tilts - 1))  # midpoints of N slices = linspace(−θ, θ, N)
    widened.attrs = dict(semiangle.attrs)
    out["semiangle"] = widened
    out["mosaicity"] = ((), 0.0, {"units": "degree", "long_name": "mosaicity"})
    volts = float(voltage) * 1000.0
    for name, value in (("voltage", volts), ("wavelength", electron_wavelength(volts))):
        out[name] = ((), value, dataset[name].attrs if name in dataset else {})
    out.attrs["emulation"] = (
        f"edkit.compat.diffbloch_paper: the paper code's numerics (lattice of the non-orthonormal "
        f"U: {non_orthonormal}; {n_tilts} tilts at linspace(-θ, θ); moving average {window}; "
        f"{segments} tilt segments; |g| < {g_max:g} Å⁻¹; |S_g| < {sg_max:g} Å⁻¹; {voltage:g} kV), "
        "not edkit's physics"
    )
    options = {"g_max": float(g_max), "sg_max": float(sg_max), "n_sub": n_tilts}
    weights = moving_average_weights(n_tilts, window)
    return PaperNumerics(
        dataset=out,
        crystal=crystal.replace(cell=cell),
        options=options,
        tilt_weights=weights,
        boundaries=segment_boundaries(n_tilts, segments),
        source_cell=source_cell,
        refinement_options={**options, "sg_weak": None, "tilt_weights": tuple(weights.tolist())},
    )
