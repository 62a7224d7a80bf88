"""Frame set-up: the static bookkeeping of simulating every frame of a 3D-ED dataset (numpy).

``FrameSetup`` holds, per frame, the sub-orientations, the beams (the union over the frame's
sub-orientations, padded with inert beams to a bucket size so few compiled functions serve all
frames), the coupling indices into one shared list of hkl differences, and where each observed
reflection sits in its frame's beam list; :func:`klar_selection` chooses the scored reflections.
"""

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import xarray as xr

from edkit.constants import electron_wavelength
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.physics.beams import (
    DEFAULT_G_MAX,
    centring_translations,
    excitation_errors_np,
    index_differences,
    reflections_within,
)
from edkit.physics.geometry import frame_orientations
from edkit.physics.orientation import rotation_x
from edkit.physics.rocking import LAB_BEAM, sub_orientation_angles, sub_orientation_weights
from edkit.physics.structure import centric_at_origin, structure_params, structure_tables
from edkit.schema import cell_parameters
from edkit.simulate.pattern import mean_inner_potential
from edkit.simulate.segments import (
    SegmentTables,
    allocate_tables,
    check_segments,
    coupling_strength,
    run_selection,
    with_tails,
)

DEFAULT_SG_MAX = 0.015  # Å⁻¹
DEFAULT_SUB_STEP = 0.05  # degrees between sub-orientations
#: Klar et al. 2023 selection: |S_g|/ΔS < rsg and ΔS − |S_g| > dsg (science.md §5).
DEFAULT_RSG = 0.8
DEFAULT_DSG = 0.0015  # Å⁻¹
CELL_MISMATCH = 0.01  # relative; beyond it a structure does not belong to the dataset


@dataclass(frozen=True, eq=False)
class FrameSetup:
    """Static data for simulating the frames of one dataset with one crystal.

    Attributes (n_f frames, n_s sub-orientations, n beams after padding, n_r reflections):
      frame: PETS frame ids, (n_f,).
      rotations: O_i, lab ← crystal-Cartesian, (n_f, 3, 3).
      angles: sub-orientation offsets about lab x, radians, (n_f, n_s).
      weights: sub-orientation weights (sum 1 per frame), (n_f, n_s).
      hkl: beams of each frame, int, (n_f, n, 3), 000 first; padding rows are 000.
      valid: real (not padding) beams, bool, (n_f, n).
      differences: every distinct h_j − h_i over all frames, int, (m, 3).
      coupling: index into ``differences`` of h_j − h_i per frame, int32, (n_f, n, n).
      refl_frame: frame position (0-based) of each reflection, (n_r,).
      refl_beam: position in its frame's beams, −1 when not simulated (|g| > g_max), (n_r,).
      excitation_error: S_g at the frame centre, Å⁻¹, (n_r,).
      scored: Klar selection and simulated, bool, (n_r,).
      voltage: V. wave_number: |K| of the reference structure, Å⁻¹. settings: a dict of the
      choices (g_max, sg_max, sg_weak, bethe_terms, n_sub, rsg, dsg, mosaicity in degrees) and
      "centric": the crystal has the inversion through the origin (real structure factors).
      buckets: frame positions grouped by padded beam count, one int array per bucket; frames of
        a bucket are solved at that bucket's size (``bucket_sizes``), not at n.
      weak_hkl, weak_valid: beams folded in as Bethe potentials (``sg_weak``), (n_f, n_w, 3)
        and (n_f, n_w); None without them. ``weak_sizes``: padded n_w of each bucket.
      coupling_out, coupling_in: indices into ``differences`` of h_w − h_i, (n_f, n, n_w), and
        of h_j − h_w, (n_f, n_w, n).
      segments: with ``settings["segments"]`` > 1, each run of a frame's sub-orientations
        solved with its own beams (:mod:`edkit.simulate.segments`); None: the frame's beams.
      refl_g_lab: each reflection's g in the lab frame at its frame's centre (O_f B hkl),
        Å⁻¹, (n_r, 3): (x, y) is its place in the detector plane, z ≈ 0 in diffraction.
    """

    frame: np.ndarray
    rotations: np.ndarray
    angles: np.ndarray
    weights: np.ndarray
    hkl: np.ndarray
    valid: np.ndarray
    differences: np.ndarray
    coupling: np.ndarray
    refl_frame: np.ndarray
    refl_beam: np.ndarray
    excitation_error: np.ndarray
    scored: np.ndarray
    voltage: float
    wave_number: float
    settings: dict[str, Any]
    buckets: tuple[np.ndarray, ...] = ()
    bucket_sizes: tuple[int, ...] = ()
    weak_hkl: np.ndarray | None = None
    weak_valid: np.ndarray | None = None
    coupling_out: np.ndarray | None = None
    coupling_in: np.ndarray | None = None
    weak_sizes: tuple[int, ...] = ()
    segments: SegmentTables | None = None
    refl_g_lab: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.frame.shape[0])

    @property
    def n_beams(self) -> np.ndarray:
        """Real beams per frame (solved exactly), (n_f,)."""
        return self.valid.sum(axis=1)

    @property
    def n_weak(self) -> np.ndarray:
        """Weak beams per frame (Bethe potentials), (n_f,)."""
        if self.weak_valid is None:
            return np.zeros(self.n_frames, dtype=int)
        return self.weak_valid.sum(axis=1)


def bucket_size(n_beams: int) -> int:
    """Padded size for a frame of ``n_beams`` beams: multiples of 8 up to 64, of 16 up to 256,
    then of 32 — few compiled shapes, at most ~25 % extra work per solve."""
    quantum = 8 if n_beams <= 64 else 16 if n_beams <= 256 else 32
    return int(-(-n_beams // quantum) * quantum)


def check_cell(crystal: Crystal, dataset: xr.Dataset) -> None:
    """Raise EdkitError when the crystal's cell differs from the dataset's by more than 1 %."""
    cell_data = cell_parameters(dataset)
    cell_crystal = np.asarray(crystal.cell, dtype=float)
    relative = np.abs(cell_crystal - cell_data) / np.abs(cell_data)
    if np.any(relative > CELL_MISMATCH):
        names = ["a", "b", "c", "alpha", "beta", "gamma"]
        worst = int(np.argmax(relative))
        raise EdkitError(
            f"the structure ({crystal.source or 'crystal'}) does not match the dataset "
            f"({dataset.attrs.get('source_file', 'dataset')}): cell {names[worst]} = "
            f"{cell_crystal[worst]:g} vs {cell_data[worst]:g} "
            f"({100 * relative[worst]:.1f} % apart; at most {100 * CELL_MISMATCH:g} % allowed)"
        )


def build_frame_setup(
    crystal: Crystal,
    dataset: xr.Dataset,
    *,
    g_max: float = DEFAULT_G_MAX,
    sg_max: float = DEFAULT_SG_MAX,
    n_sub: int | None = None,
    mosaicity: float | None = None,
    rsg: float = DEFAULT_RSG,
    dsg: float = DEFAULT_DSG,
    pad_to: int | None = None,
    sg_weak: float | None = None,
    bethe_terms: int | None = None,
    prune_centring: bool = True,
    segments: int = 1,
    tails: bool = False,
) -> FrameSetup:
    """Plan the simulation of every frame of ``dataset`` (see :class:`FrameSetup`).

    Args:
      crystal: the structure; its cell must match the dataset's within 1 %.
      dataset: from :func:`edkit.read_pets`.
      g_max: largest |g| of a beam, Å⁻¹.
      sg_max: a beam is kept when some sub-orientation of the frame has |S_g| ≤ sg_max, Å⁻¹.
      n_sub: sub-orientations per frame; default one every 0.05° over the widest frame.
      mosaicity: Gaussian mosaic spread, degrees; default the dataset's ``mosaicity`` (0 if
        absent). 0 disables it.
      rsg, dsg: Klar selection parameters (science.md §5).
      pad_to: pad beam lists to at least this size (to share compiled code across datasets).
      sg_weak: Bethe potentials: beams whose smallest |S_g| over the frame lies in
        (sg_max, sg_weak] are not solved but folded into the strong beams' coupling to second
        order (:func:`edkit.physics.bloch.bethe_correction`), Å⁻¹; None: no weak beams.
      bethe_terms: build the Bethe correction from this many Chebyshev terms in the rotation
        angle, shared by the frame's sub-orientations (``frame_intensities``' ``bethe_terms``);
        None: exactly at every sub-orientation.
      prune_centring: leave the reflections the lattice centring forbids (I, F, A/B/C, R) out of
        the strong and weak beams: they couple to no allowed beam, so no intensity changes, only
        the cost (observed reflections at such positions are then not simulated: refl_beam −1).
        Screw and glide absences always stay (double diffraction excites them).
      segments: split each frame's sub-orientations into this many equal runs, each solving
        only the beams within ``sg_max`` (and Bethe beams within ``sg_weak``) over the run
        (:mod:`edkit.simulate.segments`); 1: every sub-orientation solves the frame's beams.
        A default ``n_sub`` is rounded up to a multiple of it.
      tails: with ``segments`` > 1, give each frame beam outside a run's exact set its
        first-order tail there (:mod:`edkit.physics.tails`; not with absorption), the beams an
        exact one drives near resonance joining the run (:data:`~.segments.RESONANCE`); False:
        such a beam counts zero in that run.
    """
    check_cell(crystal, dataset)
    for name, value in (("g_max", g_max), ("sg_max", sg_max), ("rsg", rsg), ("dsg", dsg)):
        if not (np.isfinite(value) and value > 0):
            raise EdkitError(f"{name} = {value!r}: expected a positive number")
    if sg_weak is not None and not (np.isfinite(sg_weak) and sg_weak > sg_max):
        raise EdkitError(f"sg_weak = {sg_weak!r}: expected None or a number above sg_max")
    if bethe_terms is not None and not (isinstance(bethe_terms, int) and bethe_terms >= 1):
        raise EdkitError(f"bethe_terms = {bethe_terms!r}: expected None or a positive integer")
    deg = np.pi / 180.0
    semiangles = dataset["semiangle"].values * deg
    if mosaicity is None:
        mosaicity = float(dataset["mosaicity"]) if "mosaicity" in dataset else 0.0
    n_sub_given = n_sub is not None
    if n_sub is None:
        n_sub = int(np.ceil(2 * (semiangles.max() / deg + 2.5 * mosaicity) / DEFAULT_SUB_STEP)) + 1
    if n_sub < 1:
        raise EdkitError(f"n_sub = {n_sub!r}: expected at least 1 sub-orientation per frame")
    n_sub = check_segments(segments, n_sub, n_sub_given)
    voltage = float(dataset["voltage"])
    with jax.enable_x64(True):
        u0 = float(
            mean_inner_potential(structure_params(crystal), structure_tables(crystal), voltage)
        )
    k_mag = float(np.sqrt(1.0 / electron_wavelength(voltage) ** 2 + u0))
    rotations = frame_orientations(dataset).values
    reciprocal = np.asarray(crystal.reciprocal_basis)

    angles = np.stack([sub_orientation_angles(t, n_sub, mosaicity * deg) for t in semiangles])
    weights = np.stack(
        [
            sub_orientation_weights(a, t, mosaicity * deg)
            for a, t in zip(angles, semiangles, strict=True)
        ]
    )
    centring = None
    if prune_centring:
        centring = centring_translations(crystal.rotations, crystal.translations)
    candidates = reflections_within(reciprocal, g_max, centring)
    g_candidates = candidates @ reciprocal
    g_half_squared = np.einsum("ij,ij->i", g_candidates, g_candidates) / (2.0 * k_mag)
    strength = None
    if segments > 1 and tails:
        strength = coupling_strength(crystal, candidates, voltage, k_mag)
    frame_beams, frame_weak = [], []
    run_positions: list[list[np.ndarray]] = []
    run_weak: list[list[np.ndarray]] = []
    for rotation, frame_angles in zip(rotations, angles, strict=True):
        k_hats = np.stack(
            [(rotation_x(phi, xp=np) @ rotation).T @ LAB_BEAM for phi in frame_angles]
        )
        # S_g of every candidate at every sub-orientation (excitation_errors_np) in one matmul.
        s = -(g_candidates @ k_hats.T) - g_half_squared[:, None]
        closest = np.min(np.abs(s), axis=1)
        keep = closest <= sg_max
        keep[0] = True  # 000
        frame_beams.append(candidates[keep])
        if sg_weak is not None:
            frame_weak.append(candidates[~keep & (closest <= sg_weak)])
        if segments > 1:
            positions, weak = run_selection(
                s, keep, segments, sg_max, sg_weak, candidates, strength
            )
            run_positions.append(positions)
            run_weak.append([candidates[w] for w in weak] if weak is not None else [])
    sizes = np.array([max(bucket_size(len(b)), pad_to or 0) for b in frame_beams])
    hkl, valid = _padded(frame_beams, int(sizes.max()))
    weak_hkl = weak_valid = None
    weak_sizes: tuple[int, ...] = ()
    if sg_weak is not None:
        weak_hkl, weak_valid = _padded(frame_weak, bucket_size(max(len(b) for b in frame_weak)))
        weak_sizes = tuple(
            bucket_size(max(1, int(weak_valid[sizes == size].sum(axis=1).max())))
            for size in np.unique(sizes)
        )
    buckets = tuple(np.nonzero(sizes == size)[0] for size in np.unique(sizes))
    segment_tables = None
    extra_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    extra_out: list[np.ndarray] = []
    if segments > 1:
        segment_tables, extra_pairs, extra_out = allocate_tables(
            frame_beams, run_positions, run_weak if sg_weak is not None else None, buckets,
            bucket_size,
        )  # fmt: skip
        if tails:
            n_frame_beams = np.array([len(b) for b in frame_beams])
            segment_tables = with_tails(segment_tables, n_frame_beams, buckets, bucket_size)
    differences, coupling, coupling_out, coupling_in = _coupling_indices(
        frame_beams, frame_weak if sg_weak is not None else None, hkl.shape[1],
        None if weak_hkl is None else weak_hkl.shape[1], extra_pairs, extra_out,
    )  # fmt: skip
    if segment_tables is not None:
        padding = int(np.nonzero((differences == 0).all(axis=1))[0][0])  # 000, as above
        for index in (
            segment_tables.coupling,
            segment_tables.coupling_out,
            segment_tables.coupling_in,
        ):
            if index is not None:
                np.copyto(index, padding, where=index < 0)

    # Observed reflections: their frame, their beam, S at the frame centre and Klar's test.
    frame_ids = dataset["frame"].values
    position = {int(f): i for i, f in enumerate(frame_ids)}
    refl_frame = np.array([position[int(f)] for f in dataset["frame_id"].values], dtype=np.int64)
    refl_hkl = np.stack([dataset[n].values for n in ("h", "k", "l")], axis=1).astype(np.int64)
    lookup = [{tuple(row): j for j, row in enumerate(beams.tolist())} for beams in frame_beams]
    refl_beam = np.array(
        [
            lookup[f].get(tuple(row), -1)
            for f, row in zip(refl_frame, refl_hkl.tolist(), strict=True)
        ],
        dtype=np.int64,
    )
    g_lab = np.einsum("rij,rj->ri", rotations[refl_frame], refl_hkl @ reciprocal)
    excitation, klar = klar_selection(g_lab, semiangles[refl_frame], k_mag, rsg=rsg, dsg=dsg)
    scored = klar & (refl_beam >= 0)
    return FrameSetup(
        frame=frame_ids,
        rotations=rotations,
        angles=angles,
        weights=weights,
        hkl=hkl,
        valid=valid,
        differences=differences,
        coupling=coupling,
        refl_frame=refl_frame,
        refl_beam=refl_beam,
        excitation_error=excitation,
        scored=scored,
        voltage=voltage,
        wave_number=k_mag,
        buckets=buckets,
        bucket_sizes=tuple(int(size) for size in np.unique(sizes)),
        weak_hkl=weak_hkl,
        weak_valid=weak_valid,
        coupling_out=coupling_out,
        coupling_in=coupling_in,
        weak_sizes=weak_sizes,
        segments=segment_tables,
        refl_g_lab=g_lab,
        settings={
            "g_max": float(g_max),
            "sg_max": float(sg_max),
            "sg_weak": None if sg_weak is None else float(sg_weak),
            "bethe_terms": bethe_terms,
            "centric": int(centric_at_origin(structure_tables(crystal))),  # 0/1: netCDF attrs
            "n_sub": int(n_sub),
            "rsg": float(rsg),
            "dsg": float(dsg),
            "mosaicity": float(mosaicity),
            "prune_centring": int(prune_centring),  # 0/1: netCDF attrs
            "segments": int(segments),
            "tails": int(tails and segments > 1),  # 0/1: netCDF attrs
        },
    )


def _coupling_indices(
    frame_beams: list[np.ndarray],
    frame_weak: list[np.ndarray] | None,
    size: int,
    weak_size: int | None,
    extra_pairs: list[tuple[np.ndarray, np.ndarray]] | None = None,
    extra_out: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Every distinct h_j − h_i between the beams of a frame, and per frame its index.

    Frame by frame over the real beams only (padding points at 000 and is masked anyway), with
    :func:`edkit.physics.beams.index_differences` (a dense table over the hkl box, no sort)
    writing straight into the padded arrays, so the working memory stays that of one frame's
    n² + 2·n·n_w pairs. ``extra_pairs`` (with their ``extra_out`` views, −1 where padding) are
    numbered in the same list (the segments' tables; their padding is the caller's).

    Returns:
      differences (m, 3) sorted lexicographically; coupling (n_f, size, size) int32 for h_j − h_i;
      coupling_out (n_f, size, weak_size) for h_w − h_i and coupling_in (n_f, weak_size, size)
      for h_j − h_w, or None without weak beams.
    """
    n_f = len(frame_beams)
    weak = frame_weak is not None and weak_size is not None
    zero = np.zeros((1, 3), dtype=np.int64)
    zero_index = np.zeros((1, 1), dtype=np.int32)
    # −1 marks padding until the index of 000 (where padding points) is known.
    coupling = np.full((n_f, size, size), -1, dtype=np.int32)
    coupling_out = np.full((n_f, size, weak_size or 0), -1, dtype=np.int32) if weak else None
    coupling_in = np.full((n_f, weak_size or 0, size), -1, dtype=np.int32) if weak else None
    pairs, out = [(zero, zero)], [zero_index]  # 000 itself, the padding's difference
    for f, beams in enumerate(frame_beams):
        n = len(beams)
        pairs.append((beams, beams))
        out.append(coupling[f, :n, :n])
        if frame_weak is not None and coupling_out is not None and coupling_in is not None:
            n_w = len(frame_weak[f])
            pairs += [(beams, frame_weak[f]), (frame_weak[f], beams)]
            out += [coupling_out[f, :n, :n_w], coupling_in[f, :n_w, :n]]
    pairs += extra_pairs or []
    out += extra_out or []
    differences, _ = index_differences(pairs, out)
    padding = int(zero_index[0, 0])
    for index in (coupling, coupling_out, coupling_in):
        if index is not None:
            np.copyto(index, padding, where=index < 0)

    return differences, coupling, coupling_out, coupling_in


def _padded(beam_lists: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-frame hkl lists into (n_f, size, 3) with 000 padding and a validity mask."""
    hkl = np.zeros((len(beam_lists), size, 3), dtype=np.int64)
    valid = np.zeros((len(beam_lists), size), dtype=bool)
    for f, beams in enumerate(beam_lists):
        hkl[f, : len(beams)] = beams
        valid[f, : len(beams)] = True
    return hkl, valid


def klar_selection(
    g_lab: np.ndarray,
    semiangle: np.ndarray,
    k_mag: float,
    *,
    rsg: float = DEFAULT_RSG,
    dsg: float = DEFAULT_DSG,
) -> tuple[np.ndarray, np.ndarray]:
    """Excitation error at the frame centre and Klar et al.'s selection (science.md §5).

    A reflection is scored when |S_g|/ΔS < rsg and ΔS − |S_g| > dsg, with ΔS = |(g_y, g_z)|·θ
    the excitation-error range the frame sweeps about the rotation axis (lab x).

    Args:
      g_lab: reflections' vectors in the lab frame at the frame centre, Å⁻¹, (n, 3).
      semiangle: θ of each reflection's frame, radians, (n,).
      k_mag: |K|, Å⁻¹.
      rsg, dsg: selection parameters (dsg in Å⁻¹).

    Returns:
      (S_g (n,) in Å⁻¹, selected bool (n,)).
    """
    excitation = excitation_errors_np(g_lab, LAB_BEAM, k_mag)
    swept = np.hypot(g_lab[:, 1], g_lab[:, 2]) * semiangle
    selected = (np.abs(excitation) < rsg * swept) & (swept - np.abs(excitation) > dsg)
    return excitation, selected
