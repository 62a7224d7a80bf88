"""The whole default refinement of a large case, phase by phase (``large.py --paper-settings``).

Mirrors ``edkit refine`` with its defaults (60 Adam steps, then 2 rounds of 4 Levenberg–Marquardt
iterations each followed by 10 Adam steps, s.u.'s, refined CIF and the simulated frames), in
one process: the frame set-up and the thickness search (timed inside ``Refinement(...)``), the
first step (compiles), further steps (the epoch), LM iterations, the standard uncertainties and
the outputs, each with the process's peak resident memory after it. ``--pipeline-steps`` and
``--pipeline-lm`` cap how many steps and LM iterations are run; the total of the defaults is then
*projected* from the measured per-step and per-iteration times and printed as such.
"""

import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import edkit
from edkit.refine import prepare

#: ``edkit refine``'s defaults (edkit/cli.py): Adam steps, LM rounds × iterations, polish steps.
CLI_STEPS, CLI_LM_ROUNDS, CLI_LM_ITERATIONS, CLI_POLISH = 60, 2, 4, 10


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(module: Any, name: str, phases: dict[str, float]) -> None:
    """Wrap ``module.name`` so that its wall time adds to ``phases[name]``."""
    function = getattr(module, name, None)
    if function is None:
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def _phase(rows: list, name: str, run: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - start
    rows.append((name, seconds, _peak_mb()))
    print(f"# {name}: {seconds:.1f} s, peak {_peak_mb():.0f} MB", file=sys.stderr, flush=True)
    return value


def measure_pipeline(
    crystal, data, options: dict, steps: int, lm_iterations: int, lm_frames: int = 0
) -> dict:
    """Run the capped default pipeline; rows of (phase, seconds, peak MB) and a projection.

    ``lm_frames`` > 0: LM and the s.u.'s run on a refinement of the first ``lm_frames`` frames
    only (their cost is linear in the frames: one normal matrix is one tangent pass per free
    parameter over every solve), scaled to all frames in the projection."""
    inner: dict[str, float] = {}
    for name in ("build_frame_setup", "thickness_search"):
        _timed(prepare, name, inner)
    rows: list[tuple[str, float, float]] = []
    refinement = _phase(rows, "Refinement(...)", lambda: edkit.Refinement(crystal, data, **options))
    inner = dict(inner)  # the set-up and search of this refinement only (not the LM subset's)
    start_r = refinement.report()["r_obs"]
    _phase(rows, "first step (compiles)", lambda: refinement.run(1, progress=False))
    if steps > 1:
        _phase(rows, f"{steps - 1} more step(s)", lambda: refinement.run(steps - 1, progress=False))
    n_frames = refinement.setup.n_frames
    least = refinement
    if lm_frames:
        subset = edkit.select_frames(data, slice(0, lm_frames))
        least = _phase(rows, f"Refinement(...) of {lm_frames} frames for LM", lambda: (
            edkit.Refinement(crystal, subset, **options)
        ))  # fmt: skip
    lm_label = f"LM, {lm_iterations} iteration(s)" + (f", {lm_frames} frames" if lm_frames else "")
    _phase(rows, lm_label, lambda: least.refine_structure(lm_iterations))
    su_label = "s.u.'s" + (f", {lm_frames} frames" if lm_frames else "")
    _phase(rows, su_label, least.uncertainties)
    lm_scale = n_frames / lm_frames if lm_frames else 1.0
    out = Path(tempfile.mkdtemp(prefix="edkit_pipeline_"))
    _phase(rows, "outputs (CIF, simulated frames)", lambda: (
        refinement.write_cif(out / "refined.cif", with_uncertainties=False),
        refinement.simulated().to_netcdf(out / "simulated.nc", engine="h5netcdf"),
    ))  # fmt: skip
    seconds = {name: s for name, s, _ in rows}
    epoch = seconds.get(f"{steps - 1} more step(s)", seconds["first step (compiles)"]) / max(
        steps - 1, 1
    )
    lm_iteration = seconds[lm_label] / lm_iterations * lm_scale
    n_steps = CLI_STEPS + CLI_LM_ROUNDS * CLI_POLISH
    projected = (
        seconds["Refinement(...)"] + seconds["first step (compiles)"] + (n_steps - 1) * epoch
        + CLI_LM_ROUNDS * CLI_LM_ITERATIONS * lm_iteration + seconds[su_label] * lm_scale
        + seconds["outputs (CIF, simulated frames)"]
    )  # fmt: skip
    return {
        "rows": rows,
        "inner": inner,
        "epoch": epoch,
        "lm_iteration": lm_iteration,
        "projected": projected,
        "n_steps": n_steps,
        "r_start": start_r,
        "r_end": refinement.report()["r_obs"],
        "peak_mb": _peak_mb(),
        "plan": refinement.memory_plan.describe(),
        "lm_scale": lm_scale,
    }


def print_pipeline(row: dict) -> None:
    scaled = "" if row["lm_scale"] == 1 else f", scaled ×{row['lm_scale']:.0f} from the subset"
    print(row["plan"])
    print(f"{'phase':36} {'seconds':>8} {'peak MB':>8}")
    for name, seconds, peak in row["rows"]:
        print(f"{name:36} {seconds:8.1f} {peak:8.0f}")
        if name == "Refinement(...)":
            for inner, s in row["inner"].items():
                print(f"  of which {inner:27} {s:8.1f}")
    print(
        f"epoch {row['epoch']:.1f} s, LM iteration {row['lm_iteration']:.1f} s "
        f"(all frames{scaled}); R_obs "
        f"{100 * row['r_start']:.2f} % → {100 * row['r_end']:.2f} %; "
        f"peak RSS {row['peak_mb']:.0f} MB"
    )
    print(
        f"projected for edkit refine's defaults ({row['n_steps']} Adam steps, "
        f"{CLI_LM_ROUNDS}×{CLI_LM_ITERATIONS} LM iterations): {row['projected'] / 60:.1f} min "
        "(measured phases + measured per-step and per-iteration times × the default counts)",
        flush=True,
    )
