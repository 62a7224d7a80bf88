"""The ``edkit`` command line: ``edkit refine`` and ``edkit demo``.

The refinement flags, their defaults, choices and help lines come from the fields of
:class:`edkit.refine.options.RefinementOptions` (one source); the others (files, steps,
Levenberg–Marquardt rounds, output) belong to the command line alone.
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
from edkit.refine.options import CHOICES, RefinementOptions, options_from, parse_memory

OPTION_FIELDS = tuple(f for f in dataclasses.fields(RefinementOptions) if f.metadata["cli"])


def _refine(args: argparse.Namespace) -> dict:
    """Run a refinement and write refined.cif, report.json and refinement.nc into args.out."""
    from edkit.io.cif import read_cif
    from edkit.io.pets import read_pets, select_frames
    from edkit.refine.refinement import Refinement

    options = _options(args)  # checked before any file is read
    for flag, path in (("--structure", args.structure), ("--data", args.data)):
        if not Path(path).is_file():
            raise EdkitError(f"{flag} {path}: no such file")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crystal = read_cif(args.structure)
    dataset = read_pets(args.data)
    if args.every > 1:
        dataset = select_frames(dataset, slice(0, None, args.every))
    started = time.perf_counter()
    refinement = Refinement(crystal, dataset, **options)
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
    refinement.run(args.steps, progress=not args.quiet)
    refinement.use_best()
    for _ in range(args.lm_rounds):
        refinement.refine_structure(args.lm_iterations)
        if args.polish_steps:
            refinement.run(args.polish_steps, progress=not args.quiet)
            refinement.use_best()
    refinement.write_cif(out / "refined.cif")
    report = refinement.report()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["structure"] = str(args.structure)
    report["data"] = str(args.data)
    (out / "report.json").write_text(json.dumps(_finite_or_none(report), indent=1))
    history = refinement.history
    simulated = refinement.simulated()
    history.to_netcdf(out / "refinement.nc", engine="h5netcdf", group="history")
    simulated.to_netcdf(out / "refinement.nc", engine="h5netcdf", group="simulated", mode="a")
    return report


def _finite_or_none(report: dict) -> dict:
    """NaN (an undefined figure, e.g. GoF with N_obs ≤ N_par) as JSON null, not invalid NaN."""
    return {
        key: None if isinstance(value, float) and value != value else value
        for key, value in report.items()
    }


def _print_report(report: dict, out: Path) -> None:
    keys = ("r_obs_mean_frame", "r_obs", "r_all", "wr_obs", "wr_all", "gof")
    print("figures of merit (fractions; Jana on |F| over scored reflections, and diffBloch's")
    print("mean per-frame R_obs):")
    for key in keys:
        value = report[key]
        print(f"  {key:18s} {'undefined' if value is None or value != value else f'{value:.4f}'}")
    print(f"  {'n_obs / n_all':18s} {report['n_obs']} / {report['n_all']}")
    print(f"  {'steps, seconds':18s} {report['steps']}, {report['seconds']}")
    print(f"wrote {out / 'refined.cif'}, {out / 'report.json'}, {out / 'refinement.nc'}")


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
    parser.add_argument("--out", default="edkit-out", help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps (default: %(default)s)")
    _add_option_flags(parser)
    parser.add_argument(
        "--refine-absorption", action="store_true", help="with --absorption: refine κ too"
    )
    parser.add_argument(
        "--every", type=int, default=1, help="use every N-th frame only (default: %(default)s)"
    )
    parser.add_argument(
        "--lm-rounds", type=int, default=2,
        help="Levenberg–Marquardt rounds (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--lm-iterations", type=int, default=4,
        help="iterations per Levenberg–Marquardt round (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--polish-steps", type=int, default=10,
        help="Adam steps after each Levenberg–Marquardt round (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    refine = commands.add_parser("refine", help="refine a structure against a PETS2 dataset")
    refine.add_argument("--structure", required=True, help="starting CIF file")
    refine.add_argument("--data", required=True, help="PETS2 .cif_pets file")
    _add_refine_options(refine)
    demo = commands.add_parser(
        "demo",
        help="refine the bundled real quartz data (every 3rd frame) from the kinematical start",
    )
    _add_refine_options(demo)
    demo.set_defaults(every=3, steps=40, lm_rounds=1, lm_iterations=3, polish_steps=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edkit`` command; returns the exit code (2: bad input)."""
    args = _parser().parse_args(argv)
    if args.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        # Read when JAX's CPU backend starts, which no edkit import does.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        ).strip()
    if args.command == "demo":
        args.structure = example_file("quartz_kinematical.cif")
        args.data = example_file("quartz_experimental.cif_pets")
        print(f"edkit demo: {args.structure.name} against {args.data.name}", flush=True)
    try:
        report = _refine(args)
    except (EdkitError, OSError) as error:
        print(f"edkit: error: {error}", file=sys.stderr)
        return 2
    _print_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
