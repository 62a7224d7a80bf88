"""The ``edkit`` command line: ``edkit refine`` and ``edkit demo``.

The refinement flags, their defaults, choices and help lines come from the fields of
:class:`edkit.refine.options.RefinementOptions` (one source); the others (files, steps,
Levenberg–Marquardt rounds, output, checkpoints, ``--resume``) belong to the command line alone.
The run itself is :func:`edkit.refine.schedule.run_schedule`: checkpoints into ``OUT/checkpoints``
(periodic, at the end of each phase, on Ctrl-C) from which ``--resume`` continues exactly.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from edkit.errors import EdkitError
from edkit.examples import example_file
from edkit.io.atomic import write_atomically
from edkit.refine import checkpoint
from edkit.refine.convergence import MAX_STEPS, Convergence
from edkit.refine.lm import SHIFT_TOLERANCE
from edkit.refine.options import CHOICES, RefinementOptions, options_from, parse_memory
from edkit.refine.results import finite_or_none
from edkit.refine.schedule import (
    CHECKPOINT_SECONDS,
    Checkpointer,
    DeferredInterrupt,
    StepTimeEstimate,
    from_run,
    run_schedule,
)
from edkit.version import __version__

OPTION_FIELDS = tuple(f for f in dataclasses.fields(RefinementOptions) if f.metadata["cli"])
DEFAULT_OUT = "edkit-out"
#: Flags that may accompany --resume (the others are stored in the checkpoint).
RESUME_FLAGS = ("command", "resume", "out", "quiet", "checkpoint_every")


def _refine(args: argparse.Namespace) -> tuple[dict, Path]:
    """Run (or resume) a refinement with checkpoints; write refined.cif, report.json,
    refinement.nc and the figures into the output folder. Returns the report and that folder."""
    started = time.perf_counter()
    if args.resume is None:
        refinement, run, schedule, position, out = _start(args)
    else:
        refinement, run, schedule, position, out = _resume(args)
    print(refinement.memory_plan.describe(), flush=True)
    every = (
        args.checkpoint_every if args.checkpoint_every is not None else run.get("checkpoint_every")
    )
    run["checkpoint_every"] = every
    left = schedule.steps_left(position)
    lm_left = sum(s.kind == "lm" for s in schedule.stages()[position.stage :])
    estimate = "; a time estimate follows the first step" if left else ""
    converging = schedule.until_converged and all(
        s.kind != "lm" for s in schedule.stages()[: position.stage + 1]
    )
    steps = f"up to {left} Adam step(s) (until converged)" if converging else f"{left} Adam step(s)"
    searches = sum(s.kind == "search" for s in schedule.stages()[position.stage :])
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
    refinement.write_cif(out / "refined.cif")
    report = refinement.report()
    report["seconds"] = round(prior + time.perf_counter() - started, 1)
    # How each stage ended (converged, step limit, least squares' shift/s.u.), in words.
    report["stages"] = [
        m
        for m in refinement.messages
        if "converge" in m or "Levenberg" in m or m.startswith("thickness search")
    ]
    report["structure"], report["data"] = run.get("structure"), run.get("data")
    if args.resume is not None:
        report["resumed_from"] = str(args.resume_folder)
    text = json.dumps(finite_or_none(report), indent=1)
    write_atomically(out / "report.json", lambda path: path.write_text(text))
    refinement.write_results(out / "refinement.nc")
    from edkit.plot import write_figures  # matplotlib only when there is something to draw

    write_figures(out / "refinement.nc", refinement.thickness, out)
    return report, out


def _start(args: argparse.Namespace) -> tuple[Any, dict, Any, Any, Path]:
    """A new refinement from the flags: the refinement, run.json's fields, schedule, position
    and output folder."""
    from edkit.io.cif import read_cif
    from edkit.io.pets import read_pets, select_frames
    from edkit.refine.refinement import Refinement
    from edkit.refine.schedule import Position, Schedule

    options = _options(args)  # checked before any file is read
    for flag, path in (("--structure", args.structure), ("--data", args.data)):
        if not Path(path).is_file():
            raise EdkitError(f"{flag} {path}: no such file")
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    crystal = read_cif(args.structure)
    dataset = read_pets(args.data)
    if args.every > 1:
        dataset = select_frames(dataset, slice(0, None, args.every))
    refinement = Refinement(crystal, dataset, progress=False if args.quiet else None, **options)
    print(
        f"{len(dataset.frame)} frames, {int(refinement.setup.scored.sum())} scored reflections, "
        f"{refinement.setup.settings['n_sub']} sub-orientations per frame, beams per frame "
        f"{int(refinement.setup.n_beams.min())}–{int(refinement.setup.n_beams.max())}",
        flush=True,
    )
    start_report = refinement.report()
    print(
        f"start: mean per-frame R_obs {start_report['r_obs_mean_frame']:.4f}, "
        f"Jana R_obs {start_report['r_obs']:.4f} (thickness from the grid search)",
        flush=True,
    )
    # The checkpoint holds the start and the (selected) data themselves; the paths are for the
    # report and for the reader.
    run = {
        "command": args.command,
        "structure": str(args.structure),
        "data": str(args.data),
        "every": args.every,
        "checkpoint_every": args.checkpoint_every,
    }
    until_converged = args.steps is None
    searches = args.searches if args.searches is not None else (3 if until_converged else 0)
    schedule = Schedule(
        args.max_steps if until_converged else args.steps, args.lm_rounds, args.lm_iterations,
        args.polish_steps, until_converged, searches,
    )  # fmt: skip
    return refinement, run, schedule, Position(), out


def _resume(args: argparse.Namespace) -> tuple[Any, dict, Any, Any, Path]:
    """The refinement, run.json, schedule and position of the checkpoint ``--resume`` names,
    and the output folder (``--out``, else the folder resumed from)."""
    from edkit.refine.refinement import Refinement

    folder = args.resume_folder
    run = checkpoint.read_run(folder)
    schedule, position = from_run(run, folder / checkpoint.RUN_FILE)
    try:
        refinement = Refinement.load(folder)
    except EdkitError as error:
        older = [p for p in checkpoint.series(folder.parent.parent) if p != folder]
        hint = f"; the previous checkpoint may be intact: --resume {older[-1]}" if older else ""
        raise EdkitError(f"{error}{hint}") from None
    refinement.progress = False if args.quiet else None  # least squares' bars
    if args.out:
        out = Path(args.out)
    elif folder.parent.name == checkpoint.SERIES:
        out = folder.parent.parent
    else:
        out = folder
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"resumed from {folder}: step {refinement.step_count}, {len(refinement.dataset.frame)} "
        f"frames, {run.get('structure')} against {run.get('data')}",
        flush=True,
    )
    return refinement, run, schedule, position, out


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
    keys = ("r_obs_mean_frame", "r_obs", "r_all", "wr_obs", "wr_all", "gof")
    print("figures of merit (fractions; Jana on |F| over scored reflections, and diffBloch's")
    print("mean per-frame R_obs):")
    for key in keys:
        value = report[key]
        print(f"  {key:18s} {'undefined' if value is None or value != value else f'{value:.4f}'}")
    print(f"  {'n_obs / n_all':18s} {report['n_obs']} / {report['n_all']}")
    print(f"  {'steps, seconds':18s} {report['steps']}, {report['seconds']}")
    for line in report.get("stages", []):
        print(f"  {line}")
    print(f"wrote {out / 'refined.cif'}, {out / 'report.json'}, {out / 'refinement.nc'} and "
          "the figures (convergence, frames, thickness, F_obs vs F_calc; PNG)")  # fmt: skip


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The Refinement keywords the flags set, checked; defaults are left to Refinement."""
    kwargs: dict[str, Any] = {}
    for option in OPTION_FIELDS:
        value = getattr(args, option.name)
        if option.name == "refine":
            value = tuple(group.strip() for group in value.split(",") if group.strip())
        if option.metadata.get("zero") and value == 0:
            value = None
        kwargs[option.name] = value
    if (
        args.refine_absorption
        and args.absorption is not None
        and "absorption" not in kwargs["refine"]
    ):
        kwargs["refine"] += ("absorption",)
    try:
        options_from(**kwargs)
    except EdkitError as error:  # "devices = 0: …" → "--devices: devices = 0: …"
        flags = {option.name: option.metadata["cli"] for option in OPTION_FIELDS}
        flag = flags.get(str(error).split(" ", 1)[0])
        raise EdkitError(f"{flag}: {error}" if flag else str(error)) from None
    # Refinement's defaults are RefinementOptions' own: pass only what the flags change.
    return {
        option.name: kwargs[option.name]
        for option in OPTION_FIELDS
        if kwargs[option.name] != option.default
    }


def _memory(text: str) -> float:
    try:
        return parse_memory(text)
    except EdkitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RefinementOptions field with a "cli" name: help, default, units, choices."""
    hints = typing.get_type_hints(RefinementOptions)
    for option in OPTION_FIELDS:
        meta, default = option.metadata, option.default
        if isinstance(default, tuple):
            default = ",".join(default)  # --refine: comma-separated
        units = "" if meta["units"] in ("", "1") else f" {meta['units']}"
        shown = meta["none"] if default is None else f"{default}{units}"
        help_ = f"{meta['help']} (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": option.name, "default": default, "help": help_}
        if "flag" in meta:
            kwargs.update(action="store_const", const=meta["flag"])
        elif option.name == "refine":
            kwargs["metavar"] = "GROUP,..."
        elif option.name in CHOICES:
            kwargs["choices"] = CHOICES[option.name]
        elif option.name == "memory_limit":
            kwargs.update(type=_memory, metavar="SIZE")
        else:
            hint = hints[option.name]
            kwargs["type"] = int if int in (hint, *typing.get_args(hint)) else float
            if "bare" in meta:
                kwargs.update(nargs="?", const=meta["bare"])
        parser.add_argument(meta["cli"], **kwargs)


def _add_refine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=None,
        help=f"output folder, checkpoints in its checkpoints/ (default: {DEFAULT_OUT}; with "
        "--resume: the folder resumed from)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=_count, default=None,
        help="exactly this many Adam steps (default: until converged, when the best loss falls "
        f"by less than {100 * Convergence().tolerance:g} %% over {Convergence().window} steps, "
        "at most --max-steps)",
    )  # fmt: skip
    parser.add_argument(
        "--max-steps", type=_count, default=MAX_STEPS,
        help="the most Adam steps of a run without --steps (default: %(default)s)",
    )  # fmt: skip
    _add_option_flags(parser)
    parser.add_argument(
        "--refine-absorption", action="store_true", help="with --absorption: refine κ too"
    )
    parser.add_argument(
        "--every", type=int, default=1, help="use every N-th frame only (default: %(default)s)"
    )
    parser.add_argument(
        "--searches", type=int, default=None, metavar="N",
        help="after the Adam steps, up to N times: the thickness search again from the refined "
        "structure and, where more than 5 %% of the frames' thickness is over 10 %% off and the "
        "searched thickness fits better (mean per-frame R_obs ≥ 5 %% lower), a new start of the "
        "thickness model and Adam steps again; no further search after a new start that found "
        "no better state (default: 3, or 0 with --steps)",
    )  # fmt: skip
    parser.add_argument(
        "--lm-rounds", type=int, default=1,
        help="Levenberg–Marquardt rounds on the structure after the Adam steps (default: "
        "%(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--lm-iterations", type=int, default=10,
        help="the most iterations per Levenberg–Marquardt round; a round stops sooner once max "
        f"shift/s.u. < {SHIFT_TOLERANCE:g} (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--polish-steps", type=int, default=0,
        help="Adam steps after each Levenberg–Marquardt round (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--checkpoint-every", type=_count, default=None, metavar="N",
        help="write a checkpoint into OUT/checkpoints every N steps (0: none but those at the "
        "end of each phase and on Ctrl-C; default: about every "
        f"{CHECKPOINT_SECONDS / 60:g} minutes of work); the newest two are kept",
    )  # fmt: skip
    parser.add_argument(
        "--resume", metavar="DIR", default=None,
        help="continue from the latest checkpoint in DIR (an --out folder, or one checkpoint "
        "folder in it) with the data, structure and options stored there: the flags above "
        "are not repeated (only --out, --quiet and --checkpoint-every may be given)",
    )  # fmt: skip


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer ≥ 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    refine = commands.add_parser("refine", help="refine a structure against a PETS2 dataset")
    # Required unless --resume (checked in main, with argparse's message).
    refine.add_argument("--structure", help="starting CIF file")
    refine.add_argument("--data", help="PETS2 .cif_pets file")
    _add_refine_options(refine)
    demo = commands.add_parser(
        "demo",
        help="refine the bundled real quartz data (every 3rd frame) from the kinematical start",
    )
    _add_refine_options(demo)
    demo.set_defaults(every=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edkit`` command; returns the exit code (2: bad input, 130: stopped
    by Ctrl-C, after writing a checkpoint where one could be written)."""
    parser = _parser()
    args = parser.parse_args(argv)
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
        if devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""
        ):
            # Read when JAX's CPU backend starts, which no edkit import does.
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "")
                + f" --xla_force_host_platform_device_count={devices}"
            ).strip()
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
    return 0


def _check_resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """With --resume: no flag the checkpoint fixes; sets ``args.resume_folder`` (the checkpoint)
    and returns the stored number of devices (needed before JAX starts)."""
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
    try:
        config = json.loads((args.resume_folder / "config.json").read_text())
        return int(config["options"]["devices"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1  # Refinement.load names the file and what is wrong with it


if __name__ == "__main__":
    raise SystemExit(main())
