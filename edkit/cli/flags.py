"""The refinement flags of ``edkit refine`` / ``edkit demo``: one per option of
:class:`edkit.refine.options.RefinementOptions` (help, default, units, choices from its field
metadata) and those of the command line alone (files, steps, rounds, output, checkpoints)."""

import argparse
import dataclasses
import typing
from typing import Any

from edkit.errors import EdkitError
from edkit.refine.convergence import MAX_STEPS, Convergence
from edkit.refine.lm import SHIFT_TOLERANCE
from edkit.refine.options import CHOICES, RefinementOptions, options_from, parse_memory
from edkit.refine.schedule import CHECKPOINT_SECONDS

OPTION_FIELDS = tuple(f for f in dataclasses.fields(RefinementOptions) if f.metadata["cli"])
DEFAULT_OUT = "edkit-out"


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The Refinement keywords the flags set, checked; defaults are left to Refinement."""
    kwargs: dict[str, Any] = {}
    for option in OPTION_FIELDS:
        value = getattr(args, option.name)
        if option.name == "refine":
            value = tuple(group.strip() for group in value.split(",") if group.strip())
        if option.name == "restraints":
            value = tuple(value or ())  # --restrain, repeated
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


def memory(text: str) -> float:
    try:
        return parse_memory(text)
    except EdkitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RefinementOptions field with a "cli" name: help, default, units, choices."""
    hints = typing.get_type_hints(RefinementOptions)
    for option in OPTION_FIELDS:
        meta, default = option.metadata, option.default
        if option.name == "restraints":
            default = None  # --restrain appends to a list
        elif isinstance(default, tuple):
            default = ",".join(default)  # --refine: comma-separated
        units = "" if meta["units"] in ("", "1") else f" {meta['units']}"
        shown = meta["none"] if default is None else f"{default}{units}"
        help_ = f"{meta['help']} (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": option.name, "default": default, "help": help_}
        if "flag" in meta:
            kwargs.update(action="store_const", const=meta["flag"])
        elif option.name == "refine":
            kwargs["metavar"] = "GROUP,..."
        elif option.name == "restraints":
            kwargs.update(action="append", metavar="INSTRUCTION")
        elif option.name in CHOICES:
            kwargs["choices"] = CHOICES[option.name]
        elif option.name == "memory_limit":
            kwargs.update(type=memory, metavar="SIZE")
        else:
            hint = hints[option.name]
            kwargs["type"] = int if int in (hint, *typing.get_args(hint)) else float
            if "bare" in meta:
                kwargs.update(nargs="?", const=meta["bare"])
        parser.add_argument(meta["cli"], **kwargs)
        if "negated" in meta:  # the same option off, where its default is neither on nor off
            parser.add_argument(
                meta["negated"], dest=option.name, action="store_const", const=False,
                help=f"{meta['negated_help']} (default: see {meta['cli']})",
            )  # fmt: skip


def add_refine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=None,
        help=f"output folder, checkpoints in its checkpoints/ (default: {DEFAULT_OUT}; with "
        "--resume: the folder resumed from)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=count, default=None,
        help="exactly this many Adam steps (default: until converged, when the best loss falls "
        f"by less than {100 * Convergence().tolerance:g} %% over {Convergence().window} steps "
        "after the warm-up, at most --max-steps)",
    )  # fmt: skip
    parser.add_argument(
        "--max-steps", type=count, default=MAX_STEPS,
        help="the most Adam steps of a run without --steps (default: %(default)s)",
    )  # fmt: skip
    add_option_flags(parser)
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
    parser.add_argument(
        "--absolute-structure", action="store_true",
        help="afterwards refine the inverted structure the same way and compare the hands "
        "(z-score over frames, Hamilton's test; report.json absolute_structure, the CIF's "
        "_chemical_absolute_configuration); about doubles the time",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--checkpoint-every", type=count, default=None, metavar="N",
        help="write a checkpoint into OUT/checkpoints every N steps (0: none but those at the "
        "end of each phase and on Ctrl-C; default: about every "
        f"{CHECKPOINT_SECONDS / 60:g} minutes of work); the newest two are kept",
    )  # fmt: skip
    parser.add_argument(
        "--resume", metavar="DIR", default=None,
        help="continue from the latest checkpoint in DIR (an --out folder, or one checkpoint "
        "folder in it) with the data, structure and options stored there: the flags above "
        "are not repeated (only --out, --quiet and --checkpoint-every may be given; default: a new "
        "refinement)",
    )  # fmt: skip


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer ≥ 0")
    return value
