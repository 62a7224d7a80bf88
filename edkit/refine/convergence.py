"""When to stop the Adam steps: the best loss has stopped falling.

Adam's loss is noisy from step to step, so the test looks at the *best* loss: the run has
converged when the best loss of the last ``window`` steps is less than a fraction ``tolerance``
below the best loss before them. The steps of a warm-up (after a start, a new start of the
thickness model or a least-squares round: the structure held, the learning rates ramped) are
not "before": there Adam's fresh moments push the loss up for a while, and measured against
the start's own loss a stage that was still falling fast looked converged (the paper's
synthetic quartz, 10 frames, after the thickness model's new start: stopped 20 steps in,
falling 10 % a step, 0.004 Å off; judged after the warm-up: 0.0017 Å). The structure's own
convergence (max shift/s.u., as Jana and SHELX judge it) belongs to the least squares that
follows (:func:`edkit.refine.lm.levenberg_marquardt`). A best loss that stopped falling while
the loss still moves (Adam's transient bumps: the last ``window`` losses spread over more than
``spread`` of their lowest) is not a plateau, and the stage goes on: on the real quartz demo
both stages that a new thickness start began were stopped in such a bump, 4–6 % above their
best and before they came back to the earlier best (2026-12-06). The test reads only the
refinement's recorded losses (and the warm-up's steps), so a run resumed from a checkpoint
stops at the same step as an uninterrupted one.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edkit.errors import EdkitError

#: The step limit of a run that stops on convergence (``edkit refine`` without ``--steps``).
MAX_STEPS = 300


@dataclass(frozen=True)
class Convergence:
    """The Adam stage's stopping rule.

    Args:
      window: steps over which the best loss must keep falling.
      tolerance: the relative fall of the best loss over ``window`` steps below which the run
        has converged (1e-3: 0.1 %).
      min_steps: never stop before this many steps of the stage.
      spread: the last ``window`` losses spread over more than this fraction of their lowest
        are a bump, not a plateau: no convergence then (the stage's step limit still holds).
    """

    window: int = 10
    tolerance: float = 1e-3
    min_steps: int = 20
    spread: float = 0.01

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window >= 1):
            raise EdkitError(f"Convergence window = {self.window!r}: expected an integer ≥ 1")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise EdkitError(f"Convergence tolerance = {self.tolerance!r}: expected ≥ 0")
        if not (isinstance(self.min_steps, int) and self.min_steps >= 0):
            raise EdkitError(f"Convergence min_steps = {self.min_steps!r}: expected ≥ 0")
        if not self.spread >= 0:  # inf: no bump rule
            raise EdkitError(f"Convergence spread = {self.spread!r}: expected ≥ 0")

    def reason(
        self, losses: Sequence[float], settle: int = 0, *, validation: bool = False
    ) -> str | None:
        """Why the stage whose recorded losses (oldest first) are ``losses`` has converged, or
        None while it has not. The first ``settle`` losses are a warm-up's: they count towards
        ``min_steps`` but are not compared with. ``validation``: the losses are a validation
        set's, whose rise is overfitting, so it stops the stage as a plateau does."""
        settle = max(int(settle), 0)
        if len(losses) < max(self.min_steps, settle + self.window + 1):
            return None
        earlier = losses[settle : -self.window]
        before = min((v for v in earlier if math.isfinite(v)), default=math.inf)
        recent = min((v for v in losses[-self.window :] if math.isfinite(v)), default=math.inf)
        if not math.isfinite(before):
            return None
        fall = (before - recent) / before if before > 0 else 0.0
        last = [v for v in losses[-self.window :] if math.isfinite(v)]
        if last and not validation and max(last) - recent > self.spread * abs(recent):
            return None  # still moving: a bump, not a plateau
        if fall < self.tolerance:
            return (
                f"converged: the best loss fell {100 * max(fall, 0.0):.3g} % over the last "
                f"{self.window} steps (< {100 * self.tolerance:g} %)"
            )
        return None
