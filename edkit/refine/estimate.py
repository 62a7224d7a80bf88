"""A time estimate before any solve: the cost of a refinement is its eigendecompositions.

An epoch solves every sub-orientation of every frame once forward and pays about as much again
for the gradient; the thickness search solves each once. So timing one ``numpy.linalg.eigh`` of
each padded beam count of the set-up (real symmetric for centrosymmetric crystals, complex
Hermitian otherwise) on this machine, times the number of solves, gives the order of magnitude
before the first step — what ``edkit validate`` and ``edkit refine`` print. ``EPOCH_FACTOR``
is the measured ratio of an epoch to its eigendecompositions (``benchmarks/large.py``:
CsPbBr₃-sized frames, 827 beams, 64.1 s per epoch for 6 frames × 60 solves; quartz's small
solves pay relatively more around them); the estimate is good to a factor of about two.
"""

import time
from dataclasses import dataclass

import numpy as np

from edkit.simulate.setup import FrameSetup
from edkit.simulate.stack import bucket_layout

#: An epoch (loss and gradient) over the bare eigendecompositions of its solves.
EPOCH_FACTOR = 2.5


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds of the main phases, estimated from timed eigendecompositions.

    Attributes:
      solves: eigendecompositions per epoch (frames × sub-orientations × runs).
      eigh_seconds: their total time on this machine, s.
      epoch_seconds: one Adam step (loss and gradient), s.
      search_seconds: one thickness search, s.
    """

    solves: int
    eigh_seconds: float
    epoch_seconds: float
    search_seconds: float

    def describe(self, steps: int | None = None) -> str:
        text = (
            f"time estimate (±2×, from timed eigendecompositions): {self.solves} solves, "
            f"an Adam step ≈ {format_duration(self.epoch_seconds)}, a thickness search ≈ "
            f"{format_duration(self.search_seconds)}"
        )
        if steps:
            text += f"; {steps} steps ≈ {format_duration(steps * self.epoch_seconds)}"
        return text


def format_duration(seconds: float) -> str:
    """A duration for people: "4.2 s", "95 s", "12.5 min", "3.1 h"."""
    if seconds < 120:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _eigh_seconds(n: int, real: bool, repeats: int = 3, devices: int = 1) -> float:
    """Best of ``repeats`` timed ``eigh`` of a random n × n symmetric/Hermitian matrix, s; with
    several devices one single-threaded solve (as each device runs its own, edkit.cores)
    divided by their number."""
    if devices > 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return _eigh_seconds(n, real, repeats) / devices
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, n))
    if not real:
        a = a + 1j * rng.normal(size=(n, n))
    a = a + a.conj().T
    best = float("inf")
    for _ in range(repeats if n < 600 else 1):
        start = time.perf_counter()
        np.linalg.eigh(a)
        best = min(best, time.perf_counter() - start)
    return best


def estimate_time(setup: FrameSetup, devices: int = 1) -> TimeEstimate:
    """Estimate an epoch and a thickness search of ``setup`` (a fraction of a second to time),
    with the frames sharded over ``devices`` devices (a refinement's ``memory_plan.devices``).

    The solve size is each bucket's padded beam count, or with segments each bucket's padded
    run size (:class:`~edkit.simulate.segments.SegmentTables`); the search solves the frames'
    own beams.
    """
    real = bool(setup.settings.get("centric", False))
    n_sub = int(setup.angles.shape[1])
    runs = setup.segments
    timed: dict[int, float] = {}

    def eigh(n: int) -> float:
        if n not in timed:
            timed[n] = _eigh_seconds(n, real, devices=devices)
        return timed[n]

    epoch = search = 0.0
    solves = 0
    for position, (frames, size, _) in enumerate(bucket_layout(setup)):
        search += len(frames) * n_sub * eigh(size)
        if runs is None:
            epoch += len(frames) * n_sub * eigh(size)
        else:  # n_sub / S solves per run, S runs
            epoch += len(frames) * n_sub * eigh(runs.sizes[position])
        solves += len(frames) * n_sub
    return TimeEstimate(solves, epoch, EPOCH_FACTOR * epoch, search)
