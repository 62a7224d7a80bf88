"""The start of ``edkit refine``: a new run from the flags or a resumed one from its checkpoint
(the refinement, run.json's fields, the schedule, the position and the output folder), and
the memory plan and time estimate printed before the work (for a new run, before the
thickness search)."""

import argparse
from pathlib import Path
from typing import Any

from edkit.cli.flags import DEFAULT_OUT, options_of
from edkit.errors import EdkitError
from edkit.refine import checkpoint
from edkit.refine.schedule import from_run


def print_plan(setup: Any, memory_plan: Any, n_free: int, schedule: Any, position: Any) -> None:
    """The memory plan and the time estimate of what is left of ``schedule``."""
    from edkit.refine.estimate import estimate_time

    print(memory_plan.describe(), flush=True)
    stages_left = schedule.stages()[position.stage :]
    left = schedule.steps_left(position)
    lm_iterations = sum(s.size for s in stages_left if s.kind == "lm")
    if left or lm_iterations:
        searches = sum(s.kind == "search" for s in stages_left)
        estimated = estimate_time(
            setup, memory_plan.devices, n_free, memory_plan.precision,
            memory_plan.polish_precision,
        )  # fmt: skip
        print(estimated.describe(left, searches, lm_iterations), flush=True)


def start_run(args: argparse.Namespace) -> tuple[Any, dict, Any, Any, Path]:
    """A new refinement from the flags: the refinement, run.json's fields, schedule, position
    and output folder."""
    from edkit.io.cif import read_cif
    from edkit.io.pets import read_pets, select_frames
    from edkit.refine.lm import n_free_parameters
    from edkit.refine.options import options_from, parse_memory
    from edkit.refine.prepare import plan_setup
    from edkit.refine.refinement import Refinement
    from edkit.refine.schedule import Position, Schedule

    options = options_of(args)  # checked before any file is read
    for flag, path in (("--structure", args.structure), ("--data", args.data)):
        if not Path(path).is_file():
            raise EdkitError(f"{flag} {path}: no such file")
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    crystal = read_cif(args.structure)
    dataset = read_pets(args.data)
    if args.every > 1:
        dataset = select_frames(dataset, slice(0, None, args.every))
    until_converged = args.steps is None
    searches = args.searches if args.searches is not None else (3 if until_converged else 0)
    schedule = Schedule(
        args.max_steps if until_converged else args.steps, args.lm_rounds, args.lm_iterations,
        args.polish_steps, until_converged, searches,
    )  # fmt: skip
    # The plan and the time estimate before the thickness search (minutes on a large crystal);
    # the set-up they need is seconds and is built again inside the refinement.
    limit = options.get("memory_limit")
    checked = options_from(
        **{**options, "memory_limit": parse_memory(limit) if isinstance(limit, str) else limit}
    )
    setup, mapping, memory_plan = plan_setup(crystal, dataset, checked)
    print(
        f"{len(dataset.frame)} frames, {int(setup.scored.sum())} scored reflections, "
        f"{setup.settings['n_sub']} sub-orientations per frame, beams per frame "
        f"{int(setup.n_beams.min())}–{int(setup.n_beams.max())}",
        flush=True,
    )
    n_free = n_free_parameters(mapping, checked.refine)
    print_plan(setup, memory_plan, n_free, schedule, Position())
    refinement = Refinement(crystal, dataset, progress=False if args.quiet else None, **options)
    if refinement.kinematic_start is not None:
        print(refinement.kinematic_start.describe(), flush=True)
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
        "absolute_structure": bool(args.absolute_structure),
    }
    return refinement, run, schedule, Position(), out


def resume_run(args: argparse.Namespace) -> tuple[Any, dict, Any, Any, Path]:
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
