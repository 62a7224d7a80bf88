"""``edkit refine`` checkpoints and ``--resume``: killed, interrupted and resumed runs end
bit-identical to an uninterrupted one (on CPU).

The problem is test_cli.py's tiny one (every 33rd frame of the real quartz data, g_max 1.0 Å⁻¹,
n_sub 5) with 10 Adam steps, a checkpoint every 5 and one Levenberg–Marquardt iteration. Each
run is its own process (``python -m edkit.cli`` through a small wrapper, below): an
uninterrupted reference; a run SIGKILLed right after its step-5 checkpoint; a resume of it that
gets SIGINT (Ctrl-C) right after the checkpoint at the end of the Adam steps; and a resume of
that which runs LM and writes the outputs. The wrapper pauses after writing the checkpoint at
``EDKIT_TEST_PAUSE_AT`` (and says so in a marker file) until the test's signal arrives, so that
the signal arrives at a known point; a SIGINT that comes before the pause begins still ends it
(no race on a loaded machine). It changes nothing else.

The processes share a JAX persistent compilation cache in a temporary folder, which makes every
run after the first about 3× faster (the same executables: checked to give bit-identical
results). The stop and resume logic of every stage boundary is tested without JAX on a fake
refinement (``test_schedule_*``).
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from edkit.cli import main
from edkit.refine import checkpoint
from edkit.refine.schedule import Checkpointer, Position, Schedule, from_run, run_schedule

WRAPPER = """
import os, signal, sys, time
from pathlib import Path
from edkit.refine import checkpoint
from edkit.cli import main

pause_at, write = int(os.environ.get("EDKIT_TEST_PAUSE_AT", "-1")), checkpoint.write_series
paused_marker = Path(os.environ.get("EDKIT_TEST_PAUSED_MARKER", os.devnull))
interrupts = []
install = signal.signal

def recording(signum, handler):
    # Every SIGINT the run's own handler gets is also counted here: the pause below ends on
    # one even if it arrived before the pause began (no race with the test's signal).
    if signum == signal.SIGINT and callable(handler):
        def handle(number, frame, handler=handler):
            interrupts.append(number)
            return handler(number, frame)
        return install(signum, handle)
    return install(signum, handler)

signal.signal = recording

def write_series(refinement, out, run):
    folder = write(refinement, out, run)
    if refinement.step_count == pause_at:
        count = len(interrupts)
        paused_marker.with_suffix(".tmp").write_text(folder.name)
        paused_marker.with_suffix(".tmp").replace(paused_marker)  # atomic: whole name or none
        while len(interrupts) == count:  # until the test's SIGINT (or SIGKILL)
            time.sleep(0.02)
    return folder

checkpoint.write_series = write_series

# EDKIT_TEST_KILL_AT_WRITE=k: the k-th file a checkpoint writes is written half, then the process
# SIGKILLs itself (a kill during a checkpoint write, at a known place).
kill_at = int(os.environ.get("EDKIT_TEST_KILL_AT_WRITE", "0"))
atomic, calls = checkpoint.write_atomically, []

def killing_write(path, write):
    calls.append(path)
    if len(calls) != kill_at:
        return atomic(path, write)
    def half_then_kill(partial):
        write(partial)
        with open(partial, "r+b") as handle:
            handle.truncate(max(1, os.path.getsize(partial) // 2))
        os.kill(os.getpid(), signal.SIGKILL)
    return atomic(path, half_then_kill)

checkpoint.write_atomically = killing_write
sys.exit(main(sys.argv[1:]))
"""
TIMEOUT = 300.0  # s, for one run on a loaded machine


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "edkit_paused.py"
    path.write_text(WRAPPER)
    return path


def _flags(data_dir: Path, out: Path) -> list[str]:
    return [
        "refine", "--structure", str(data_dir / "structures" / "quartz_kinematical.cif"),
        "--data", str(data_dir / "pets" / "quartz_experimental.cif_pets"), "--out", str(out),
        "--steps", "10", "--checkpoint-every", "5", "--every", "33", "--n-sub", "5",
        "--g-max", "1.0", "--lm-rounds", "1", "--lm-iterations", "1", "--polish-steps", "0",
    ]  # fmt: skip


class Run:
    """An ``edkit`` process through the wrapper, its output in files (no pipe to fill)."""

    def __init__(
        self, wrapper: Path, argv: list[str], env: dict, log: Path, pause_at=-1, kill_at_write=0
    ):
        self.out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        self.out_file, self.err_file = log.with_suffix(".out"), log.with_suffix(".err")
        self.paused_marker = log.with_suffix(".paused")
        with open(self.out_file, "w") as out, open(self.err_file, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(wrapper), *argv],
                stdout=out,
                stderr=err,
                env={
                    **env,
                    "EDKIT_TEST_PAUSE_AT": str(pause_at),
                    "EDKIT_TEST_PAUSED_MARKER": str(self.paused_marker),
                    "EDKIT_TEST_KILL_AT_WRITE": str(kill_at_write),
                },
            )

    def wait_until_paused(self) -> str:
        """Poll until the wrapper pauses after its checkpoint; the checkpoint's name."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.paused_marker.exists():
                return self.paused_marker.read_text()
            assert self.process.poll() is None, f"exited early:\n{self.stderr}"
            time.sleep(0.05)
        self.process.kill()
        raise AssertionError(f"no pause after {TIMEOUT} s:\n{self.stderr}")

    def finish(self) -> int:
        try:
            return self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()  # not left running into the next tests
            self.process.wait()
            raise AssertionError(f"still running after {TIMEOUT} s:\n{self.stderr}") from None

    @property
    def stdout(self) -> str:
        return self.out_file.read_text()

    @property
    def stderr(self) -> str:
        return self.err_file.read_text()


def _final_state(out: Path) -> dict[str, np.ndarray]:
    with np.load(checkpoint.series(out)[-1] / "state.npz") as stored:
        return {key: stored[key] for key in stored.files}


@pytest.fixture(scope="module")
def reference(data_dir, wrapper, env, tmp_path_factory) -> Run:
    """The uninterrupted run (with the progress bar: its stderr is checked too)."""
    folder = tmp_path_factory.mktemp("reference")
    run = Run(wrapper, _flags(data_dir, folder / "out"), env, folder / "log")
    assert run.finish() == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def resumed(data_dir, wrapper, env, tmp_path_factory, reference) -> dict:
    """Killed after step 5, resumed and interrupted after the Adam steps, resumed to the end."""
    folder = tmp_path_factory.mktemp("resumed")
    out, series = folder / "out", folder / "out" / "checkpoints"
    killed = Run(wrapper, _flags(data_dir, out), env, folder / "killed", pause_at=5)
    assert killed.wait_until_paused() == "0001-step000005"
    killed.process.send_signal(signal.SIGKILL)
    killed_code = killed.finish()
    outputs_after_kill = sorted(p.name for p in out.iterdir())
    # A writer killed half-way leaves a hidden partial folder: never read, removed later.
    stale = series / ".0002-step000007.partial"
    stale.mkdir()
    (stale / "state.npz").write_bytes(b"PK\x03\x04 truncated")
    interrupted = Run(wrapper, ["refine", "--resume", str(out)], env, folder / "interrupted", 10)
    assert interrupted.wait_until_paused() == "0002-step000010"
    interrupted.process.send_signal(signal.SIGINT)
    interrupted_code = interrupted.finish()
    after_steps = checkpoint.series(out)
    final = Run(wrapper, ["refine", "--resume", str(out), "--quiet"], env, folder / "final")
    return {
        "out": out, "killed": killed, "killed_code": killed_code,
        "outputs_after_kill": outputs_after_kill, "interrupted": interrupted,
        "interrupted_code": interrupted_code, "after_steps": after_steps, "stale": stale,
        "final": final, "final_code": final.finish(),
    }  # fmt: skip


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_reference_run_reports_plan_estimate_and_progress(reference) -> None:
    stdout, stderr = reference.stdout, reference.stderr
    assert "memory plan: " in stdout
    # the plan and the estimate come before the thickness search (the start's R follows it)
    assert stdout.index("memory plan: ") < stdout.index("start: mean per-frame R_obs")
    assert stdout.index("time estimate") < stdout.index("start: mean per-frame R_obs")
    assert "10 Adam step(s), 1 least-squares iteration(s), the s.u.'s ≈" in stdout
    assert "plan: 10 Adam step(s) and 1 Levenberg–Marquardt round(s)" in stdout
    assert re.search(
        r"step 1 took .*the 9 Adam step\(s\) left take (at most )?about .*upper bound", stdout
    )
    assert re.search(r"step 2 took .*the 8 Adam step\(s\) left take (at most )?about", stdout)
    # tqdm's bar: the time left estimate (elapsed<left) and the last step's loss and R_obs.
    assert re.search(r"\d+/10 \[\d\d:\d\d<\d\d:\d\d", stderr), stderr
    assert "loss=" in stderr and "R_obs=" in stderr
    names = [p.name for p in checkpoint.series(reference.out)]
    # steps 5 and 10 (the end of the Adam steps) and 11 (after LM); the newest two are kept
    assert names == ["0002-step000010", "0003-step000011"]


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_killed_run_left_its_step_5_checkpoint(resumed) -> None:
    assert resumed["killed_code"] == -signal.SIGKILL
    assert resumed["outputs_after_kill"] == ["checkpoints"]  # no report.json, refined.cif


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_sigint_writes_a_checkpoint_and_says_how_to_resume(resumed) -> None:
    run = resumed["interrupted"]
    assert resumed["interrupted_code"] == 130, run.stderr
    assert "resumed from " in run.stdout and "0001-step000005: step 5" in run.stdout
    assert "edkit: interrupted: finishing the current step" in run.stderr
    assert f"stopped at step 10; checkpoint written to {resumed['out']}" in run.stderr
    assert f"Continue with: edkit refine --resume {resumed['out']}" in run.stderr
    assert "Traceback" not in run.stderr
    assert [p.name for p in resumed["after_steps"]] == ["0001-step000005", "0002-step000010"]
    assert not resumed["stale"].exists()


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_resumed_run_is_bit_identical(reference, resumed) -> None:
    """Resumed after SIGKILL at step 5 and SIGINT after the Adam steps: the same final state
    (parameters: positions, ADPs, orientations, thickness network; Adam moments; best state),
    history and figures as the run never stopped."""
    assert resumed["final_code"] == 0, resumed["final"].stderr
    assert "plan: 0 Adam step(s) and 1 Levenberg–Marquardt round(s)" in resumed["final"].stdout
    expected, got = _final_state(reference.out), _final_state(resumed["out"])
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    groups = {}
    for name in ("out", "got"):
        path = (reference.out if name == "out" else resumed["out"]) / "refinement.nc"
        groups[name] = xr.load_dataset(path, group="history", engine="h5netcdf")
    assert groups["got"].sizes["step"] == 11
    for name in ("loss", "r_obs", "wr_all", "fract", "ueq", "thickness"):
        np.testing.assert_array_equal(groups["got"][name], groups["out"][name], err_msg=name)
    a = json.loads((reference.out / "report.json").read_text())
    b = json.loads((resumed["out"] / "report.json").read_text())
    for key in ("r_obs", "r_all", "wr_obs", "wr_all", "r_obs_mean_frame", "thickness", "steps"):
        assert a[key] == b[key], key
    assert b["structure"] == a["structure"] and b["resumed_from"].endswith("0002-step000010")


#: Where each of the ten kills lands: "write" inside a random file of the first checkpoint the
#: process writes (SIGKILL from inside, the file half-written); "start-up" after a random
#: 0.2–3 s (loading, set-up, compiling); "steps" a random 0–0.4 s after the process's 1–3rd new
#: checkpoint (mid-step, mid-write or in the least squares, from outside).
KILLS = ("write", "start-up", "write", "steps", "write", "start-up", "write", "steps", "write",
         "start-up")  # fmt: skip
FILES_PER_CHECKPOINT = 8  # start.cif/.npz, data.nc, config.json, state.npz, history.nc, sums, run


def _wait_for_new_checkpoints(run: Run, out: Path, before: list[Path], count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    start = checkpoint._number(before[-1]) if before else 0  # only the newest few are kept
    while run.process.poll() is None:
        found = checkpoint.series(out)
        if found and checkpoint._number(found[-1]) - start >= count:
            return
        assert time.monotonic() < deadline, run.stderr
        time.sleep(0.01)


@pytest.mark.slow  # 10 killed processes and a resumed one: about 2 minutes
def test_ten_random_kills_resume_to_the_same_result(data_dir, wrapper, env, tmp_path, reference):
    """SIGKILL at ten random moments (seeded; see KILLS): after every kill the newest complete
    checkpoint loads (its checksums hold), is no older than the one before, and nothing but
    complete checkpoints and hidden partial folders is left; the next process resumes from it
    (or starts afresh when none was complete yet). The last resume ends bit-identical to the
    uninterrupted run: parameters, optimiser state, best state, figures and structure."""
    rng = np.random.default_rng(16)
    out = tmp_path / "out"
    flags = [*_flags(data_dir, out), "--checkpoint-every", "1"]
    last_step, log = -1, []
    for number, where in enumerate(KILLS):
        before = checkpoint.series(out)
        argv = ["refine", "--resume", str(out)] if before else flags
        kill_at = int(rng.integers(1, FILES_PER_CHECKPOINT + 1)) if where == "write" else 0
        run = Run(wrapper, argv, env, tmp_path / f"run{number}", kill_at_write=kill_at)
        if where != "write":
            if where == "steps":
                _wait_for_new_checkpoints(run, out, before, int(rng.integers(1, 4)))
            delay = rng.uniform(0.2, 3.0) if where == "start-up" else rng.uniform(0.0, 0.4)
            try:
                run.process.wait(float(delay))
            except subprocess.TimeoutExpired:
                run.process.send_signal(signal.SIGKILL)
        code = run.finish()
        assert code == -signal.SIGKILL, f"kill {number} ({where}): exit {code}\n{run.stderr}"
        found = checkpoint.series(out)
        if found:
            checkpoint.read(found[-1])  # loads: every checksum holds
            step = json.loads((found[-1] / "config.json").read_text())["step_count"]
            assert step >= last_step
            last_step = step
            names = [p.name for p in (out / "checkpoints").iterdir()]
            assert all(checkpoint._NAME.fullmatch(n) or n.startswith(".") for n in names)
        log.append((where, kill_at, [p.name for p in found]))
    assert last_step > 0, log  # the chain got somewhere before the final resume
    final = Run(wrapper, ["refine", "--resume", str(out), "--quiet"], env, tmp_path / "final")
    assert final.finish() == 0, final.stderr
    expected, got = _final_state(reference.out), _final_state(out)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key} after {log}")
    a = json.loads((reference.out / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    for key in ("r_obs", "wr_all", "thickness", "steps", "structure"):
        assert a[key] == b[key], key
    print("kills:", log)


# ---------------------------------------------------------------------------------- errors


def test_resume_of_a_missing_folder(tmp_path, capsys) -> None:
    missing = tmp_path / "nothing"
    assert main(["refine", "--resume", str(missing)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"edkit: error: {missing}: no such folder (expected an edkit refine --out folder)\n"
    )


def test_resume_of_a_folder_without_checkpoints(tmp_path, capsys) -> None:
    assert main(["refine", "--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"edkit: error: {tmp_path}: no checkpoint in it")


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_resume_with_a_fixed_flag(reference, capsys) -> None:
    assert main(["refine", "--resume", str(reference.out), "--steps", "3", "--g-max", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edkit: error: --resume {reference.out}: continues with the options")
    assert "--steps, --g-max cannot be given" in err


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(out / "checkpoints", copy / "checkpoints")
    return copy


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_resume_of_a_corrupt_checkpoint(reference, wrapper, env, tmp_path) -> None:
    """A truncated state.npz in the newest checkpoint: exit 2, one line naming the file and the
    previous checkpoint, no traceback (its own process: numpy leaks the file it fails to read)."""
    out = _copy(reference.out, tmp_path)
    newest, previous = checkpoint.series(out)[-1], checkpoint.series(out)[-2]
    state = newest / "state.npz"
    state.write_bytes(state.read_bytes()[:100])
    run = Run(wrapper, ["refine", "--resume", str(out)], env, tmp_path / "log")
    assert run.finish() == 2
    assert run.stderr.startswith(f"edkit: error: {state}: corrupted checkpoint"), run.stderr
    assert f"the previous checkpoint may be intact: --resume {previous}" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_resume_of_a_corrupt_run_file(reference, tmp_path, capsys) -> None:
    out = _copy(reference.out, tmp_path)
    run_file = checkpoint.series(out)[-1] / "run.json"
    run_file.write_text('{"schedule": ')
    assert main(["refine", "--resume", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"edkit: error: {run_file}: corrupted checkpoint")


# --------------------------------------------------------------------- the schedule, no JAX


class FakeRefinement:
    """Counts steps like Refinement (Adam steps and LM rounds +1 each) and logs every call."""

    def __init__(self, step_count: int = 0) -> None:
        self.step_count, self.log = step_count, []

    def run(self, steps, callback, *, progress=True, until_converged=False, since_step=None):
        for _ in range(steps):
            self.step_count += 1
            self.log.append(("step", self.step_count))
            if callback(self, {"loss": 1.0}) is False:
                break

    def use_best(self) -> None:
        self.log.append(("best", self.step_count))

    def refine_structure(self, iterations: int) -> None:
        self.step_count += 1
        self.log.append(("lm", iterations))


class Recorder(Checkpointer):
    """Records (step count, position) instead of writing."""

    def __init__(self, every_steps: int | None) -> None:
        super().__init__(Path("unused"), every_steps)
        self.written: list[tuple[int, Position]] = []

    def write(self, refinement, schedule, position):  # type: ignore[override]
        if not self.written or self.written[-1] != (refinement.step_count, position):
            self.written.append((refinement.step_count, position))
        return Path(f"{refinement.step_count}")


SCHEDULE = Schedule(steps=4, lm_rounds=2, lm_iterations=3, polish_steps=2)


def test_schedule_runs_the_cli_sequence() -> None:
    fake, recorder = FakeRefinement(), Recorder(every_steps=3)
    outcome = run_schedule(fake, SCHEDULE, recorder)
    assert not outcome.stopped and outcome.position == Position(5, 0)
    assert fake.log == [
        *[("step", i) for i in (1, 2, 3, 4)], ("best", 4), ("lm", 3),
        ("step", 6), ("step", 7), ("best", 7), ("lm", 3), ("step", 9), ("step", 10), ("best", 10),
    ]  # fmt: skip
    # every 3 steps (not at a stage's last step: its own checkpoint follows) and every stage end
    assert recorder.written == [
        (3, Position(0, 3)), (4, Position(1, 0)), (5, Position(2, 0)), (6, Position(2, 1)),
        (7, Position(3, 0)), (8, Position(4, 0)), (9, Position(4, 1)), (10, Position(5, 0)),
    ]  # fmt: skip
    assert SCHEDULE.steps_left(Position(0, 3)) == 1 + 2 + 2
    assert SCHEDULE.steps_left(Position(3, 0)) == 2


@pytest.mark.parametrize("stop_after", range(1, 14))
def test_schedule_stopped_and_resumed_anywhere(stop_after: int) -> None:
    """Stopped after any call (a step, a best state, an LM round) and resumed from the position
    it returns: the same calls in the same order as if it had never stopped."""
    straight = FakeRefinement()
    run_schedule(straight, SCHEDULE, Recorder(None))
    first = FakeRefinement()
    outcome = run_schedule(first, SCHEDULE, Recorder(0), stop=lambda: len(first.log) >= stop_after)
    assert outcome.stopped
    second = FakeRefinement(first.step_count)
    rest = run_schedule(second, SCHEDULE, Recorder(0), outcome.position)
    assert not rest.stopped
    assert first.log + second.log == straight.log


def test_checkpoints_by_time_without_every_steps() -> None:
    fake = FakeRefinement()
    assert Checkpointer(Path("unused"), None, every_seconds=0.0).due(fake)
    assert not Checkpointer(Path("unused"), None).due(fake)  # 5 minutes have not passed
    assert not Checkpointer(Path("unused"), 0).due(fake)  # only at stage ends


def test_a_converged_stage_ends_early_and_the_schedule_goes_on() -> None:
    """A stage that converges before its limit is complete, not stopped: LM follows."""

    class Converging(FakeRefinement):
        def run(self, steps, callback, *, progress=True, until_converged=False, since_step=None):
            super().run(min(steps, 2) if until_converged else steps, callback)
            self.log.append(("since", since_step))

    fake = Converging()
    schedule = Schedule(steps=50, lm_rounds=1, lm_iterations=3, until_converged=True)
    outcome = run_schedule(fake, schedule, Recorder(0))
    assert not outcome.stopped and outcome.position == Position(2, 0)
    assert fake.log == [("step", 1), ("step", 2), ("since", 0), ("best", 2), ("lm", 3)]
    run = {"schedule": dataclasses.asdict(schedule), "position": {"stage": 0, "done": 1}}
    assert from_run(json.loads(json.dumps(run)), Path("run.json")) == (schedule, Position(0, 1))


class Searching(FakeRefinement):
    """Its thickness searches answer from ``moves``: True restarts the thickness model."""

    def __init__(self, moves: list[bool], step_count: int = 0) -> None:
        super().__init__(step_count)
        self.moves = list(moves)

    def search_thickness_again(self, progress: bool = True) -> bool:
        moved = self.moves.pop(0)
        self.log.append(("search", moved))
        return moved


SEARCHING = Schedule(steps=2, lm_rounds=1, lm_iterations=3, searches=2)


@pytest.mark.parametrize(
    ("moves", "expected"),
    [
        # the thickness stands at the first search: on to LM at once
        ([False], [("search", False), ("lm", 3)]),
        # a new start, steps, then the thickness stands
        ([True, False], [("search", True), ("step", 3), ("step", 4), ("best", 4),
                         ("search", False), ("lm", 3)]),
        # two new starts, each followed by its steps
        ([True, True], [("search", True), ("step", 3), ("step", 4), ("best", 4),
                        ("search", True), ("step", 5), ("step", 6), ("best", 6), ("lm", 3)]),
    ],
)  # fmt: skip
def test_schedule_searches_the_thickness_again(moves, expected) -> None:
    fake = Searching(moves)
    outcome = run_schedule(fake, SEARCHING, Recorder(0))
    assert not outcome.stopped and outcome.position == Position(len(SEARCHING.stages()), 0)
    assert fake.log == [("step", 1), ("step", 2), ("best", 2), *expected]
    assert [s.kind for s in SEARCHING.stages()] == [
        "steps", "search", "steps", "search", "steps", "lm"
    ]  # fmt: skip
    assert from_run(
        {"schedule": dataclasses.asdict(SEARCHING), "position": {"stage": 1, "done": 0}},
        Path("run.json"),
    ) == (SEARCHING, Position(1, 0))


@pytest.mark.parametrize("stop_after", range(1, 9))
def test_schedule_with_searches_stopped_and_resumed_anywhere(stop_after: int) -> None:
    straight = Searching([True, False])
    run_schedule(straight, SEARCHING, Recorder(None))
    first = Searching([True, False])
    outcome = run_schedule(first, SEARCHING, Recorder(0), stop=lambda: len(first.log) >= stop_after)
    assert outcome.stopped
    second = Searching(first.moves, first.step_count)
    rest = run_schedule(second, SEARCHING, Recorder(0), outcome.position)
    assert not rest.stopped
    assert first.log + second.log == straight.log
