"""The memory planner: bytes per chunk of frames, chosen before any heavy work.

A refinement step streams its frames chunk by chunk (``edkit.refine.core``), so its peak is the
fixed part (the runtime, the data, the set-up's beam tables, F and its cotangent) plus the
working set of one chunk's value and gradient. That working set is modelled per frame from its
padded beam count n, weak-beam count n_w, sub-orientations n_s, thickness nodes n_t, the
solve's element size and what the backward pass keeps (``remat``):

* kept for the gradient per sub-orientation: about ``FULL_BYTES`` per n² (everything: the
  matrix, its eigenvectors, the Daleckii–Krein factors), or n² + n elements (eigensystems only);
* transient while a rematerialised (sub-)batch is solved: about ``WORK_BYTES`` per n² per solve;
* the Bethe tables: U and U' between strong and weak beams, 2·n·n_w complex per frame, and
  ``bethe_terms`` n² correction matrices.

The coefficients were measured with XLA's own buffer assignment of the compiled chunk
(``compiled.memory_analysis()``; ``tests/test_planner.py`` checks the model against it) and the
whole-process peak against ``benchmarks/large.py``.
"""

import math
import os
from dataclasses import dataclass
from typing import Any

from edkit.cores import devices_for
from edkit.errors import EdkitError
from edkit.simulate.setup import FrameSetup
from edkit.simulate.stack import Remat, bucket_layout, sub_batch_size

#: Bytes per n² per solve (double precision) of a frame's value and gradient when the backward
#: pass keeps everything: 155–190 measured (real and complex solves alike; a real solve's
#: propagation is still complex).
FULL_BYTES = 190.0
#: Bytes per n² per solve alive while a rematerialised (sub-)batch is solved: 180–225 measured.
WORK_BYTES = 210.0
#: Bytes per tail element (m solved × n_o left-out beams, ``segment_tails``) per solve, kept or
#: transient like the n² terms: 500 measured (XLA's buffers for a quartz frame in 4 runs, 27.1 MB
#: with tails against 8.7 MB without; m 32, n_o 24, 48 sub-orientations).
TAIL_BYTES = 500.0
#: Bytes of the process before any data (Python, JAX runtime, compiled code).
RUNTIME_BYTES = 0.6e9
#: Fraction of the available memory the default budget takes.
DEFAULT_FRACTION = 0.7
#: A chunk's working set is kept below this (when the budget allows more): beyond a few frames
#: per chunk nothing is gained in speed, and a lean step leaves room for the rest of the session.
CHUNK_TARGET_BYTES = 1.0e9
#: A problem whose whole step (every frame's working set) stays below this runs all its chunks in
#: one compiled program: XLA then overlaps independent chunks (about 5 % faster on real quartz).
FUSE_BYTES = 2.0e9


def available_memory() -> float:
    """Memory this process may use, bytes: MemAvailable, capped by a cgroup limit if any."""
    available = math.inf
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = float(line.split()[1]) * 1024.0
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                text = handle.read().strip()
            if text.isdigit():
                available = min(available, float(text))
        except OSError:
            continue
    if not math.isfinite(available):
        available = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return available


#: ``precision="auto"`` (the default) takes the gradient steps with single-precision
#: (complex64) solves, and the least squares and s.u.'s too where the largest solve has this many
#: beams or more (in double below, where they are cheap). Measured 2026-12-05 (idle 2-core CPU,
#: ``benchmarks/large.py --case cspbbr3 --frames 6 --methods real,real-single``, 827 beams per
#: solve): an epoch 37.5 s against 54.7 s (1.46×), peak 2.4 GB against 3.5 GB, and the scored
#: intensities within 0.0005 % (Σ|ΔI|/ΣI) of double's; real quartz (56 beams,
#: ``benchmarks/refine.py --methods shared,shared-double``, 2026-12-06): 0.989 s against 1.218 s.
AUTO_SINGLE_BEAMS = 400


@dataclass(frozen=True)
class MemoryPlan:
    """The planner's choice and its estimate (bytes).

    Attributes:
      chunk_frames: frames per streamed chunk. remat: what the backward pass keeps.
      budget_bytes: the budget planned for. fixed_bytes: the part independent of the chunk
      size. frame_bytes: working set per frame of the largest bucket (value and gradient).
      batch_bytes: transient working set of one solved batch. peak_bytes: the estimated
      whole-process peak of a step. n_chunks: chunks per step. largest: (n, n_w, n_s) of the
      largest bucket. fused: every chunk in one compiled program (small problems).
      devices: devices each chunk's frames are sharded over. precision: the gradient steps'
      solves ("double" or "single"; see :data:`AUTO_SINGLE_BEAMS` for "auto").
      polish_precision: the least squares' and s.u.'s solves (the memory is planned for them,
        never below the steps').
    """

    chunk_frames: int
    remat: Remat
    budget_bytes: float
    fixed_bytes: float
    frame_bytes: float
    batch_bytes: float
    peak_bytes: float
    n_chunks: int
    largest: tuple[int, int, int]
    fused: bool = False
    devices: int = 1
    precision: str = "double"
    polish_precision: str = "double"

    def describe(self) -> str:
        """One line for logs and reports."""
        n, n_w, n_s = self.largest
        mode = "one program" if self.fused else "streamed"
        if self.devices > 1:
            mode += f", sharded over {self.devices} devices"
        if self.precision == "single":
            mode += ", complex64 solves"
            if self.polish_precision == "double":
                mode += " (complex128 in least squares)"
        return (
            f"memory plan: {self.chunk_frames} frame(s) per chunk ({self.n_chunks} chunks, "
            f"{mode}), "
            f"remat={self.remat!r}, estimated peak {self.peak_bytes / 1e9:.2f} GB of a "
            f"{self.budget_bytes / 1e9:.2f} GB budget (largest frame {n} beams + {n_w} Bethe, "
            f"{n_s} sub-orientations: {self.frame_bytes / 1e6:.0f} MB)"
        )


def element_bytes(real: bool, single: bool) -> int:
    """Bytes of one matrix element of the Bloch solves."""
    return (4 if single else 8) * (1 if real else 2)


def frame_bytes(
    n: int,
    n_w: int,
    n_sub: int,
    n_t: int,
    *,
    real: bool,
    single: bool,
    remat: Remat,
    bethe_terms: int | None,
    sub_batch: int | None,
    tail: int = 0,
) -> tuple[float, float]:
    """(kept, transient) bytes of one frame's value and gradient (see the module docstring).

    ``kept`` stays for the whole chunk (per frame); ``transient`` is alive while one frame of a
    vectorised batch is solved (multiply by the frames solved together). ``tail``: tail elements
    m·n_o per solve (runs with tails), counted at :data:`TAIL_BYTES` as n² is at FULL_BYTES.
    """
    scale = 0.5 if single else 1.0
    e = element_bytes(real, single)
    per_solve = n * n + n * n_t + tail * TAIL_BYTES / FULL_BYTES
    bethe = 2.0 * n * n_w * 16 * 3 + (bethe_terms or 0) * n * n * e * 2
    kept: float
    if sub_batch is not None:  # sub-orientation chunks keep only their eigensystems
        kept = n_sub * (n * n + n) * e
        transient = sub_batch * WORK_BYTES * scale * per_solve
    elif remat is True:
        kept = 0.0
        transient = n_sub * FULL_BYTES * scale * per_solve
    elif remat == "eigensystems":
        kept = n_sub * (n * n + n) * e
        transient = n_sub * WORK_BYTES * scale * per_solve
    else:
        kept = n_sub * FULL_BYTES * scale * per_solve
        transient = 0.0
    return kept + bethe, transient


def setup_bytes(setup: FrameSetup) -> float:
    """Host and device copies of the set-up's beam tables and the F-sized arrays."""
    tables = setup.coupling.nbytes + setup.hkl.nbytes
    if setup.coupling_out is not None and setup.coupling_in is not None:
        tables += setup.coupling_out.nbytes + setup.coupling_in.nbytes
    if setup.segments is not None:
        runs = setup.segments
        tables += sum(
            x.nbytes
            for x in (
                runs.beam,
                runs.coupling,
                runs.weak_hkl,
                runs.coupling_out,
                runs.coupling_in,
                runs.tail,
            )
            if x is not None
        )
    f_arrays = setup.differences.shape[0] * (16 * 8 + 24)  # F, its cotangents, tangents, hkl
    return 2.0 * tables + f_arrays


def plan_memory(
    setup: FrameSetup,
    *,
    devices: int | None = 1,
    **options: Any,
) -> MemoryPlan:
    """:func:`plan_for_devices` for ``devices`` devices, or with None for
    :func:`edkit.cores.devices_for` devices (one per CPU core), fewer while a chunk of one frame
    per device does not fit the budget; ``options`` as there.

    Raises:
      EdkitError: one frame alone does not fit, naming the bytes needed and what to change.
    """
    if devices is not None:
        return plan_for_devices(setup, devices=devices, **options)
    count = devices_for(setup.n_frames, options.get("chunk_frames"))
    while True:
        try:
            return plan_for_devices(setup, devices=count, **options)
        except EdkitError:
            if count == 1:
                raise
            count -= 1


def plan_for_devices(
    setup: FrameSetup,
    *,
    n_t: int = 2,
    precision: str = "double",
    remat: Remat | None = None,
    chunk_frames: int | None = None,
    batch_size: int = 8,
    memory_limit: float | None = None,
    n_parameters: int = 0,
    devices: int = 1,
) -> MemoryPlan:
    """Choose frames per chunk (and ``remat`` when None) so that a step fits the budget.

    Args:
      setup: the frame set-up (beam counts per bucket).
      n_t: thickness nodes per frame.
      precision: "double" or "single" solves, or "auto": single in the gradient steps, and in
        the least squares where the largest solve has :data:`AUTO_SINGLE_BEAMS` beams or more.
      remat, chunk_frames: fixed choices, or None to choose.
      batch_size: frames vectorised together.
      memory_limit: the budget, bytes; None: ``DEFAULT_FRACTION`` of :func:`available_memory`.
      n_parameters: size of the LM normal matrix side (its n_par² is negligible otherwise).
      devices: frames of a chunk are sharded over this many devices, so a chunk holds a
        multiple of it (on CPU the forced devices share one memory, as planned here).

    Raises:
      EdkitError: one frame alone does not fit, naming the bytes needed and what to change.
    """
    budget = float(memory_limit) if memory_limit else DEFAULT_FRACTION * available_memory()
    real = bool(setup.settings.get("centric", False))
    n_sub = int(setup.angles.shape[1])
    bethe_terms = setup.settings.get("bethe_terms")
    fixed = RUNTIME_BYTES + setup_bytes(setup) + 8.0 * n_parameters**2
    layout = bucket_layout(setup)
    runs = setup.segments
    tails = [0] * len(layout)  # m·n_o per solve of each bucket
    if runs is not None and runs.tail is not None:
        tails = [m * n_o for m, n_o in zip(runs.sizes, runs.tail_sizes, strict=True)]
    largest_index = max(
        range(len(layout)),
        key=lambda i: layout[i][1] ** 2 + 2 * layout[i][1] * (layout[i][2] or 0) + tails[i],
    )
    _, n, n_w = layout[largest_index]
    n_w = int(n_w or 0)
    # The memory is planned for the least squares' solves: double unless they too are single.
    single = precision == "single" or (precision == "auto" and n >= AUTO_SINGLE_BEAMS)

    def per_frame(choice: Remat, frames: int) -> tuple[float, float]:
        sub_batch = sub_batch_size(frames, n, n_sub, batch_size)
        kept, transient = frame_bytes(
            n, n_w, n_sub, n_t, real=real, single=single, remat=choice,
            bethe_terms=bethe_terms, sub_batch=sub_batch, tail=tails[largest_index],
        )  # fmt: skip
        return kept, transient * min(batch_size, frames)

    choices: list[Remat] = [remat] if remat is not None else [False, "eigensystems", True]
    n_frames = setup.n_frames
    best = None
    for choice in choices:
        if chunk_frames is not None:
            kept, batch = per_frame(choice, chunk_frames)
            c = chunk_frames
        else:
            c = 0
            for candidate in sorted({1, 2, 4, 8, 16, 32, min(64, n_frames)}):
                if candidate > n_frames:
                    break
                kept, batch = per_frame(choice, candidate)
                working = candidate * kept + batch
                if fixed + working <= budget and (working <= CHUNK_TARGET_BYTES or candidate == 1):
                    c = candidate
            if c == 0:  # not even one frame fits: remember the leanest choice for the message
                kept, batch = per_frame(choice, 1)
                best = (choice, 1, kept, batch)
                continue
            kept, batch = per_frame(choice, c)
        best = (choice, c, kept, batch)
        if fixed + c * kept + batch <= budget or remat is not None:
            break
    assert best is not None
    choice, c, kept, batch = best
    if devices > 1 and chunk_frames is None:
        c = -(-c // devices) * devices
    peak = fixed + c * kept + batch
    n_chunks = sum(-(-len(frames) // c) for frames, _, _ in layout)
    whole = 0.0  # every frame's working set at its own bucket's size
    for (frames, size, weak), tail in zip(layout, tails, strict=True):
        sub_batch = sub_batch_size(min(c, len(frames)), size, n_sub, batch_size)
        k, t = frame_bytes(
            size, int(weak or 0), n_sub, n_t, real=real, single=single, remat=choice,
            bethe_terms=bethe_terms, sub_batch=sub_batch, tail=tail,
        )  # fmt: skip
        whole += len(frames) * k + min(batch_size, len(frames)) * t
    fused = chunk_frames is None and whole <= FUSE_BYTES and fixed + whole <= budget
    if fused:
        peak = fixed + whole
    plan = MemoryPlan(
        chunk_frames=int(c), remat=choice, budget_bytes=budget, fixed_bytes=fixed,
        frame_bytes=kept + batch / max(1, min(batch_size, c)), batch_bytes=batch,
        peak_bytes=peak, n_chunks=int(n_chunks), largest=(int(n), n_w, n_sub), fused=fused,
        devices=int(devices), precision="double" if precision == "double" else "single",
        polish_precision="single" if single else "double",
    )  # fmt: skip
    if peak > budget:
        raise EdkitError(
            f"a refinement step needs about {peak / 1e9:.2f} GB (one frame of {n} beams + "
            f"{n_w} Bethe beams × {n_sub} sub-orientations: {(kept + batch) / 1e9:.2f} GB; "
            f"fixed {fixed / 1e9:.2f} GB) but the memory budget is {budget / 1e9:.2f} GB. "
            "Lower g_max, sg_max or sg_weak (fewer beams), use precision='single', or raise "
            "memory_limit"
        )
    return plan
