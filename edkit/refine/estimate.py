"""A time estimate before any solve: the cost of a refinement is its eigendecompositions.

An epoch solves every sub-orientation of every frame once forward and pays about as much again
for the gradient; the thickness search solves each once. So timing one ``numpy.linalg.eigh`` of
each padded beam count of the set-up (real symmetric for centrosymmetric crystals, complex
Hermitian otherwise) on this machine, times the number of solves, gives the order of magnitude
before the first step — what ``edkit validate`` and ``edkit refine`` print. ``EPOCH_FACTOR``
is the measured ratio of an epoch to its eigendecompositions (``benchmarks/large.py``:
CsPbBr₃-sized frames, 827 beams, 64.1 s per epoch for 6 frames × 60 solves; quartz's small
solves pay relatively more around them); the estimate is good to a factor of about two.

A least-squares iteration (and the s.u.'s, one more) accumulates the normal matrix: one
linearised pass and one tangent pass per free parameter, each tangent pass two matrix products
of the solve's size per solve (Wᴴ dB W, the Daleckii–Krein rule); so it is timed as the solves'
eigendecompositions plus ``n_free`` × ``TANGENT_FACTOR`` × two matrix products.
"""

import time
from dataclasses import dataclass

import numpy as np

from edkit.simulate.setup import FrameSetup
from edkit.simulate.stack import bucket_layout

#: An epoch (loss and gradient) over the bare eigendecompositions of its solves.
EPOCH_FACTOR = 2.5
#: A normal matrix's tangent pass over its two bare matrix products per solve. Measured
#: 2026-12-05 on 2 frames of ``benchmarks/large.py --paper-settings`` (120 real solves of
#: n ≈ 830, 11 parameters, two devices, idle): the normal matrix 64.2 s warm against 37.4 s
#: estimated with 1.0; a forward cost 5.3 s against 5.4 s of bare eigendecompositions.
TANGENT_FACTOR = 1.8
#: A planned run longer than this gets the ways to a quicker first look printed with it, s.
LONG_RUN_SECONDS = 3600.0


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds of the main phases, estimated from timed eigendecompositions and products.

    Attributes:
      solves: eigendecompositions per epoch (frames × sub-orientations × runs).
      eigh_seconds: their total time on this machine, s.
      epoch_seconds: one Adam step (loss and gradient), s.
      search_seconds: one thickness search, s.
      normal_seconds: one normal-matrix accumulation over ``n_free`` parameters, s; 0
        without ``n_free``. A Levenberg–Marquardt iteration is one and a forward pass for the
        trial shift (about ``eigh_seconds``); the s.u.'s take one more.
      n_free: the least-squares parameters it was estimated for (0: none given).
    """

    solves: int
    eigh_seconds: float
    epoch_seconds: float
    search_seconds: float
    normal_seconds: float = 0.0
    n_free: int = 0

    def total(self, steps: int = 0, searches: int = 0, lm_iterations: int = 0) -> float:
        """The most a run of ``steps`` Adam steps, ``searches`` thickness searches and
        ``lm_iterations`` least-squares iterations (then the s.u.'s) takes, s."""
        iteration = self.normal_seconds + self.eigh_seconds
        least_squares = lm_iterations * iteration + self.normal_seconds if self.n_free else 0.0
        return steps * self.epoch_seconds + searches * self.search_seconds + least_squares

    def describe(self, steps: int | None = None, searches: int = 0, lm_iterations: int = 0) -> str:
        """The estimate in words; with a plan (at most ``steps`` Adam steps, ``searches``
        searches, ``lm_iterations`` least-squares iterations) its total, and when that is over
        an hour the ways to a quicker first look."""
        text = (
            f"time estimate (±2×, from timed eigendecompositions and products): {self.solves} "
            f"solves, an Adam step ≈ {format_duration(self.epoch_seconds)}, a thickness search ≈ "
            f"{format_duration(self.search_seconds)}"
        )
        if self.n_free:
            text += (
                f", a least-squares iteration ({self.n_free} parameters) ≈ "
                f"{format_duration(self.normal_seconds + self.eigh_seconds)}"
            )
        lm_iterations = lm_iterations if self.n_free else 0
        if steps or self.n_free:
            total = self.total(steps or 0, searches, lm_iterations)
            parts = {
                f"{steps} Adam step(s)": steps,
                f"{searches} thickness search(es)": searches,
                f"{lm_iterations} least-squares iteration(s)": lm_iterations,
                "the s.u.'s": self.n_free,
            }
            planned = ", ".join(name for name, count in parts.items() if count)
            text += f"; at most {planned} ≈ {format_duration(total)}"
            if total > LONG_RUN_SECONDS:
                text += (
                    ".\nThat is long on this machine. For a first look: --every N (every N-th "
                    "frame), --segments 6 (4–7× cheaper steps, about 3× the intensity error), "
                    "fewer --lm-iterations; or a GPU"
                )
        return text


def format_duration(seconds: float) -> str:
    """A duration for people: "4.2 s", "95 s", "12.5 min", "3.1 h"."""
    if seconds < 120:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _random_matrix(n: int, real: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, n))
    if not real:
        a = a + 1j * rng.normal(size=(n, n))
    return a + a.conj().T


def _best_seconds(function, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats if n < 600 else 1):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _kernel_seconds(
    n: int, real: bool, single: bool = False, repeats: int = 3, devices: int = 1
) -> tuple[float, float]:
    """Best of ``repeats`` timed ``eigh`` and matrix product of a random n × n symmetric/Hermitian
    matrix (float32/complex64 if ``single``), s; with several devices single-threaded (as each
    device runs its own solves, edkit.cores) and divided by their number."""
    if devices > 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            eigh, product = _kernel_seconds(n, real, single, repeats)
        return eigh / devices, product / devices
    a = _random_matrix(n, real)
    if single:
        a = a.astype(np.float32 if real else np.complex64)
    eigh = _best_seconds(lambda: np.linalg.eigh(a), n, repeats)
    product = _best_seconds(lambda: a @ a, n, repeats)
    return eigh, product


def estimate_time(
    setup: FrameSetup,
    devices: int = 1,
    n_free: int = 0,
    precision: str = "double",
    polish_precision: str | None = None,
) -> TimeEstimate:
    """Estimate an epoch, a thickness search and (with ``n_free`` least-squares parameters) a
    least-squares iteration of ``setup`` (a fraction of a second to time), with the frames
    sharded over ``devices`` devices, the steps' solves in ``precision`` and the least
    squares' in ``polish_precision`` (default ``precision``; a refinement's
    ``memory_plan.devices``, ``.precision`` and ``.polish_precision``; the search as timed in
    double, whose solves are single but whose Bethe set-up is not in the timed kernels).

    The solve size is each bucket's padded beam count, or with segments each bucket's padded
    run size (:class:`~edkit.simulate.segments.SegmentTables`) plus its tails' products; the
    search solves the frames' own beams.
    """
    real = bool(setup.settings.get("centric", False))
    n_sub = int(setup.angles.shape[1])
    runs = setup.segments
    timed: dict[tuple[int, bool], tuple[float, float]] = {}

    def kernels(n: int, single: bool = False) -> tuple[float, float]:
        if (n, single) not in timed:
            timed[n, single] = _kernel_seconds(n, real, single, devices=devices)
        return timed[n, single]

    epoch = search = normal = 0.0
    solves = 0
    for position, (frames, size, _) in enumerate(bucket_layout(setup)):
        count = len(frames) * n_sub
        search += count * kernels(size)[0]
        solve = size if runs is None else int(runs.sizes[position])
        # Tails (physics.tails): an (n_o × m)(m × m) product per solve, and per tangent one
        # more m³ product (the eigenvectors' derivative) and another (n_o × m)(m × m).
        tail_ratio = 0.0
        if runs is not None and runs.tail is not None:
            tail_ratio = runs.tail_sizes[position] / solve
        tangent = 2.0 + (1.0 + tail_ratio if tail_ratio else 0.0)
        eigh, product = kernels(solve, precision == "single")
        epoch += count * (eigh + tail_ratio * product)
        eigh, product = kernels(solve, (polish_precision or precision) == "single")
        forward = eigh + tail_ratio * product
        normal += count * (forward + n_free * TANGENT_FACTOR * tangent * product)
        solves += count
    return TimeEstimate(
        solves, epoch, EPOCH_FACTOR * epoch, search, normal if n_free else 0.0, n_free
    )
