"""The differentiable frame stack: rocking-curve intensities of groups of frames.

:func:`stack_frames` is the one kernel: for a group of frames padded to one beam count
(:class:`FrameArrays`, sliced from a :class:`~edkit.simulate.setup.FrameSetup`) and the
structure's potentials (:class:`Potentials`), it maps the frames sequentially (``lax.map``), each
frame integrating its rocking curve over its sub-orientations. :func:`frame_intensity_stack`
runs it over every beam-count bucket of a setup; the refinement core runs it chunk by chunk of
frames so that memory is that of one chunk (``edkit.refine.core``).
"""

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edkit.constants import electron_wavelength, potential_prefactor
from edkit.errors import EdkitError
from edkit.physics import bloch
from edkit.physics.orientation import rotation_x, rotation_y, rotation_z
from edkit.physics.rocking import LAB_BEAM, TailBeams, WeakBeams, frame_intensities
from edkit.physics.structure import StructureParams, StructureTables, structure_factors_of
from edkit.simulate.pattern import mean_inner_potential
from edkit.simulate.setup import FrameSetup

# frame_mesh and replicated were this module's before the sharding moved out: kept importable.
from edkit.simulate.sharding import frame_mesh as frame_mesh
from edkit.simulate.sharding import replicated as replicated
from edkit.simulate.sharding import sharded_map as sharded_map

Remat = bool | Literal["eigensystems"]

#: Bound on batch × sub-orientations × n² of the solves held at once (about 8 MB per complex
#: working array): larger frames solve their sub-orientations in chunks (``sub_batch``).
WORKING_ELEMENTS = 2**19


def small_rotation(angles: jax.Array) -> jax.Array:
    """R_z(γ) R_y(β) R_x(α) for three small correction angles (α, β, γ), radians, (3, 3)."""
    return rotation_z(angles[2]) @ rotation_y(angles[1]) @ rotation_x(angles[0])


class Potentials(NamedTuple):
    """What every frame of a crystal shares (arrays; differentiable).

    Attributes:
      f_values: F(h) of every hkl difference of the setup (``setup.differences``), Å⁻², (m,);
        real for centrosymmetric crystals solved with real potentials.
      wave_number: |K| inside the crystal, Å⁻¹, ().
      kappa: κ of the proportional absorption model U' = κU (0 without absorption), ().
    """

    f_values: jax.Array
    wave_number: jax.Array
    kappa: jax.Array


class StackConfig(NamedTuple):
    """Static choices of a frame stack (hashable: a ``jax.jit`` static argument).

    Attributes:
      voltage: V.
      absorbing: κ is used.
      absorption_method: see ``bloch.bloch_intensities``.
      solve_dtype: complex dtype of the solves as a string ("complex64") or None (complex128
        under x64).
      bethe_terms: Chebyshev terms of the shared Bethe correction or None.
      batch_size: frames vectorised together inside the sequential map.
      remat: see :func:`frame_intensity_stack`.
      devices: shard the frames over this many devices.
    """

    voltage: float
    absorbing: bool = False
    absorption_method: bloch.AbsorptionMethod = "eig"
    solve_dtype: str | None = None
    bethe_terms: int | None = None
    batch_size: int = 8
    remat: Remat = False
    devices: int = 1


class FrameArrays(NamedTuple):
    """A group of frames padded to one beam count n (and n_w weak beams), c frames.

    Attributes: rotations (c, 3, 3); angles, weights (c, n_s); hkl (c, n, 3) int; valid (c, n);
    coupling (c, n, n) int32 indices into ``setup.differences``; weak_hkl (c, n_w, 3),
    weak_valid (c, n_w), coupling_out (c, n, n_w), coupling_in (c, n_w, n), or None without
    Bethe beams. See :class:`~edkit.simulate.setup.FrameSetup` for their meaning. With segments
    (S runs of m beams, m_w weak; :class:`~edkit.simulate.segments.SegmentTables`):
    segment_beam (c, S, m), segment_valid (c, S, m), segment_coupling (c, S, m, m), and with
    Bethe beams segment_weak_hkl (c, S, m_w, 3), segment_weak_valid (c, S, m_w),
    segment_coupling_out (c, S, m, m_w), segment_coupling_in (c, S, m_w, m), and with tails
    segment_tail (c, S, n_o), segment_tail_valid (c, S, n_o); else None.
    """

    rotations: Any
    angles: Any
    weights: Any
    hkl: Any
    valid: Any
    coupling: Any
    weak_hkl: Any = None
    weak_valid: Any = None
    coupling_out: Any = None
    coupling_in: Any = None
    segment_beam: Any = None
    segment_valid: Any = None
    segment_coupling: Any = None
    segment_weak_hkl: Any = None
    segment_weak_valid: Any = None
    segment_coupling_out: Any = None
    segment_coupling_in: Any = None
    segment_tail: Any = None
    segment_tail_valid: Any = None


def frame_arrays(
    setup: FrameSetup, frames: np.ndarray, size: int, weak_size: int | None
) -> FrameArrays:
    """The frames ``frames`` (positions) of ``setup`` as numpy arrays padded to ``size`` beams
    (and ``weak_size`` weak beams)."""
    frames = np.asarray(frames)
    arrays = FrameArrays(
        setup.rotations[frames],
        setup.angles[frames],
        setup.weights[frames],
        setup.hkl[frames, :size],
        setup.valid[frames, :size],
        setup.coupling[frames, :size, :size],
    )
    runs = setup.segments
    if runs is not None:
        bucket = setup.bucket_sizes.index(size) if setup.bucket_sizes else 0
        m = runs.sizes[bucket]
        arrays = arrays._replace(
            segment_beam=runs.beam[frames, :, :m],
            segment_valid=runs.valid[frames, :, :m],
            segment_coupling=runs.coupling[frames, :, :m, :m],
        )
        if runs.tail is not None and runs.tail_valid is not None:
            n_o = runs.tail_sizes[bucket]
            arrays = arrays._replace(
                segment_tail=runs.tail[frames, :, :n_o],
                segment_tail_valid=runs.tail_valid[frames, :, :n_o],
            )
        if runs.weak_hkl is not None and runs.weak_valid is not None and weak_size is not None:
            assert runs.coupling_out is not None and runs.coupling_in is not None
            m_w = runs.weak_sizes[bucket]
            arrays = arrays._replace(
                segment_weak_hkl=runs.weak_hkl[frames, :, :m_w],
                segment_weak_valid=runs.weak_valid[frames, :, :m_w],
                segment_coupling_out=runs.coupling_out[frames, :, :m, :m_w],
                segment_coupling_in=runs.coupling_in[frames, :, :m_w, :m],
            )
    if (
        setup.weak_hkl is None
        or setup.weak_valid is None
        or setup.coupling_out is None
        or setup.coupling_in is None
        or weak_size is None
    ):
        return arrays
    return arrays._replace(
        weak_hkl=setup.weak_hkl[frames, :weak_size],
        weak_valid=setup.weak_valid[frames, :weak_size],
        coupling_out=setup.coupling_out[frames, :size, :weak_size],
        coupling_in=setup.coupling_in[frames, :weak_size, :size],
    )


def potentials(
    params: StructureParams,
    tables: StructureTables,
    differences: np.ndarray,
    voltage: float,
    absorption: float | jax.Array | None = None,
    real_potential: bool = False,
) -> Potentials:
    """F of every hkl difference, |K| and κ (see :class:`Potentials`); differentiable."""
    f_all = structure_factors_of(params, tables, differences)
    if real_potential:
        f_all = jnp.real(f_all)  # imaginary parts are rounding (~1e-16 relative) here
    u0 = mean_inner_potential(params, tables, voltage)
    k_mag = jnp.sqrt(1.0 / electron_wavelength(voltage) ** 2 + u0)
    kappa = jnp.asarray(0.0 if absorption is None else absorption)
    return Potentials(f_all, k_mag, kappa)


def sub_batch_size(
    n_frames: int, size: int, n_sub: int, batch_size: int, working: int | None = None
) -> int | None:
    """Sub-orientations solved at once for frames of ``size`` beams (None: all of them);
    ``working``: columns of the per-solve working set (``size``, more with tails)."""
    per_sub = min(batch_size, n_frames) * size * (working or size)  # elements per solve
    return None if per_sub * n_sub <= WORKING_ELEMENTS else max(1, WORKING_ELEMENTS // per_sub)


def stack_frames(
    pot: Potentials,
    reciprocal: jax.Array | np.ndarray,
    arrays: FrameArrays,
    thickness: jax.Array,
    corrections: jax.Array,
    config: StackConfig,
) -> jax.Array:
    """Rocking-curve intensities of a group of frames at each of their thicknesses.

    Args:
      pot: the crystal's potentials.
      reciprocal: rows a*, b*, c*, Cartesian, Å⁻¹, (3, 3).
      arrays: the frames (c of them, n beams).
      thickness: Å, (c, n_t).
      corrections: small lab-frame rotation angles per frame, radians, (c, 3).
      config: static choices.

    Returns:
      Intensities, (c, n_t, n); zero on padding beams.
    """
    prefactor = potential_prefactor(config.voltage)
    absorbing, has_weak = config.absorbing, arrays.weak_hkl is not None
    solve_dtype = None if config.solve_dtype is None else jnp.dtype(config.solve_dtype)
    reciprocal = jnp.asarray(reciprocal)

    has_runs = arrays.segment_beam is not None
    has_run_weak = arrays.segment_weak_hkl is not None
    # First-order tails need a Hermitian solve (physics.tails): runs with absorption go without.
    has_tails = arrays.segment_tail is not None and not absorbing
    if arrays.segment_tail is not None and absorbing:
        arrays = arrays._replace(segment_tail=None, segment_tail_valid=None)

    def weak_beams(weak_hkl, weak_valid, coupling_out, coupling_in, f_values, kappa):
        potential_out = prefactor * f_values.at[coupling_out].get(mode="promise_in_bounds")
        potential_in = prefactor * f_values.at[coupling_in].get(mode="promise_in_bounds")
        return WeakBeams(
            weak_hkl.astype(reciprocal.dtype) @ reciprocal,
            weak_valid,
            potential_out,
            potential_in,
            kappa * potential_out if absorbing else None,
            kappa * potential_in if absorbing else None,
        )

    def intensities(
        k_hats, weights, hkl, valid, coupling, weak_arrays, t, shared, sub_batch, tail_arrays=None
    ):
        f_values, wave_number, kappa = shared
        potential = prefactor * f_values.at[coupling].get(mode="promise_in_bounds")
        weak = None if weak_arrays is None else weak_beams(*weak_arrays, f_values, kappa)
        tail = None
        if tail_arrays is not None:
            tail_hkl, tail_valid, tail_coupling = tail_arrays
            tail = TailBeams(
                tail_hkl.astype(reciprocal.dtype) @ reciprocal,
                tail_valid,
                prefactor * f_values.at[tail_coupling].get(mode="promise_in_bounds"),
            )
        return frame_intensities(
            k_hats, weights, hkl.astype(reciprocal.dtype) @ reciprocal, valid, potential,
            wave_number, t, kappa * potential if absorbing else None, config.absorption_method,
            solve_dtype, weak, config.bethe_terms, sub_batch, tail,
        )  # fmt: skip

    def one_frame(inputs, shared, sub_batch):
        rotation, angles, weights, hkl, valid, coupling, t, correction = inputs[:8]
        rotation = small_rotation(correction) @ rotation
        k_hats = jax.vmap(lambda phi: (rotation_x(phi) @ rotation).T @ jnp.asarray(LAB_BEAM))(
            angles
        )
        weak_arrays = inputs[8:12] if has_weak else None
        if not has_runs:
            return intensities(k_hats, weights, hkl, valid, coupling, weak_arrays, t, shared,
                               sub_batch)  # fmt: skip
        runs = inputs[12:] if has_weak else inputs[8:]
        n_runs = runs[0].shape[0]

        def one_run(run):
            k_run, w_run, beam, run_valid, run_coupling = run[:5]
            tail_arrays, placed = None, beam
            if has_tails:  # the frame's other beams, coupled from the run's: h_j − h_w
                tail, tail_valid = run[-2:]
                tail_arrays = (hkl[tail], tail_valid, coupling[tail][:, beam])
                placed = jnp.concatenate([beam, tail])
            out = intensities(
                k_run, w_run, hkl[beam], run_valid, run_coupling,
                run[5:9] if has_run_weak else None, t, shared, sub_batch, tail_arrays,
            )  # fmt: skip
            # The run's rocking-curve sum joins the frame's beams (padding adds zeros at 000).
            return jnp.zeros((t.shape[0], hkl.shape[0]), out.dtype).at[:, placed].add(out)

        run_inputs = (
            k_hats.reshape(n_runs, -1, 3), weights.reshape(n_runs, -1), *runs
        )  # fmt: skip
        return jax.lax.map(one_run, run_inputs).sum(axis=0)

    if config.remat not in (False, True, "eigensystems"):
        raise EdkitError(f"remat = {config.remat!r}: expected True, False or 'eigensystems'")
    frame_function = one_frame
    if config.remat:
        policy = bloch.KEEP_EIGENSYSTEMS if config.remat == "eigensystems" else None
        frame_function = jax.checkpoint(one_frame, policy=policy, static_argnums=(2,))

    n_frames, size, n_sub = arrays.hkl.shape[0], arrays.hkl.shape[1], arrays.angles.shape[1]
    working = size
    if has_runs:  # each run solves its own m beams over n_sub / S sub-orientations
        size, n_sub = arrays.segment_beam.shape[2], n_sub // arrays.segment_beam.shape[1]
        # The tails' (n_o, m) coupling and products count as (n_o / m) more of an m² solve.
        working = size + (arrays.segment_tail.shape[2] if has_tails else 0)
    sub_batch = sub_batch_size(n_frames, size, n_sub, config.batch_size, working)

    def map_frames(shared, *inputs):
        return jax.lax.map(
            lambda x: frame_function(x, shared, sub_batch), inputs, batch_size=config.batch_size
        )

    inputs: tuple[Any, ...] = (*arrays[:6], thickness, corrections)
    if has_weak:
        inputs = (*inputs, *arrays[6:10])
    if has_runs:
        inputs = (*inputs, *(x for x in arrays[10:] if x is not None))
    inputs = tuple(jnp.asarray(x) for x in inputs)
    if config.devices > 1:
        return sharded_map(map_frames, tuple(pot), inputs, config.devices)
    return map_frames(tuple(pot), *inputs)


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
    solve_dtype: Any = None,
    devices: int = 1,
    remat: Remat = False,
    real_potential: bool | None = None,
) -> jax.Array:
    """Rocking-curve intensities of every frame for each of its thicknesses.

    Differentiable in ``params``, ``thickness``, ``orientation_corrections`` and ``absorption``.
    Call inside ``jax.enable_x64(True)`` for float64. Every bucket of frames (one padded beam
    count) runs through :func:`stack_frames` at its own size.

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
    if real_potential is None:
        real_potential = bool(setup.settings.get("centric", False))
    pot = potentials(
        params, tables, setup.differences, setup.voltage, absorption, bool(real_potential)
    )
    config = stack_config(
        setup, absorption is not None, absorption_method, solve_dtype, batch_size, remat, devices
    )
    n_frames = setup.n_frames
    if orientation_corrections is None:
        orientation_corrections = jnp.zeros((n_frames, 3))
    thickness = jnp.asarray(thickness)
    outputs = []
    for frames, size, n_w in bucket_layout(setup):
        # Setup arrays are sliced and trimmed in numpy: only the bucket's own part becomes a
        # compile-time constant (not every frame padded to the largest size).
        out = stack_frames(
            pot,
            tables.reciprocal_basis,
            frame_arrays(setup, frames, size, n_w),
            thickness[frames],
            jnp.asarray(orientation_corrections)[frames],
            config,
        )
        outputs.append(jnp.pad(out, ((0, 0), (0, 0), (0, setup.hkl.shape[1] - size))))
    order = np.argsort(np.concatenate([frames for frames, _, _ in bucket_layout(setup)]))
    return jnp.concatenate(outputs, axis=0)[order]


def bucket_layout(setup: FrameSetup) -> list[tuple[np.ndarray, int, int | None]]:
    """(frame positions, padded beam count, padded weak-beam count) of each bucket."""
    buckets = setup.buckets or (np.arange(setup.n_frames),)
    sizes = setup.bucket_sizes or (setup.hkl.shape[1],)
    weak_sizes = setup.weak_sizes or (None,) * len(sizes)
    return list(zip(buckets, sizes, weak_sizes, strict=True))


def stack_config(
    setup: FrameSetup,
    absorbing: bool,
    absorption_method: bloch.AbsorptionMethod = "eig",
    solve_dtype: Any = None,
    batch_size: int = 8,
    remat: Remat = False,
    devices: int = 1,
) -> StackConfig:
    """The :class:`StackConfig` of ``setup`` with these choices."""
    return StackConfig(
        voltage=float(setup.voltage),
        absorbing=bool(absorbing),
        absorption_method=absorption_method,
        solve_dtype=None if solve_dtype is None else jnp.dtype(solve_dtype).name,
        bethe_terms=setup.settings.get("bethe_terms"),
        batch_size=int(batch_size),
        remat=remat,
        devices=int(devices),
    )


def reflection_intensities(setup: FrameSetup, frame_stack: jax.Array) -> jax.Array:
    """Each observed reflection's intensity from (n_f, n) frame intensities; 0 if unsimulated."""
    beam = jnp.maximum(jnp.asarray(setup.refl_beam), 0)
    values = frame_stack[jnp.asarray(setup.refl_frame), beam]
    return jnp.where(jnp.asarray(setup.refl_beam) >= 0, values, 0.0)
