"""The ``edkit`` command line: ``edkit refine`` and ``edkit demo``.

The refinement flags, their defaults, choices and help lines come from the fields of
:class:`edkit.refine.options.RefinementOptions` (one source); the others (files, steps,
Levenberg–Marquardt rounds, output, checkpoints, ``--resume``) belong to the command line alone.
The run itself is :func:`edkit.refine.schedule.run_schedule`: checkpoints into ``OUT/checkpoints``
(periodic, at the end of each phase, on Ctrl-C) from which ``--resume`` continues exactly.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edkit import cores
from edkit.cli.config import apply_config, template, validate
from edkit.cli.flags import DEFAULT_OUT, OPTION_FIELDS, add_refine_options
from edkit.cli.outputs import difference_map_summary
from edkit.cli.start import print_plan, resume_run, start_run
from edkit.errors import EdkitError
from edkit.examples import example_file
from edkit.io.atomic import write_atomically
from edkit.refine import checkpoint
from edkit.refine.results import finite_or_none
from edkit.refine.schedule import (
    CHECKPOINT_SECONDS,
    Checkpointer,
    DeferredInterrupt,
    StepTimeEstimate,
    run_schedule,
)
from edkit.version import __version__

#: Flags that may accompany --resume (the others are stored in the checkpoint).
RESUME_FLAGS = ("command", "resume", "out", "quiet", "checkpoint_every")


def _refine(args: argparse.Namespace) -> tuple[dict, Path]:
    """Run (or resume) a refinement with checkpoints; write refined.cif, report.json,
    refinement.nc and the figures into the output folder. Returns the report and that folder."""
    started = time.perf_counter()
    if args.resume is None:
        refinement, run, schedule, position, out = start_run(args)
    else:
        refinement, run, schedule, position, out = resume_run(args)
        print_plan(
            refinement.setup, refinement.memory_plan, refinement.n_parameters, schedule, position
        )
    every = (
        args.checkpoint_every if args.checkpoint_every is not None else run.get("checkpoint_every")
    )
    run["checkpoint_every"] = every
    left = schedule.steps_left(position)
    stages_left = schedule.stages()[position.stage :]
    lm_left = sum(s.kind == "lm" for s in stages_left)
    searches = sum(s.kind == "search" for s in stages_left)
    estimate = "; a measured time estimate follows the first step" if left else ""
    converging = schedule.until_converged and all(
        s.kind != "lm" for s in schedule.stages()[: position.stage + 1]
    )
    steps = f"up to {left} Adam step(s) (until converged)" if converging else f"{left} Adam step(s)"
    if searches:
        steps += f", up to {searches} thickness search(es) from the refined structure"
    print(
        f"plan: {steps} and {lm_left} Levenberg–Marquardt round(s){estimate}. "
        f"Checkpoints into {out / 'checkpoints'}: {_interval(every)}, at the end of each phase "
        "and on Ctrl-C",
        flush=True,
    )
    prior = float(run.get("wall_seconds", 0.0))
    checkpointer = Checkpointer(
        out,
        every,
        describe=lambda: {**run, "wall_seconds": prior + time.perf_counter() - started},
        on_write=lambda path: _say(f"checkpoint: {path}"),
    )
    with DeferredInterrupt() as interrupt:
        outcome = run_schedule(
            refinement, schedule, checkpointer, position, progress=not args.quiet,
            stop=lambda: interrupt.requested,
            on_step=StepTimeEstimate(refinement, _say, at_most=converging),
        )  # fmt: skip
    if outcome.stopped:
        raise _Stopped(refinement.step_count, outcome.checkpoint, out)
    hands = None
    if run.get("absolute_structure"):
        hands = _compare_hands(refinement, args, run)
    refinement.write_cif(out / "refined.cif", extra=_hand_items(hands))
    report = refinement.report()
    if hands is not None:
        report["absolute_structure"] = hands.as_dict()
    report["seconds"] = round(prior + time.perf_counter() - started, 1)
    # How each stage began or ended (the start, the start spread chosen, converged, step limit,
    # least squares' shift/s.u.), in words.
    report["stages"] = [
        m
        for m in refinement.messages
        if "converge" in m
        or "Levenberg" in m
        or m.startswith(("thickness search", "kinematical start", "start thickness spread"))
    ]
    report["structure"], report["data"] = run.get("structure"), run.get("data")
    report["divergences"] = sum(
        "the refinement diverged" in m or "non-finite gradient" in m for m in refinement.messages
    )
    start_wr = float(refinement.history["wr_all"].values[0])
    report["improved"] = bool(report["wr_all"] is not None and report["wr_all"] < start_wr)
    if args.resume is not None:
        report["resumed_from"] = str(args.resume_folder)
    simulated = refinement.simulated()  # one forward pass for the results, map and fcf
    report["difference_map"] = difference_map_summary(refinement, simulated, out, _say)
    refinement.write_fcf(out / "reflections.fcf", simulated)
    text = json.dumps(finite_or_none(report), indent=1)
    write_atomically(out / "report.json", lambda path: path.write_text(text))
    refinement.write_results(out / "refinement.nc", simulated)
    from edkit.html_report import write_html_report
    from edkit.plot import write_figures  # matplotlib only when there is something to draw
    from edkit.refine.options import options_json

    figures = write_figures(out / "refinement.nc", refinement.thickness, out)
    write_html_report(
        out / "report.html", report, refinement.crystal,
        uncertainties=getattr(refinement, "last_uncertainties", None),
        options=options_json(refinement.options), figures=figures,
        title=f"edkit {args.command}: {Path(str(run.get('structure'))).name} against "
        f"{Path(str(run.get('data'))).name}",
    )  # fmt: skip
    return report, out


def _compare_hands(refinement: Any, args: argparse.Namespace, run: dict) -> Any:
    """Refine the inverse of the start with the same options and step budget
    (``Refinement.fit``) and compare it with the refinement just finished."""
    from edkit.refine.absolute import compare_hands, inverted_crystal
    from edkit.refine.options import options_json
    from edkit.refine.refinement import Refinement

    _say("absolute structure: refining the inverted structure the same way")
    # the inverse of the start the refinement had (a kinematical start already made, once)
    options = {**options_json(refinement.options), "kinematic_start": False}
    inverse = Refinement(
        inverted_crystal(refinement.start_crystal), refinement.dataset,
        progress=False if args.quiet else None, **options,
    )  # fmt: skip
    searches = args.searches if args.searches is not None else (3 if args.steps is None else 0)
    inverse.fit(
        max_steps=args.steps or args.max_steps, lm_iterations=args.lm_iterations,
        searches=searches, progress=not args.quiet,
    )  # fmt: skip
    hands = compare_hands(refinement, inverse)
    _say(
        f"absolute structure: {hands.preferred} preferred (z = {hands.z_score:.2f} over "
        f"{hands.frames} frames; wR_all {100 * hands.wr_all_given:.2f} % given, "
        f"{100 * hands.wr_all_inverted:.2f} % inverted; Hamilton α {hands.hamilton_alpha:.2g})"
    )
    return hands


def _hand_items(hands: Any) -> dict[str, object] | None:
    """The CIF's absolute-configuration items: 'dyn' when the dynamical comparison determined
    the hand of the written (given) structure."""
    if hands is None:
        return None
    items: dict[str, object] = {"_edkit_absolute_structure_z_score": round(hands.z_score, 3)}
    if hands.determined and hands.preferred == "given":
        items["_chemical_absolute_configuration"] = "dyn"
    return items


def _interval(every: int | None) -> str:
    if every is None:
        return f"about every {CHECKPOINT_SECONDS / 60:g} minutes of work"
    return "no periodic ones" if every == 0 else f"every {every} step(s)"


def _say(message: str) -> None:
    """A line on stdout that does not break a running progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


class _Stopped(Exception):
    """The run stopped on request after writing a checkpoint."""

    def __init__(self, step: int, folder: Path | None, out: Path) -> None:
        super().__init__(
            f"edkit: stopped at step {step}; checkpoint written to {folder}. Continue with: "
            f"edkit refine --resume {out}"
        )


def _print_report(report: dict, out: Path) -> None:
    keys = ("r_obs_mean_frame", "r_obs", "r_all", "wr_obs", "wr_all")
    print("figures of merit (%; Jana on |F| over scored reflections, and diffBloch's")
    print("mean per-frame R_obs):")
    for key in keys:
        value = report[key]
        shown = "undefined" if value is None or value != value else f"{100 * value:.2f} %"
        print(f"  {key:18s} {shown}")
    gof = report["gof"]
    print(f"  {'gof':18s} {'undefined' if gof is None or gof != gof else f'{gof:.3f}'}")
    print(f"  {'n_obs / n_all':18s} {report['n_obs']} / {report['n_all']}")
    print(f"  {'steps, seconds':18s} {report['steps']}, {report['seconds']}")
    for line in report.get("stages", []):
        print(f"  {line}")
    if "written" in report:  # a joint refinement writes fewer files
        print(f"wrote {', '.join(str(out / name) for name in report['written'])}")
        return
    written = ", ".join(str(out / name) for name in ("refined.cif", "report.html", "report.json"))
    print(f"wrote {written}, {out / 'refinement.nc'} and the figures (convergence, frames, "
          "thickness, F_obs vs F_calc; PNG)")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    refine = commands.add_parser("refine", help="refine a structure against a PETS2 dataset")
    validate = commands.add_parser(
        "validate",
        help="check the inputs and plan the beams, memory and time of a refinement (no solve)",
    )
    for sub in (refine, validate):
        # Required unless --resume or --config (checked in main, with argparse's message).
        sub.add_argument("--structure", help="starting CIF file (required)")
        sub.add_argument(
            "--data", action="append",
            help="PETS2 .cif_pets file (required); repeat it to refine one structure against "
            "several datasets (each its own thickness, orientations, scales, cell and UB)",
        )  # fmt: skip
    demo = commands.add_parser(
        "demo",
        help="refine the bundled real quartz data (every 3rd frame) from the kinematical start",
    )
    for sub in (refine, validate, demo):
        add_refine_options(sub)
        sub.add_argument(
            "--config", metavar="FILE", default=None,
            help="read options from a TOML file (edkit config writes a template); flags "
            "given here win (default: none)",
        )  # fmt: skip
    # The demo brings its own files (main sets them); the fields exist as for refine.
    demo.set_defaults(every=3, structure=None, data=None)
    commands.add_parser(
        "config", help="print a commented TOML template of every refine option and its default"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edkit`` command; returns the exit code: 0 done, 2 bad input (a
    missing, unreadable or inconsistent file or option; argparse's usage errors too), 3 the
    refinement diverged and ended no better than its start (outputs written from the best
    state), 130 stopped by Ctrl-C (after writing a checkpoint where one could be written)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "config":
        print(template(_subparser(parser, "refine")))
        return 0
    try:
        if args.config is not None:
            if args.resume is not None:
                raise EdkitError("--config cannot be given with --resume (the checkpoint holds "
                                 "the options)")  # fmt: skip
            defaults = vars(parser.parse_args([args.command]))
            apply_config(args, _subparser(parser, args.command), defaults)
        if args.command == "validate":
            if args.structure is None or args.data is None:
                raise EdkitError("edkit validate needs --structure and --data")
            for data in args.data if isinstance(args.data, list) else [args.data]:
                args.data = data
                print(validate(args))
            return 0
        if isinstance(args.data, list) and len(args.data) == 1:
            args.data = args.data[0]  # one dataset: the ordinary refinement
    except (EdkitError, OSError) as error:
        print(f"edkit: error: {error}", file=sys.stderr)
        return 2
    if args.command == "refine" and args.resume is None:
        missing = [flag for flag in ("--structure", "--data") if getattr(args, flag[2:]) is None]
        if missing:
            parser.error(
                f"edkit refine: the following arguments are required: {', '.join(missing)} "
                "(or --resume DIR)"
            )
    try:
        devices = args.devices
        if args.resume is not None:
            devices = _check_resume(args, parser)
        elif args.command == "demo":
            args.structure = example_file("quartz_kinematical.cif")
            args.data = example_file("quartz_experimental.cif_pets")
            print(f"edkit demo: {args.structure.name} against {args.data.name}", flush=True)
        if devices is not None:  # read when JAX's CPU backend starts, which no import does
            cores.request_cpu_devices(devices)
        if isinstance(args.data, list) or getattr(args, "resume_joint", False):
            from edkit.cli.joint import refine_joint

            report, out = refine_joint(args)
        else:
            report, out = _refine(args)
    except _Stopped as stopped:
        print(stopped, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            "\nedkit: stopped at once, without a new checkpoint; if one was written before, "
            f"continue with: edkit refine --resume {args.out or args.resume or DEFAULT_OUT}",
            file=sys.stderr,
        )
        return 130
    except (EdkitError, OSError) as error:
        print(f"edkit: error: {error}", file=sys.stderr)
        return 2
    _print_report(report, out)
    if report["divergences"] and not report["improved"]:
        print(
            f"edkit: the refinement diverged {report['divergences']} time(s) and ended no better "
            "than its start; the outputs hold the best state (exit code 3)",
            file=sys.stderr,
        )
        return 3
    return 0


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _check_resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int | None:
    """With --resume: no flag the checkpoint fixes; sets ``args.resume_folder`` (the checkpoint)
    and returns the stored number of devices (needed before JAX starts; None: every one)."""
    defaults = vars(parser.parse_args([args.command]))
    given = [
        name for name, value in vars(args).items()
        if name not in RESUME_FLAGS and value != defaults.get(name)
    ]  # fmt: skip
    if given:
        flags = {option.name: option.metadata["cli"] for option in OPTION_FIELDS}
        named = ", ".join(flags.get(name, "--" + name.replace("_", "-")) for name in given)
        raise EdkitError(
            f"--resume {args.resume}: continues with the options stored in the checkpoint; "
            f"{named} cannot be given with it (only --out, --quiet, --checkpoint-every)"
        )
    args.resume_folder = checkpoint.latest(Path(args.resume))
    args.resume_joint = (args.resume_folder / "joint.json").is_file()  # several datasets
    first = args.resume_folder / ("dataset_1" if args.resume_joint else "")
    try:
        config = json.loads((first / "config.json").read_text())
        devices = config["options"].get("devices", 1)
        return None if devices is None else int(devices)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # Refinement.load names the file and what is wrong with it


if __name__ == "__main__":
    raise SystemExit(main())
