"""The ``edkit`` command line: ``edkit refine`` and ``edkit demo``."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from edkit.errors import EdkitError
from edkit.examples import example_file

THICKNESS_CHOICES = ("constant", "per-frame", "platelet", "wedge", "profile-net", "map-net")


def _refine(args: argparse.Namespace) -> dict:
    """Run a refinement and write refined.cif, report.json and refinement.nc into args.out."""
    from edkit.io.cif import read_cif
    from edkit.io.pets import read_pets, select_frames
    from edkit.refine.refinement import Refinement

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crystal = read_cif(args.structure)
    dataset = read_pets(args.data)
    if args.every > 1:
        dataset = select_frames(dataset, slice(0, None, args.every))
    started = time.perf_counter()
    refine = [group.strip() for group in args.refine.split(",") if group.strip()]
    if args.absorption is not None and args.refine_absorption and "absorption" not in refine:
        refine.append("absorption")
    refinement = Refinement(
        crystal,
        dataset,
        refine=tuple(refine),
        thickness=args.thickness,
        absorption=args.absorption,
        g_max=args.g_max,
        sg_max=args.sg_max,
        sg_weak=args.sg_weak if args.sg_weak > 0 else None,
        n_sub=args.n_sub,
        seed=args.seed,
        devices=args.devices,
        precision=args.precision,
        bethe_terms=args.bethe_terms if args.bethe_terms > 0 else None,
        remat="eigensystems" if args.low_memory else False,
    )
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


def _add_refine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="edkit-out", help="output folder")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps (joint)")
    parser.add_argument("--thickness", choices=THICKNESS_CHOICES, default="profile-net")
    parser.add_argument(
        "--absorption", type=float, nargs="?", const=0.05, default=None,
        help="proportional absorption κ (U' = κU); bare flag: 0.05",
    )  # fmt: skip
    parser.add_argument("--refine-absorption", action="store_true", help="refine κ too")
    parser.add_argument("--g-max", type=float, default=1.6, help="Å⁻¹")
    parser.add_argument(
        "--sg-max", type=float, default=0.005,
        help="beams solved exactly: smallest |S_g| over the frame ≤ this, Å⁻¹",
    )  # fmt: skip
    parser.add_argument(
        "--sg-weak", type=float, default=0.03,
        help="beams up to this |S_g| join as Bethe potentials, Å⁻¹ (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--bethe-terms", type=int, default=12,
        help="Chebyshev terms of the Bethe correction shared by a frame's sub-orientations "
        "(0: build it at every sub-orientation)",
    )  # fmt: skip
    parser.add_argument(
        "--low-memory", action="store_true",
        help="keep only the eigendecompositions for the gradient (large cells)",
    )  # fmt: skip
    parser.add_argument(
        "--refine", default="positions,adp,thickness,orientation",
        help="comma-separated groups: positions, adp, occupancy, orientation, absorption, "
        "thickness",
    )  # fmt: skip
    parser.add_argument("--n-sub", type=int, default=None, help="sub-orientations per frame")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="use every N-th frame only")
    parser.add_argument(
        "--devices", type=int, default=1,
        help="shard frames over N devices (on CPU: N host devices, one per core)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("double", "single"), default="double",
        help="complex128 or complex64 Bloch solves",
    )  # fmt: skip
    parser.add_argument("--lm-rounds", type=int, default=2, help="Levenberg–Marquardt rounds")
    parser.add_argument("--lm-iterations", type=int, default=4)
    parser.add_argument("--polish-steps", type=int, default=10, help="Adam steps after each LM")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edkit`` command."""
    parser = argparse.ArgumentParser(prog="edkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    refine = commands.add_parser("refine", help="refine a structure against a PETS2 dataset")
    refine.add_argument("--structure", required=True, help="starting CIF")
    refine.add_argument("--data", required=True, help="PETS2 .cif_pets file")
    _add_refine_options(refine)
    demo = commands.add_parser(
        "demo",
        help="refine the bundled real quartz data (every 3rd frame) from the kinematical start",
    )
    _add_refine_options(demo)
    demo.set_defaults(every=3, steps=40, lm_rounds=1, lm_iterations=3, polish_steps=0)
    args = parser.parse_args(argv)
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
    except EdkitError as error:
        print(f"edkit: error: {error}", file=sys.stderr)
        return 2
    _print_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
