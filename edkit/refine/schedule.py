"""A refinement run as a schedule of stages that checkpoints itself and resumes: ``edkit refine``.

The schedule is what the command line runs: Adam steps (then the best state), and rounds of
Levenberg–Marquardt, each followed by polishing Adam steps (then the best state). A
:class:`Position` (stage, steps done in it) says where a run is; a :class:`Checkpointer` writes
the refinement with its schedule and position into ``OUT/checkpoints`` (atomically, see
:mod:`edkit.refine.checkpoint`) every N steps or every few minutes, at the end of every stage and
when asked to stop. :func:`run_schedule` continues from any position: a resumed run takes the
same steps on the same state as an uninterrupted one, so on CPU it ends bit-identical.
"""

import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edkit.errors import EdkitError
from edkit.refine import checkpoint
from edkit.refine.estimate import format_duration

if TYPE_CHECKING:
    from edkit.refine.refinement import Refinement

#: The default checkpoint interval of a run without ``every_steps``: about 5 minutes of work.
CHECKPOINT_SECONDS = 300.0


@dataclass(frozen=True)
class Stage:
    """One stage: ``size`` Adam steps (then the best state is made current), one
    Levenberg–Marquardt round of ``size`` iterations, or the thickness search again from the
    refined structure (``size`` 0; :mod:`edkit.refine.research`)."""

    kind: Literal["steps", "lm", "search"]
    size: int
    #: A steps stage that ends early once converged (``size`` is then its limit).
    until_converged: bool = False


@dataclass(frozen=True)
class Schedule:
    """Adam ``steps``; ``searches`` × (the thickness search again, Adam ``steps``); then
    ``lm_rounds`` × (LM of ``lm_iterations``, ``polish_steps`` steps).

    With ``until_converged`` the Adam stages before LM stop once converged
    (:class:`~edkit.refine.convergence.Convergence`), ``steps`` being each one's limit. A search
    that finds the refined thickness standing skips the searches and steps before LM."""

    steps: int
    lm_rounds: int = 0
    lm_iterations: int = 4
    polish_steps: int = 0
    until_converged: bool = False
    searches: int = 0

    def stages(self) -> tuple[Stage, ...]:
        """The stages in order (without searches, as ``edkit refine`` has always run them)."""
        stages = [Stage("steps", self.steps, self.until_converged)]
        for _ in range(self.searches):
            stages += [Stage("search", 0), Stage("steps", self.steps, self.until_converged)]
        for _ in range(self.lm_rounds):
            stages.append(Stage("lm", self.lm_iterations))
            if self.polish_steps:
                stages.append(Stage("steps", self.polish_steps))
        return tuple(stages)

    def steps_left(self, position: "Position") -> int:
        """Adam steps still to take from ``position`` (LM rounds not counted)."""
        stages = self.stages()
        left = sum(s.size for s in stages[position.stage :] if s.kind == "steps")
        if position.stage < len(stages) and stages[position.stage].kind == "steps":
            left -= position.done
        return left


@dataclass(frozen=True)
class Position:
    """Where a run is: the stage now running (``len(stages)``: all done) and its steps done."""

    stage: int = 0
    done: int = 0


def from_run(run: dict[str, Any], path: Path) -> tuple[Schedule, Position]:
    """The schedule and position of a checkpoint's ``run.json`` (EdkitError naming ``path``)."""
    try:
        fields: dict[str, Any] = {
            k: bool(v) if k == "until_converged" else int(v) for k, v in run["schedule"].items()
        }
        schedule = Schedule(**fields)
        position = Position(**{k: int(v) for k, v in run["position"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise EdkitError(f"{path}: corrupted checkpoint (schedule or position: {error})") from None
    if not 0 <= position.stage <= len(schedule.stages()):
        raise EdkitError(f"{path}: corrupted checkpoint (stage {position.stage} of no schedule)")
    return schedule, position


class Checkpointer:
    """Writes a run's checkpoints into ``out/checkpoints``.

    Args:
      out: the output folder.
      every_steps: a checkpoint after every step whose step count is a multiple of it (0: only
        at the ends of stages and on a stop); None: every ``every_seconds`` of work.
      every_seconds: the interval without ``every_steps``.
      describe: more JSON for ``run.json`` (input paths, wall time), asked at each write.
      on_write: called with each new checkpoint's folder (e.g. to print it).
    """

    def __init__(
        self,
        out: Path,
        every_steps: int | None = None,
        every_seconds: float = CHECKPOINT_SECONDS,
        describe: Callable[[], dict[str, Any]] = dict,
        on_write: Callable[[Path], Any] | None = None,
    ) -> None:
        self.out, self.every_steps, self.every_seconds = out, every_steps, every_seconds
        self.describe, self.on_write = describe, on_write
        self.last: Path | None = None
        self._last_key: tuple[int, int, int] | None = None
        self._since = time.monotonic()

    def due(self, refinement: "Refinement") -> bool:
        """Whether a periodic checkpoint is due after the step just taken."""
        if self.every_steps is None:
            return time.monotonic() - self._since >= self.every_seconds
        return self.every_steps > 0 and refinement.step_count % self.every_steps == 0

    def write(self, refinement: "Refinement", schedule: Schedule, position: Position) -> Path:
        """A checkpoint at ``position`` (none if the last one already is there); its folder."""
        key = (position.stage, position.done, refinement.step_count)
        if key == self._last_key and self.last is not None:
            return self.last
        run = {
            **self.describe(),
            "schedule": dataclasses.asdict(schedule),
            "position": dataclasses.asdict(position),
        }
        self.last = checkpoint.write_series(refinement, self.out, run)
        self._last_key, self._since = key, time.monotonic()
        if self.on_write is not None:
            self.on_write(self.last)
        return self.last


@dataclass(frozen=True)
class Outcome:
    """How :func:`run_schedule` ended: where, whether stopped early, the last checkpoint."""

    position: Position
    stopped: bool
    checkpoint: Path | None


def run_schedule(
    refinement: "Refinement",
    schedule: Schedule,
    checkpointer: Checkpointer,
    position: Position = Position(),
    *,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
    on_step: Callable[["Refinement", dict[str, float], int], Any] | None = None,
) -> Outcome:
    """Run ``schedule`` from ``position`` with checkpoints (see the module docstring).

    ``on_step(refinement, record, steps_left)`` is called after every Adam step. When ``stop()``
    turns true the run ends after the current step or LM round, writes a checkpoint and returns
    with ``stopped`` set.
    """
    stages = schedule.stages()
    while position.stage < len(stages):
        index, stage = position.stage, stages[position.stage]
        following = index + 1
        if stage.kind == "lm":
            refinement.refine_structure(stage.size)
        elif stage.kind == "search":
            if not refinement.search_thickness_again(progress=progress):
                # the thickness stands: on to the first stage after the searches
                following = next(
                    (j for j in range(index, len(stages)) if stages[j].kind == "lm"), len(stages)
                )
        else:
            done, stopped = _steps(refinement, schedule, checkpointer, position, stage,
                                   progress, stop, on_step)  # fmt: skip
            if stopped:
                return _stopped(refinement, schedule, checkpointer, Position(index, done))
            refinement.use_best()
        position = Position(following, 0)
        checkpointer.write(refinement, schedule, position)
        if stop():  # also after the last stage: the outputs are left to the resumed run
            return Outcome(position, True, checkpointer.last)
    return Outcome(position, False, checkpointer.last)


def _steps(
    refinement: "Refinement",
    schedule: Schedule,
    checkpointer: Checkpointer,
    position: Position,
    stage: Stage,
    progress: bool,
    stop: Callable[[], bool],
    on_step: Callable[["Refinement", dict[str, float], int], Any] | None,
) -> tuple[int, bool]:
    """The rest of a steps stage; returns the steps done in it and whether ``stop()`` ended
    it early (convergence ends it early too, but complete)."""
    # Steps of this stage = the step count since it began, also across a resume.
    began = refinement.step_count - position.done
    stopped = False

    def after_step(r: "Refinement", record: dict[str, float]) -> bool:
        nonlocal stopped
        at = Position(position.stage, r.step_count - began)
        if on_step is not None:
            on_step(r, record, schedule.steps_left(at))
        # The stage's last step is followed by the stage's own checkpoint.
        if at.done < stage.size and checkpointer.due(r):
            checkpointer.write(r, schedule, at)
        stopped = stop() and at.done < stage.size
        return not stopped

    refinement.run(
        stage.size - position.done, after_step, progress=progress,
        until_converged=stage.until_converged, since_step=began,
    )  # fmt: skip
    return refinement.step_count - began, stopped


def _stopped(
    refinement: "Refinement", schedule: Schedule, checkpointer: Checkpointer, position: Position
) -> Outcome:
    return Outcome(position, True, checkpointer.write(refinement, schedule, position))


class StepTimeEstimate:
    """Prints the time the remaining Adam steps will take, from the measured step times: after
    this process's first step (which includes compiling the step, so an upper bound) and again
    after its second (compiled: the rate to expect)."""

    def __init__(
        self, refinement: Any, say: Callable[[str], None] = print, *, at_most: bool = False
    ) -> None:
        self.seconds, self.steps, self.say = refinement.seconds, 0, say
        #: The steps left are a limit (a run until converged), not a count.
        self.at_most = at_most

    def __call__(self, refinement: Any, record: dict[str, float], left: int) -> None:
        self.steps += 1
        took, self.seconds = refinement.seconds - self.seconds, refinement.seconds
        if self.steps > 2 or left == 0:
            return
        basis = (
            "it includes compiling the step, so this is an upper bound"
            if self.steps == 1
            else "a compiled step's time"
        )
        limit = "at most " if self.at_most else ""
        self.say(
            f"step {refinement.step_count} took {format_duration(took)}; at that rate the {limit}"
            f"{left} Adam step(s) left take {limit}about {format_duration(left * took)} ({basis}; "
            "Levenberg–Marquardt rounds and checkpoints not included)"
        )


class DeferredInterrupt:
    """SIGINT (Ctrl-C) asks the run to stop after the current step and write a checkpoint; a
    second one stops at once (KeyboardInterrupt; the previous checkpoint stays usable).

    Deferred because a step interrupted half-way leaves no consistent state to save.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():  # signals: main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nedkit: interrupted: finishing the current step (or Levenberg–Marquardt round) "
            "to write a checkpoint; press Ctrl-C again to stop at once without one",
            file=sys.stderr,
            flush=True,
        )
