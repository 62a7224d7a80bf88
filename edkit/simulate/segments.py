"""Segments: a frame's sub-orientations in contiguous runs, each solved with its own beams.

A frame's beam list is the union over its whole rotation: at g = 2 Å⁻¹ a 3° frame sweeps the
excitation error over 0.1 Å⁻¹, twenty times the ±0.005 Å⁻¹ a beam needs to be solved exactly, so
most of a large frame's beams are far from the Ewald sphere at any one sub-orientation. With
``segments`` = S, the n_sub sub-orientations are split into S runs of n_sub/S; each run solves
only the beams whose smallest |S_g| *over the run* is within ``sg_max`` (its Bethe beams
likewise over the run), and its rocking-curve sum is added into the frame's beam list. The
eigendecompositions shrink from the frame's n to the run's m beams (cost ∝ m³): on a
CsPbBr₃-sized frame (g_max 2.3 Å⁻¹, θ = 1.47°) six runs solve 379 instead of 936 beams at
sg_max = 0.01 Å⁻¹ (``benchmarks/large.py``; accuracy in the README).

A frame beam outside a run's exact set counts zero in that run, or with ``tails`` gets its
first-order tail there: its amplitude driven by the run's Bloch waves (:mod:`edkit.physics.tails`),
an (n_o × m) product per sub-orientation (not with absorption). First order fails where an exact
beam drives a left-out one near resonance (strong coupling, equal excitation errors), so with
tails such beams join the run's exact set (:data:`RESONANCE`). A Bethe beam
is folded into the others' coupling, not simulated. The frame's exact set is the union of its
runs' sets, so the frame's observed reflections keep their places.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import jax
import numpy as np

from edkit.constants import potential_prefactor
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables


@dataclass(frozen=True, eq=False)
class SegmentTables:
    """Per frame and run, the run's beams (n_f frames, S runs, m beams, m_w weak beams, padded).

    Attributes:
      beam: position of each of the run's beams in the frame's beam list (``setup.hkl``), int32,
        (n_f, S, m); padding rows point at 0 (000) and are masked by ``valid``.
      valid: real (not padding) beams, bool, (n_f, S, m).
      coupling: index into ``setup.differences`` of h_j − h_i, int32, (n_f, S, m, m).
      weak_hkl, weak_valid: the run's Bethe beams, (n_f, S, m_w, 3) and (n_f, S, m_w), or None.
      coupling_out, coupling_in: indices of h_w − h_i (n_f, S, m, m_w) and h_j − h_w
        (n_f, S, m_w, m), or None.
      sizes, weak_sizes: padded m and m_w of each bucket of frames (as ``setup.buckets``).
      tail, tail_valid: the frame beams outside each run's exact set (positions in
        ``setup.hkl``, padding 0 and False), int32 and bool, (n_f, S, n_o), or None without tails.
      tail_sizes: padded n_o of each bucket, () without tails.
    """

    beam: np.ndarray
    valid: np.ndarray
    coupling: np.ndarray
    weak_hkl: np.ndarray | None
    weak_valid: np.ndarray | None
    coupling_out: np.ndarray | None
    coupling_in: np.ndarray | None
    sizes: tuple[int, ...]
    weak_sizes: tuple[int, ...]
    tail: np.ndarray | None = None
    tail_valid: np.ndarray | None = None
    tail_sizes: tuple[int, ...] = ()

    @property
    def n_beams(self) -> np.ndarray:
        """Real beams of each frame's runs, (n_f, S)."""
        return self.valid.sum(axis=2)


def check_segments(segments: object, n_sub: int, n_sub_given: bool) -> int:
    """The sub-orientation count to use with ``segments`` runs (a multiple of it).

    Raises EdkitError when ``segments`` is not a positive integer, or when an ``n_sub`` the user
    gave is not a multiple of it (a default n_sub is rounded up instead)."""
    if not (isinstance(segments, int | np.integer) and not isinstance(segments, bool)) or (
        segments < 1
    ):
        raise EdkitError(f"segments = {segments!r}: expected a positive integer")
    if n_sub % segments == 0:
        return n_sub
    if n_sub_given:
        raise EdkitError(
            f"segments = {segments} does not divide n_sub = {n_sub}: every run must hold the "
            f"same number of sub-orientations (use n_sub = {-(-n_sub // segments) * segments})"
        )
    return -(-n_sub // segments) * segments


#: A frame beam left out of a run joins the run's exact beams when an exact beam drives it near
#: resonance: |U(h_i − h_w)| / (2K |S_w − S_i|) at least this at some sub-orientation of the run
#: (the two beams' mixing ratio; first-order tails grow without bound at resonance).
RESONANCE = 0.2


@dataclass(frozen=True)
class CouplingStrength:
    """|U(h)| / 2K over a box of Miller indices (Å⁻¹): how strongly two beams h apart couple,
    in excitation-error units. ``values[h - lower]``; ``lower`` int (3,)."""

    lower: np.ndarray
    values: np.ndarray

    def __call__(self, hkl: np.ndarray) -> np.ndarray:
        """|U|/2K at integer hkl (..., 3) inside the box, Å⁻¹."""
        index = hkl - self.lower
        return self.values[index[..., 0], index[..., 1], index[..., 2]]


def _promote_resonant(
    exact: np.ndarray,
    keep: np.ndarray,
    excitation: np.ndarray,
    candidates: np.ndarray,
    strength: CouplingStrength,
) -> np.ndarray:
    """``exact`` (bool over candidates) with the resonant frame beams of the run added (each
    pass may make more resonant, at most four passes). ``excitation``: S over the run (n_c, L)."""
    exact = exact.copy()
    for _ in range(4):
        inside, outside = np.nonzero(exact & keep)[0], np.nonzero(~exact & keep)[0]
        if len(outside) == 0:
            break
        coupling = strength(candidates[inside][None, :, :] - candidates[outside][:, None, :])
        gap = np.full(coupling.shape, np.inf)
        for k in range(excitation.shape[1]):
            s = excitation[:, k]
            np.minimum(gap, np.abs(s[outside][:, None] - s[inside][None, :]), out=gap)
        ratio = coupling / np.maximum(gap, 1e-12)
        resonant = outside[ratio.max(axis=1) >= RESONANCE]
        if len(resonant) == 0:
            break
        exact[resonant] = True
    return exact


def run_selection(
    excitation: np.ndarray,
    keep: np.ndarray,
    segments: int,
    sg_max: float,
    sg_weak: float | None,
    candidates: np.ndarray | None = None,
    strength: CouplingStrength | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Each run's exact beams (as positions in the frame's list) and Bethe beams (candidates).

    Args:
      excitation: S_g of every candidate at every sub-orientation, Å⁻¹, (n_c, n_sub).
      keep: the frame's exact beams among the candidates (candidate 0 is 000), bool, (n_c,).
      segments: runs S (n_sub a multiple of it).
      sg_max, sg_weak: as in ``build_frame_setup``, applied over each run.
      candidates, strength: the candidates' hkl (n_c, 3) and their couplings: with both, a
        frame beam an exact beam drives near resonance (:data:`RESONANCE`) joins the run's
        exact beams (for tails); None: |S| alone decides.

    Returns:
      (positions, weak): S int arrays of positions in the frame list ``candidates[keep]``
      (000 first); S int arrays of candidate indices of the run's Bethe beams, or None.
    """
    n_candidates = excitation.shape[0]
    by_run = excitation.reshape(n_candidates, segments, -1)
    closest = np.abs(by_run).min(axis=2)
    position = np.cumsum(keep) - 1
    positions, weak = [], []
    for run in range(segments):
        exact = closest[:, run] <= sg_max
        exact[0] = True
        if strength is not None and candidates is not None:
            exact = _promote_resonant(exact, keep, by_run[:, run], candidates, strength)
        positions.append(position[np.nonzero(exact & keep)[0]])
        if sg_weak is not None:
            weak.append(np.nonzero(~exact & (closest[:, run] <= sg_weak))[0])
    return positions, (weak if sg_weak is not None else None)


def allocate_tables(
    frame_beams: list[np.ndarray],
    run_positions: list[list[np.ndarray]],
    run_weak: list[list[np.ndarray]] | None,
    bucket_frames: tuple[np.ndarray, ...],
    bucket_size: Callable[[int], int],
) -> tuple[SegmentTables, list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """Padded run tables and the (h_from, h_to) pairs whose difference indices fill them.

    The coupling arrays hold −1 until :func:`edkit.physics.beams.index_differences` writes into
    the returned views (``out``, one per pair) and the caller replaces what is left by the
    index of 000 (padding).

    Args:
      frame_beams: each frame's exact beams (hkl, (n, 3)).
      run_positions: per frame, per run, positions into that frame's beams.
      run_weak: per frame, per run, the run's Bethe beams as hkl (m_w, 3), or None.
      bucket_frames: frame positions of each bucket (``setup.buckets``).
      bucket_size: the padding rule, int → int (``setup.bucket_size``).
    """
    n_f, segments = len(frame_beams), len(run_positions[0])
    size = bucket_size(max(len(p) for runs in run_positions for p in runs))
    beam = np.zeros((n_f, segments, size), np.int32)
    valid = np.zeros((n_f, segments, size), bool)
    coupling = np.full((n_f, segments, size, size), -1, np.int32)
    weak_hkl = weak_valid = coupling_out = coupling_in = None
    weak_size = 0
    if run_weak is not None:
        weak_size = bucket_size(max(1, max(len(w) for runs in run_weak for w in runs)))
        weak_hkl = np.zeros((n_f, segments, weak_size, 3), np.int64)
        weak_valid = np.zeros((n_f, segments, weak_size), bool)
        coupling_out = np.full((n_f, segments, size, weak_size), -1, np.int32)
        coupling_in = np.full((n_f, segments, weak_size, size), -1, np.int32)
    pairs, out = [], []
    for f, runs in enumerate(run_positions):
        for r, positions in enumerate(runs):
            m = len(positions)
            beam[f, r, :m], valid[f, r, :m] = positions, True
            hkl = frame_beams[f][positions]
            pairs.append((hkl, hkl))
            out.append(coupling[f, r, :m, :m])
            if run_weak is not None:
                assert weak_hkl is not None and weak_valid is not None
                assert coupling_out is not None and coupling_in is not None
                weak = run_weak[f][r]
                m_w = len(weak)
                weak_hkl[f, r, :m_w], weak_valid[f, r, :m_w] = weak, True
                pairs += [(hkl, weak), (weak, hkl)]
                out += [coupling_out[f, r, :m, :m_w], coupling_in[f, r, :m_w, :m]]
    n_runs = valid.sum(axis=2)
    sizes = tuple(bucket_size(int(n_runs[frames].max())) for frames in bucket_frames)
    weak_sizes: tuple[int, ...] = ()
    if weak_valid is not None:
        n_weak = weak_valid.sum(axis=2)
        weak_sizes = tuple(
            bucket_size(max(1, int(n_weak[frames].max()))) for frames in bucket_frames
        )
    tables = SegmentTables(
        beam, valid, coupling, weak_hkl, weak_valid, coupling_out, coupling_in, sizes, weak_sizes
    )
    return tables, pairs, out


def with_tails(
    tables: SegmentTables,
    n_frame_beams: np.ndarray,
    bucket_frames: tuple[np.ndarray, ...],
    bucket_size: Callable[[int], int],
) -> SegmentTables:
    """``tables`` with each run's tail beams: the frame's beams outside the run's exact set.

    Args:
      tables: from :func:`allocate_tables`.
      n_frame_beams: real beams of each frame, (n_f,).
      bucket_frames, bucket_size: as in :func:`allocate_tables`.
    """
    n_f, segments, _ = tables.beam.shape
    n_tail = n_frame_beams[:, None] - tables.n_beams  # (n_f, S)
    size = bucket_size(max(1, int(n_tail.max())))
    tail = np.zeros((n_f, segments, size), np.int32)
    tail_valid = np.zeros((n_f, segments, size), bool)
    for f in range(n_f):
        for r in range(segments):
            outside = np.ones(n_frame_beams[f], bool)
            outside[tables.beam[f, r][tables.valid[f, r]]] = False
            positions = np.nonzero(outside)[0]
            tail[f, r, : len(positions)], tail_valid[f, r, : len(positions)] = positions, True
    tail_sizes = tuple(bucket_size(max(1, int(n_tail[frames].max()))) for frames in bucket_frames)
    return replace(tables, tail=tail, tail_valid=tail_valid, tail_sizes=tail_sizes)


def coupling_strength(
    crystal: Crystal, candidates: np.ndarray, voltage: float, k_mag: float
) -> CouplingStrength:
    """|U(h)|/2K (Å⁻¹) of the crystal for every difference of two candidates (the box they span),
    from its structure factors as read: what decides resonances between beams in set-up."""
    lower, upper = candidates.min(axis=0), candidates.max(axis=0)
    low, span = lower - upper, 2 * (upper - lower) + 1
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in span), indexing="ij"), -1).reshape(-1, 3)
    grid = grid + low
    values = np.empty(len(grid))
    with jax.enable_x64(True):
        params, tables = structure_params(crystal), structure_tables(crystal)
        for start in range(0, len(grid), 65536):
            chunk = grid[start : start + 65536]
            values[start : start + len(chunk)] = np.abs(
                np.asarray(structure_factors_of(params, tables, chunk))
            )
    values *= potential_prefactor(voltage) / (2.0 * k_mag)
    values[np.all(grid == 0, axis=1)] = 0.0  # U₀ sits in K, it couples nothing
    return CouplingStrength(low, values.reshape(tuple(span)))
