"""``edkit refine --data A.cif_pets --data B.cif_pets``: one structure against several datasets
(:class:`edkit.refine.joint.JointRefinement`): Adam until converged, the joint least squares,
the refined CIF with joint s.u.'s, ``report.json`` with a ``datasets`` entry per file and
``report.html``; checkpoints in ``OUT/checkpoints`` from which ``--resume OUT`` continues."""

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from edkit.cli.flags import DEFAULT_OUT, options_of
from edkit.errors import EdkitError
from edkit.io.atomic import write_atomically
from edkit.refine.results import finite_or_none


def refine_joint(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Run (or resume) the joint refinement the flags describe, with checkpoints in
    ``OUT/checkpoints`` (every ``--checkpoint-every`` steps, else about every 5 minutes of work;
    at the end of the Adam phase and of each LM round; on Ctrl-C); returns report.json's
    content and the output folder."""
    from edkit.refine.schedule import CHECKPOINT_SECONDS, DeferredInterrupt

    if args.absolute_structure:
        raise EdkitError("--absolute-structure with several --data is not supported yet")
    started = time.perf_counter()
    joint, run, out = _resume(args) if args.resume is not None else _start(args)
    every = args.checkpoint_every if args.checkpoint_every is not None else run["checkpoint_every"]
    run["checkpoint_every"] = every
    last: dict[str, Any] = {"at": time.monotonic(), "folder": None}

    def write(reason: str) -> Path:
        from edkit.cli import _say  # the command line's own line beside a progress bar
        from edkit.refine import checkpoint
        from edkit.refine.joint_checkpoint import save_joint

        folder = checkpoint.write_series(joint, out, run, saver=save_joint)
        last["at"], last["folder"] = time.monotonic(), folder
        _say(f"checkpoint ({reason}): {folder}")
        return folder

    with DeferredInterrupt() as interrupt:

        def after_step(_: Any, record: dict[str, float]) -> bool:
            due = (every is None and time.monotonic() - last["at"] >= CHECKPOINT_SECONDS) or (
                every is not None and every > 0 and joint.step_count % every == 0
            )
            if due or interrupt.requested:
                write("stopped" if interrupt.requested else "periodic")
            return not interrupt.requested

        if run["phase"] == "steps":
            limit = args.max_steps if run["until_converged"] else args.steps
            left = limit - (joint.step_count - run["phase_start"])
            joint.run(max(left, 0), after_step, progress=not args.quiet,
                      until_converged=run["until_converged"], since=run["since"])  # fmt: skip
            if interrupt.requested:
                raise _stopped(joint, last["folder"], out)
            joint.use_best()
            run["phase"] = "lm"
            write("end of the Adam steps")
        while run["lm_done"] < run["lm_rounds"]:
            joint.refine_structure(run["lm_iterations"])
            run["lm_done"] += 1
            write(f"end of least-squares round {run['lm_done']}")
            if interrupt.requested:
                raise _stopped(joint, last["folder"], out)
    joint.write_cif(out / "refined.cif")
    report = joint.report()
    report.update(
        seconds=round(time.perf_counter() - started, 1),
        stages=list(joint.messages),
        structure=run["structure"],
        data=run["data"],
        divergences=sum("diverged" in m for m in joint.messages),
        improved=bool(report["wr_all"] is not None and report["wr_all"] < run["start_wr"]),
        written=["refined.cif", "report.json"],
    )
    if args.resume is not None:
        report["resumed_from"] = str(args.resume_folder)
    report["written"] += _figures_and_page(joint, report, out)
    text = json.dumps(finite_or_none(report), indent=1)
    write_atomically(out / "report.json", lambda path: path.write_text(text))
    return report, out


def _start(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    """A new joint refinement from the flags, run.json's fields and the output folder."""
    from edkit.io.cif import read_cif
    from edkit.io.pets import read_pets, select_frames
    from edkit.refine.joint import JointRefinement

    options = options_of(args)
    paths = [Path(p) for p in args.data]
    for path in (Path(args.structure), *paths):
        if not path.is_file():
            flag = "--structure" if path == Path(args.structure) else "--data"
            raise EdkitError(f"{flag} {path}: no such file")
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    crystal = read_cif(args.structure)
    datasets = [read_pets(p) for p in paths]
    if args.every > 1:
        datasets = [select_frames(d, slice(0, None, args.every)) for d in datasets]
    joint = JointRefinement(crystal, datasets, names=[str(p) for p in paths],
                            progress=False if args.quiet else None, **options)  # fmt: skip
    for path, member in zip(paths, joint.members, strict=True):
        print(
            f"{path.name}: {member.setup.n_frames} frames, {int(member.setup.scored.sum())} "
            f"scored reflections, beams per frame {int(member.setup.n_beams.min())}–"
            f"{int(member.setup.n_beams.max())}",
            flush=True,
        )
    run = {
        "joint": True,
        "structure": str(args.structure),
        "data": [str(p) for p in paths],
        "checkpoint_every": args.checkpoint_every,
        "phase": "steps",
        "phase_start": joint.step_count,
        "since": len(joint._losses),
        "until_converged": args.steps is None,
        "lm_rounds": args.lm_rounds,
        "lm_iterations": args.lm_iterations,
        "lm_done": 0,
        "start_wr": joint.report()["wr_all"],
        # the step limits (the checkpoint holds the rest: data, start, options)
        "steps": args.steps,
        "max_steps": args.max_steps,
    }
    return joint, run, out


def _resume(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    """The joint refinement and run.json of the checkpoint ``--resume`` names (set by the
    command line's resume check as ``args.resume_folder``), and the output folder."""
    from edkit.refine import checkpoint
    from edkit.refine.joint import JointRefinement

    folder = args.resume_folder
    run = checkpoint.read_run(folder)
    if not run.get("joint"):
        raise EdkitError(f"{folder}: not a joint refinement's checkpoint")
    joint = JointRefinement.load(folder)
    args.steps, args.max_steps = run["steps"], run["max_steps"]
    out = Path(args.out) if args.out else folder.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    print(f"resumed from {folder}: joint step {joint.step_count}, phase {run['phase']}",
          flush=True)  # fmt: skip
    return joint, run, out


def _stopped(joint: Any, folder: Path | None, out: Path) -> Exception:
    from edkit.cli import _Stopped  # the command line's own "stopped on request"

    return _Stopped(joint.step_count, folder, out)


def _save_png(figure: Any, target: Path) -> None:
    figure.savefig(target, format="png", dpi=100)


def _figures_and_page(joint: Any, report: dict[str, Any], out: Path) -> list[str]:
    """convergence.png (the joint figures), thickness_<k>.png per dataset and report.html
    (the joint figures of merit, a table per dataset, the structure with its joint s.u.'s)."""
    from edkit import plot
    from edkit.html_report import write_html_report
    from edkit.refine.options import options_json

    figures = [(out / "convergence.png", plot.convergence(joint.history))]
    figures += [
        (out / f"thickness_{k + 1}.png", plot.thickness(member.thickness))
        for k, member in enumerate(joint.members)
    ]
    for path, figure in figures:
        write_atomically(path, partial(_save_png, figure))
    names = ", ".join(Path(n).name for n in joint.names)
    write_html_report(
        out / "report.html", report, joint.crystal, uncertainties=joint.last_uncertainties,
        options=options_json(joint.options), figures=[path for path, _ in figures],
        title=f"edkit refine: {Path(str(report['structure'])).name} against {names}",
    )  # fmt: skip
    return [path.name for path, _ in figures] + ["report.html"]
