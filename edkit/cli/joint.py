"""``edkit refine --data A.cif_pets --data B.cif_pets``: one structure against several datasets
(:class:`edkit.refine.joint.JointRefinement`): Adam until converged, the joint least squares,
the refined CIF with joint s.u.'s, and ``report.json`` with a ``datasets`` entry per file."""

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
    """Run the joint refinement the flags describe; returns report.json's content and the
    output folder. No checkpoints yet: ``--resume`` is refused."""
    from edkit.io.cif import read_cif
    from edkit.io.pets import read_pets, select_frames
    from edkit.refine.joint import JointRefinement

    if args.resume is not None:
        raise EdkitError("--resume: a joint refinement (several --data) writes no checkpoints yet")
    if args.absolute_structure:
        raise EdkitError("--absolute-structure with several --data is not supported yet")
    started = time.perf_counter()
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
    start_wr = joint.report()["wr_all"]
    until_converged = args.steps is None
    joint.run(args.max_steps if until_converged else args.steps, progress=not args.quiet,
              until_converged=until_converged)  # fmt: skip
    joint.use_best()
    for _ in range(args.lm_rounds):
        joint.refine_structure(args.lm_iterations)
    joint.write_cif(out / "refined.cif")
    report = joint.report()
    report.update(
        seconds=round(time.perf_counter() - started, 1),
        stages=list(joint.messages),
        structure=str(args.structure),
        data=[str(p) for p in paths],
        divergences=sum("diverged" in m for m in joint.messages),
        improved=bool(report["wr_all"] is not None and report["wr_all"] < start_wr),
        written=["refined.cif", "report.json"],
    )
    report["written"] += _figures_and_page(joint, report, out)
    text = json.dumps(finite_or_none(report), indent=1)
    write_atomically(out / "report.json", lambda path: path.write_text(text))
    return report, out


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
