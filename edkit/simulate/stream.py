"""Streaming the frame stack: chunks of frames through one compiled kernel per chunk shape.

The set-up's arrays are arguments of the compiled :func:`~edkit.simulate.stack.stack_frames`,
not compile-time constants, so every chunk of the same shape, every dataset of the same sizes
and every caller (simulations, the thickness grid search, the refinement core) share the code;
memory is that of one chunk.
"""

from collections.abc import Callable

import jax
import numpy as np

from edkit.cores import devices_for
from edkit.physics import bloch
from edkit.physics.structure import StructureParams, StructureTables
from edkit.simulate.setup import FrameSetup
from edkit.simulate.stack import (
    bucket_layout,
    frame_arrays,
    potentials,
    stack_config,
    stack_frames,
)

#: One compiled kernel per (chunk shape, config), shared by every caller: the set-up's arrays are
#: arguments, not compile-time constants, so other datasets of the same shapes reuse the code.
stack_frames_jit = jax.jit(stack_frames, static_argnums=(5,))
potentials_jit = jax.jit(potentials, static_argnums=(3, 5))


def chunk_layout(setup: FrameSetup, chunk_frames: int) -> list[tuple[np.ndarray, int, int | None]]:
    """Frames in chunks of at most ``chunk_frames`` (balanced within each bucket, so a bucket's
    chunks differ in length by at most one frame and need at most two compiled shapes)."""
    chunks = []
    for frames, size, n_w in bucket_layout(setup):
        n_chunks = -(-len(frames) // max(1, chunk_frames))
        chunks += [(part, size, n_w) for part in np.array_split(frames, n_chunks)]
    return chunks


def stream_frames(
    params: StructureParams,
    tables: StructureTables,
    setup: FrameSetup,
    thickness: np.ndarray,
    *,
    absorption: float | None = None,
    absorption_method: bloch.AbsorptionMethod = "eig",
    chunk_frames: int = 8,
    reduce: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    devices: int | None = None,
) -> np.ndarray:
    """Forward-only :func:`frame_intensity_stack`, streamed chunk by chunk of frames.

    Memory is that of one chunk of ``chunk_frames`` frames (plus the result); the kernel is
    compiled once per chunk shape and shared by every call. Call inside ``jax.enable_x64(True)``.

    Args:
      params, tables, setup, absorption, absorption_method: as for
        :func:`frame_intensity_stack`.
      thickness: Å, (n_f, n_t).
      chunk_frames: frames per chunk.
      reduce: ``reduce(frames, stack)`` maps each chunk's (c, n_t, n) intensities to a smaller
        per-frame result (c, ...) kept instead of the stack (e.g. reflections only).
      devices: each chunk's frames are sharded over this many devices; None: every local
        device (:func:`edkit.cores.devices_for`, one per CPU core, a divisor of ``chunk_frames``).

    Returns:
      (n_f, n_t, n) intensities (zero on padding beams), or the stacked ``reduce`` results.
    """
    real = bool(setup.settings.get("centric", False))
    kappa = None if absorption is None else float(absorption)
    pot = potentials_jit(params, tables, setup.differences, float(setup.voltage), kappa, real)
    if devices is None:
        devices = devices_for(setup.n_frames, chunk_frames)
    config = stack_config(
        setup, absorption is not None, absorption_method, devices=max(1, int(devices))
    )
    thickness = np.asarray(thickness)
    zeros = np.zeros((setup.n_frames, 3))
    parts, order = [], []
    for frames, size, n_w in chunk_layout(setup, chunk_frames):
        out = stack_frames_jit(
            pot,
            tables.reciprocal_basis,
            frame_arrays(setup, frames, size, n_w),
            thickness[frames],
            zeros[frames],
            config,
        )
        out = np.asarray(out)
        if reduce is None:
            out = np.pad(out, ((0, 0), (0, 0), (0, setup.hkl.shape[1] - size)))
        else:
            out = reduce(frames, out)
        parts.append(out)
        order.append(frames)
    result = np.concatenate(parts, axis=0)
    return result[np.argsort(np.concatenate(order))]
