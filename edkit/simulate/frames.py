"""Simulate every frame of a 3D-ED dataset: beam sets, Klar selection, rocking curves, thickness.

``FrameSetup`` does the static bookkeeping once (numpy): per frame the sub-orientations, the beams
(the union over the frame's sub-orientations, padded with inert beams to one size so a single
compiled function serves all frames), the coupling indices into one shared list of hkl
differences, and where each observed reflection sits in its frame's beam list. The
differentiable part, :func:`frame_intensity_stack`, computes F once and maps over frames.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jax.sharding import Mesh, PartitionSpec

from edkit import metrics
from edkit.constants import electron_wavelength, potential_prefactor
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.io.pets import cell_parameters, frame_orientations
from edkit.physics import bloch
from edkit.physics.beams import excitation_errors_np, reflections_within
from edkit.physics.orientation import rotation_x, rotation_y, rotation_z
from edkit.physics.rocking import (
    LAB_BEAM,
    WeakBeams,
    frame_intensities,
    sub_orientation_angles,
    sub_orientation_weights,
)
from edkit.physics.structure import (
    StructureParams,
    StructureTables,
    centric_at_origin,
    structure_factors_of,
    structure_params,
    structure_tables,
)
from edkit.simulate.pattern import mean_inner_potential

DEFAULT_G_MAX = 1.6  # Å⁻¹
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
    if n_sub is None:
        n_sub = int(np.ceil(2 * (semiangles.max() / deg + 2.5 * mosaicity) / DEFAULT_SUB_STEP)) + 1
    if n_sub < 1:
        raise EdkitError(f"n_sub = {n_sub!r}: expected at least 1 sub-orientation per frame")
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
    candidates = reflections_within(reciprocal, g_max)
    g_candidates = candidates @ reciprocal
    frame_beams, frame_weak = [], []
    for rotation, frame_angles in zip(rotations, angles, strict=True):
        k_hats = np.stack([(_rot_x(phi) @ rotation).T @ LAB_BEAM for phi in frame_angles])
        s = np.stack([excitation_errors_np(g_candidates, k, k_mag) for k in k_hats])
        closest = np.min(np.abs(s), axis=0)
        keep = closest <= sg_max
        keep[0] = True  # 000
        frame_beams.append(candidates[keep])
        if sg_weak is not None:
            frame_weak.append(candidates[~keep & (closest <= sg_weak)])
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
    differences, coupling, coupling_out, coupling_in = _coupling_indices(
        frame_beams, frame_weak if sg_weak is not None else None, hkl.shape[1],
        None if weak_hkl is None else weak_hkl.shape[1],
    )  # fmt: skip

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
        buckets=tuple(np.nonzero(sizes == size)[0] for size in np.unique(sizes)),
        bucket_sizes=tuple(int(size) for size in np.unique(sizes)),
        weak_hkl=weak_hkl,
        weak_valid=weak_valid,
        coupling_out=coupling_out,
        coupling_in=coupling_in,
        weak_sizes=weak_sizes,
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
        },
    )


def _coupling_indices(
    frame_beams: list[np.ndarray],
    frame_weak: list[np.ndarray] | None,
    size: int,
    weak_size: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Every distinct h_j − h_i between the beams of a frame, and per frame its index.

    Frame by frame over the real beams only (padding points at 000 and is masked anyway), so the
    memory stays that of one frame's n² + 2·n·n_w pairs, not of every frame padded to the largest.

    Returns:
      differences (m, 3) sorted lexicographically; coupling (n_f, size, size) int32 for h_j − h_i;
      coupling_out (n_f, size, weak_size) for h_w − h_i and coupling_in (n_f, weak_size, size)
      for h_j − h_w, or None without weak beams.
    """
    every = np.concatenate([*frame_beams, *(frame_weak or [])])
    reach = 2 * int(np.abs(every).max()) if every.size else 0
    base = 2 * reach + 1

    def keys(h_to: np.ndarray, h_from: np.ndarray) -> np.ndarray:
        # One int64 key per difference h_to[j] − h_from[i], shape (len(h_from), len(h_to)): a
        # 1-D unique is ~10× faster than unique(axis=0), and keys sort lexicographically.
        d = h_to[None, :, :] - h_from[:, None, :] + reach
        return (d[..., 0] * base + d[..., 1]) * base + d[..., 2]

    blocks = []
    for f, beams in enumerate(frame_beams):
        blocks.append([keys(beams, beams)])
        if frame_weak is not None:
            blocks[-1] += [keys(frame_weak[f], beams), keys(beams, frame_weak[f])]
    zero = keys(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64)).ravel()
    unique = np.unique(np.concatenate([zero] + [np.unique(k) for b in blocks for k in b]))
    differences = (
        np.stack([unique // base**2, (unique // base) % base, unique % base], axis=1) - reach
    )
    padding = int(np.searchsorted(unique, zero[0]))
    n_f = len(frame_beams)
    coupling = np.full((n_f, size, size), padding, dtype=np.int32)
    coupling_out = coupling_in = None
    if frame_weak is not None:
        coupling_out = np.full((n_f, size, weak_size), padding, dtype=np.int32)
        coupling_in = np.full((n_f, weak_size, size), padding, dtype=np.int32)
    for f, frame_blocks in enumerate(blocks):
        n = len(frame_beams[f])
        coupling[f, :n, :n] = np.searchsorted(unique, frame_blocks[0])
        if frame_weak is not None:
            n_w = len(frame_weak[f])
            coupling_out[f, :n, :n_w] = np.searchsorted(unique, frame_blocks[1])
            coupling_in[f, :n_w, :n] = np.searchsorted(unique, frame_blocks[2])
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


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def small_rotation(angles: jax.Array) -> jax.Array:
    """R_z(γ) R_y(β) R_x(α) for three small correction angles (α, β, γ), radians, (3, 3)."""
    return rotation_z(angles[2]) @ rotation_y(angles[1]) @ rotation_x(angles[0])


#: Bound on batch × sub-orientations × n² of the solves held at once (about 8 MB per complex
#: working array): larger frames solve their sub-orientations in chunks (``sub_batch``).
WORKING_ELEMENTS = 2**19


def frame_intensity_stack(
    params: StructureParams,
    tables: StructureTables,
    setup: FrameSetup,
    thickness: jax.Array,
    *,
    orientation_corrections: jax.Array | None = None,
    absorption: float | jax.Array | None = None,
    absorption_method: bloch.AbsorptionMethod = "eig",
    batch_size: int = 8,
    solve_dtype: jnp.dtype | None = None,
    devices: int = 1,
    remat: bool | Literal["eigensystems"] = False,
    real_potential: bool | None = None,
) -> jax.Array:
    """Rocking-curve intensities of every frame for each of its thicknesses.

    Differentiable in ``params``, ``thickness``, ``orientation_corrections`` and ``absorption``.
    Call inside ``jax.enable_x64(True)`` for float64.

    Args:
      params: the structure.
      tables: ``structure_tables(crystal)``.
      setup: ``build_frame_setup(crystal, dataset)``.
      thickness: Å, (n_f, n_t): the thicknesses at which each frame is evaluated.
      orientation_corrections: small lab-frame rotation angles per frame, radians, (n_f, 3).
      absorption: κ of the proportional model U' = κU, or None.
      absorption_method: see :func:`edkit.physics.bloch.bloch_intensities`.
      batch_size: frames evaluated together (vectorised) inside the sequential map.
      solve_dtype: complex dtype of the Bloch solves (``jnp.complex64`` trades ~1e-5 relative
        intensity accuracy for speed); None keeps complex128 under x64.
      devices: shard the frames of each bucket over this many devices (``jax.shard_map``;
        on CPU set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts).
      remat: what the backward pass keeps of each frame's forward pass. False: everything
        (fastest, memory grows with frames × sub-orientations × n²·several). True: nothing, it
        recomputes the frame (``jax.checkpoint``; the least memory, about one more forward
        pass). "eigensystems": only the eigendecompositions (n² + n per solve), recomputing the
        cheap rest: nearly the speed of False at a fraction of its memory.
      real_potential: solve with real potentials (real symmetric matrices without absorption:
        2–2.5× cheaper solves, ``benchmarks/kernel.py --real``). None: when the setup's crystal
        has the inversion through the origin, where F(h) is real (``setup.settings["centric"]``,
        from :func:`edkit.physics.structure.centric_at_origin`).

    Returns:
      Intensities, (n_f, n_t, n); zero on padding beams.
    """
    voltage = setup.voltage
    f_all = structure_factors_of(params, tables, setup.differences)
    if real_potential is None:
        real_potential = bool(setup.settings.get("centric", False))
    if real_potential:
        f_all = jnp.real(f_all)  # imaginary parts are rounding (~1e-16 relative) here
    u0 = mean_inner_potential(params, tables, voltage)
    k_mag = jnp.sqrt(1.0 / electron_wavelength(voltage) ** 2 + u0)
    prefactor = potential_prefactor(voltage)
    reciprocal = jnp.asarray(tables.reciprocal_basis)
    n_frames = setup.n_frames
    if orientation_corrections is None:
        orientation_corrections = jnp.zeros((n_frames, 3))

    absorbing = absorption is not None
    shared = (f_all, k_mag, jnp.asarray(0.0 if absorption is None else absorption))
    has_weak = setup.weak_hkl is not None
    n_sub = setup.angles.shape[1]
    bethe_terms = setup.settings.get("bethe_terms")

    def one_frame(inputs, shared, sub_batch):
        rotation, angles, weights, hkl, valid, coupling, t, correction = inputs[:8]
        f_values, wave_number, kappa = shared
        rotation = small_rotation(correction) @ rotation
        k_hats = jax.vmap(lambda phi: (rotation_x(phi) @ rotation).T @ jnp.asarray(LAB_BEAM))(
            angles
        )
        potential = prefactor * f_values[coupling]
        absorptive = kappa * potential if absorbing else None
        g_cart = hkl.astype(reciprocal.dtype) @ reciprocal
        weak = None
        if has_weak:
            weak_hkl, weak_valid, coupling_out, coupling_in = inputs[8:]
            potential_out = prefactor * f_values[coupling_out]
            potential_in = prefactor * f_values[coupling_in]
            weak = WeakBeams(
                weak_hkl.astype(reciprocal.dtype) @ reciprocal,
                weak_valid,
                potential_out,
                potential_in,
                kappa * potential_out if absorbing else None,
                kappa * potential_in if absorbing else None,
            )
        return frame_intensities(
            k_hats, weights, g_cart, valid, potential, wave_number, t, absorptive,
            absorption_method, solve_dtype, weak, bethe_terms, sub_batch,
        )  # fmt: skip

    if remat not in (False, True, "eigensystems"):
        raise EdkitError(f"remat = {remat!r}: expected True, False or 'eigensystems'")
    frame_function = one_frame
    if remat:
        policy = bloch.KEEP_EIGENSYSTEMS if remat == "eigensystems" else None
        frame_function = jax.checkpoint(one_frame, policy=policy, static_argnums=(2,))

    def map_frames(sub_batch, shared, *inputs):
        return jax.lax.map(
            lambda x: frame_function(x, shared, sub_batch), inputs, batch_size=batch_size
        )

    arrays = (
        setup.rotations,
        setup.angles,
        setup.weights,
        setup.hkl,
        setup.valid,
        setup.coupling,
        thickness,
        orientation_corrections,
    )
    if has_weak:
        arrays = (*arrays, setup.weak_hkl, setup.weak_valid, setup.coupling_out, setup.coupling_in)
    buckets = setup.buckets or (np.arange(n_frames),)
    sizes = setup.bucket_sizes or (setup.hkl.shape[1],)
    weak_sizes = setup.weak_sizes or (None,) * len(sizes)
    outputs = []
    for frames, size, n_w in zip(buckets, sizes, weak_sizes, strict=True):
        # Setup arrays are sliced and trimmed in numpy: only the bucket's own part becomes a
        # compile-time constant (not every frame padded to the largest size).
        selected = [a[frames] if isinstance(a, np.ndarray) else jnp.asarray(a)[frames]
                    for a in arrays]  # fmt: skip
        rotation, angles, weights, hkl, valid, coupling, t, correction = selected[:8]
        bucket_inputs = (
            rotation, angles, weights, hkl[:, :size], valid[:, :size],
            coupling[:, :size, :size], t, correction,
        )  # fmt: skip
        if has_weak:
            weak_hkl, weak_valid, coupling_out, coupling_in = selected[8:]
            bucket_inputs = (
                *bucket_inputs, weak_hkl[:, :n_w], weak_valid[:, :n_w],
                coupling_out[:, :size, :n_w], coupling_in[:, :n_w, :size],
            )  # fmt: skip
        per_sub = min(batch_size, len(frames)) * size * size  # elements per sub-orientation
        sub_batch = (
            None if per_sub * n_sub <= WORKING_ELEMENTS else max(1, WORKING_ELEMENTS // per_sub)
        )
        bucket_map = functools.partial(map_frames, sub_batch)
        if devices > 1:
            out = _sharded(bucket_map, shared, bucket_inputs, devices)
        else:
            out = bucket_map(shared, *bucket_inputs)
        outputs.append(jnp.pad(out, ((0, 0), (0, 0), (0, setup.hkl.shape[1] - size))))
    order = np.argsort(np.concatenate(buckets))
    return jnp.concatenate(outputs, axis=0)[order]


def _sharded(map_frames: Callable, shared: tuple, inputs: tuple, devices: int) -> jax.Array:
    """Run ``map_frames`` with the frames split over ``devices`` devices (results identical to
    the single-device map: the same per-frame program runs on each shard).

    ``jax.devices()`` is the global device list, so after ``jax.distributed.initialize`` on every
    host the same call spans hosts (multi-controller; see the README, untested here)."""
    available = jax.devices()
    if devices > len(available):
        raise EdkitError(
            f"devices = {devices}, but JAX sees {len(available)}; on CPU start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        )
    n = inputs[0].shape[0]
    pad = (-n) % devices  # shards must be equal: repeat the last frame, drop it afterwards
    if pad:
        inputs = tuple(jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) for x in inputs)
    mesh = Mesh(np.array(available[:devices]), ("frames",))
    sharded = jax.shard_map(
        map_frames,
        mesh=mesh,
        in_specs=(PartitionSpec(), *(PartitionSpec("frames") for _ in inputs)),
        out_specs=PartitionSpec("frames"),
    )
    return sharded(shared, *inputs)[:n]


@functools.lru_cache(maxsize=16)
def compiled_stack(
    setup: FrameSetup, absorption: float | None, absorption_method: bloch.AbsorptionMethod
) -> Callable[[StructureParams, StructureTables, jax.Array], jax.Array]:
    """A jitted :func:`frame_intensity_stack` for one setup, cached so repeated simulations of the
    same dataset (other structures, thicknesses) reuse the compiled code."""
    return jax.jit(
        lambda params, tables, thickness: frame_intensity_stack(
            params, tables, setup, thickness, absorption=absorption,
            absorption_method=absorption_method,
        )
    )  # fmt: skip


def reflection_intensities(setup: FrameSetup, frame_stack: jax.Array) -> jax.Array:
    """Each observed reflection's intensity from (n_f, n) frame intensities; 0 if unsimulated."""
    beam = jnp.maximum(jnp.asarray(setup.refl_beam), 0)
    values = frame_stack[jnp.asarray(setup.refl_frame), beam]
    return jnp.where(jnp.asarray(setup.refl_beam) >= 0, values, 0.0)


def thickness_nodes(thickness: Any, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a thickness specification to per-frame nodes and weights, each (n_f, n_t).

    Accepts a scalar (Å), a per-frame array (n_f,), or a distribution ``(values, weights)`` with
    values (n_f, n_t) or (n_t,) and matching weights (normalised per frame).
    """
    if isinstance(thickness, tuple) and len(thickness) == 2:
        values = np.asarray(thickness[0], dtype=float)
        weights = np.asarray(thickness[1], dtype=float)
        values = np.broadcast_to(np.atleast_2d(values), (n_frames, np.atleast_2d(values).shape[-1]))
        weights = np.broadcast_to(np.atleast_2d(weights), values.shape)
    else:
        values = np.asarray(thickness, dtype=float)
        if values.ndim == 0:
            values = np.full((n_frames, 1), float(values))
        elif values.shape == (n_frames,):
            values = values[:, None]
        else:
            raise EdkitError(
                f"thickness of shape {values.shape}: expected a scalar, one value per frame "
                f"({n_frames},), or a (values, weights) distribution"
            )
        weights = np.ones_like(values)
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        raise EdkitError("thickness: expected finite values ≥ 0 Å")
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0)) or np.any(weights.sum(1) <= 0):
        raise EdkitError(
            "thickness weights: expected finite values ≥ 0 with a positive sum per frame"
        )
    return np.ascontiguousarray(values), weights / weights.sum(axis=1, keepdims=True)


def simulate_frames(
    crystal: Crystal,
    dataset: xr.Dataset,
    thickness: Any,
    *,
    g_max: float = DEFAULT_G_MAX,
    sg_max: float = DEFAULT_SG_MAX,
    n_sub: int | None = None,
    mosaicity: float | None = None,
    absorption: float | None = None,
    absorption_method: bloch.AbsorptionMethod = "eig",
    setup: FrameSetup | None = None,
) -> xr.Dataset:
    """Simulate every frame of ``dataset`` and compare with its observed reflections.

    Args:
      crystal: the structure (cell within 1 % of the dataset's).
      dataset: from :func:`edkit.read_pets`.
      thickness: Å: a scalar, one value per frame (n_f,), or a per-frame distribution
        ``(values, weights)`` (each (n_f, n_t)); a distribution costs one eigendecomposition per
        sub-orientation, not one per thickness.
      g_max, sg_max, n_sub, mosaicity: see :func:`build_frame_setup`.
      absorption: κ of the proportional absorption model U' = κU, or None.
      absorption_method: "eig" (exact), "expm" or "perturbative".
      setup: a ready :func:`build_frame_setup` result (skips the planning).

    Returns:
      Dataset on ``refl`` (same order as ``dataset``): ``I_calc`` (rocking-curve integral,
      incident beam = 1 per sub-orientation), ``I_calc_scaled`` (times the frame's closed-form
      scale to I_obs over scored reflections), ``scored`` (Klar selection, simulated), ``S_g``
      (excitation error at the frame centre); on ``frame``: ``scale``, ``n_beams``, ``n_scored``,
      ``r_obs_frame`` (diffBloch per-frame R_obs). attrs: settings, ``frames_without_scored``.
    """
    if setup is None:
        setup = build_frame_setup(
            crystal, dataset, g_max=g_max, sg_max=sg_max, n_sub=n_sub, mosaicity=mosaicity
        )
    if absorption is not None and not (np.isfinite(absorption) and absorption >= 0):
        raise EdkitError(f"absorption = {absorption!r}: expected κ ≥ 0 (U' = κU) or None")
    values, weights = thickness_nodes(thickness, setup.n_frames)
    with jax.enable_x64(True):
        stack = compiled_stack(setup, absorption, absorption_method)(
            structure_params(crystal), structure_tables(crystal), jnp.asarray(values)
        )
        frame_values = jnp.einsum("ft,ftn->fn", jnp.asarray(weights), stack)
        i_calc = np.asarray(reflection_intensities(setup, frame_values))
    if not np.all(np.isfinite(i_calc)):
        raise EdkitError("simulate_frames produced non-finite intensities; check the structure")
    return frame_comparison(setup, dataset, i_calc, values, weights)


def frame_comparison(
    setup: FrameSetup,
    dataset: xr.Dataset,
    i_calc: np.ndarray,
    thickness_values: np.ndarray | None = None,
    thickness_weights: np.ndarray | None = None,
) -> xr.Dataset:
    """Scale calculated intensities per frame and assemble the comparison Dataset."""
    i_obs = dataset["I_obs"].values
    sigma = dataset["sigma"].values
    scored = setup.scored
    n_frames = setup.n_frames
    scored_weights = np.where(scored, 1.0 / np.maximum(sigma, 1e-12), 0.0)
    scale = metrics.scale_per_frame(i_obs, i_calc, setup.refl_frame, n_frames, scored_weights)
    i_scaled = i_calc * scale[setup.refl_frame]
    n_scored = np.bincount(setup.refl_frame[scored], minlength=n_frames)
    r_frame = metrics.frame_r_obs(
        i_obs[scored], sigma[scored], i_calc[scored], setup.refl_frame[scored], n_frames
    )
    result = xr.Dataset(
        {
            "I_calc": (
                "refl",
                i_calc,
                {"units": "1", "long_name": "calculated intensity (unscaled)"},
            ),
            "I_calc_scaled": (
                "refl",
                i_scaled,
                {"units": "1", "long_name": "calculated intensity on the scale of I_obs"},
            ),
            "scored": ("refl", scored, {"long_name": "scored (Klar selection, simulated)"}),
            "S_g": (
                "refl",
                setup.excitation_error,
                {"units": "1/angstrom", "long_name": "S_g at frame centre"},
            ),
            "scale": ("frame", scale, {"units": "1", "long_name": "frame scale"}),
            "n_beams": ("frame", setup.n_beams, {"long_name": "beams simulated"}),
            "n_scored": ("frame", n_scored, {"long_name": "scored reflections"}),
            "r_obs_frame": (
                "frame",
                r_frame,
                {"units": "1", "long_name": "per-frame R_obs on |F| (diffBloch convention)"},
            ),
        },
        coords={"frame": setup.frame},
        attrs={
            **{k: v for k, v in setup.settings.items() if v is not None},
            "voltage": setup.voltage,
            "wave_number": setup.wave_number,
            "frames_without_scored": " ".join(str(f) for f in setup.frame[n_scored == 0]),
        },
    )
    if thickness_values is not None:
        mean_t = np.sum(thickness_values * thickness_weights, axis=1)
        result["thickness"] = (
            "frame",
            mean_t,
            {"units": "angstrom", "long_name": "mean thickness"},
        )
    return result


DEFAULT_THICKNESS_GRID = np.arange(50.0, 2001.0, 25.0)  # Å


def thickness_search(
    crystal: Crystal,
    dataset: xr.Dataset,
    grid: Any = DEFAULT_THICKNESS_GRID,
    *,
    setup: FrameSetup | None = None,
    absorption: float | None = None,
    **setup_options: Any,
) -> xr.Dataset:
    """Per-frame grid search of thickness: one eigendecomposition per sub-orientation serves the
    whole grid.

    For every grid value each frame is scaled (closed form) and scored by its per-frame R_obs on
    |F| (diffBloch convention) over its scored reflections; the best grid value wins.

    Args:
      crystal, dataset: as for :func:`simulate_frames`.
      grid: thicknesses to try, Å, 1-D.
      setup: a ready :func:`build_frame_setup` result; else built with ``setup_options``.
      absorption: κ of the proportional absorption model, or None.

    Returns:
      Dataset with ``r_obs_frame`` (frame, thickness) — the curves —, ``thickness_best`` (frame,
      Å; NaN for frames with no observed scored reflection) and ``r_obs_best`` (frame).
    """
    grid = np.asarray(grid, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid < 0):
        raise EdkitError(f"grid: expected a 1-D array of thicknesses ≥ 0 Å, got {grid!r}")
    if setup is None:
        setup = build_frame_setup(crystal, dataset, **setup_options)
    n_frames = setup.n_frames
    with jax.enable_x64(True):
        stack = compiled_stack(setup, absorption, "eig")(
            structure_params(crystal),
            structure_tables(crystal),
            jnp.broadcast_to(jnp.asarray(grid), (n_frames, grid.size)),
        )
        per_refl = np.asarray(
            jax.vmap(lambda s: reflection_intensities(setup, s), in_axes=1, out_axes=1)(stack)
        )  # (n_r, n_t)
    scored = setup.scored
    i_obs = dataset["I_obs"].values[scored]
    sigma = dataset["sigma"].values[scored]
    frames = setup.refl_frame[scored]
    curves = np.stack(
        [
            metrics.frame_r_obs(i_obs, sigma, per_refl[scored, j], frames, n_frames)
            for j in range(grid.size)
        ],
        axis=1,
    )
    finite = np.isfinite(curves).any(axis=1)
    best_index = np.argmin(np.where(np.isfinite(curves), curves, np.inf), axis=1)
    best = np.where(finite, grid[best_index], np.nan)
    return xr.Dataset(
        {
            "r_obs_frame": (
                ("frame", "thickness"),
                curves,
                {"units": "1", "long_name": "per-frame R_obs on |F| (diffBloch convention)"},
            ),
            "thickness_best": ("frame", best, {"units": "angstrom", "long_name": "best thickness"}),
            "r_obs_best": (
                "frame",
                np.where(finite, curves[np.arange(n_frames), best_index], np.nan),
                {"units": "1", "long_name": "per-frame R_obs at the best thickness"},
            ),
        },
        coords={
            "frame": setup.frame,
            "thickness": ("thickness", grid, {"units": "angstrom", "long_name": "thickness"}),
        },
        attrs={k: v for k, v in setup.settings.items() if v is not None},
    )
