"""``edkit config`` (a commented TOML template), ``--config FILE`` and ``edkit validate``.

A configuration file holds the flags of ``edkit refine`` under their option names
(``g_max = 1.6``, ``refine = ["positions", "adp"]``): the same names as
:class:`edkit.refine.options.RefinementOptions` and the command line's own (``steps``,
``out``, …). A flag given on the command line wins over the file; paths in the file are relative
to the file. ``edkit validate`` does everything before the first solve — reads the files, checks
the cell, plans the beams and the memory, times one eigendecomposition per beam count — and
says what a refinement would cost, without refining.
"""

import argparse
import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from edkit.cli.flags import options_of
from edkit.errors import EdkitError

#: Keys of the command line that a configuration file cannot set.
NOT_IN_CONFIG = ("command", "config", "resume", "help")
#: Keys whose values are paths, resolved against the configuration file's folder.
PATH_KEYS = ("structure", "data", "out")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each key's action: the first flag of its dest (``--kinematic-start``, not ``--no-…``)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest not in NOT_IN_CONFIG and action.option_strings:
            actions.setdefault(action.dest, action)
    return actions


def _line_of(text: str, key: str) -> str:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return f", line {number}"
    return ""


def read_config(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The values of a TOML configuration as the ``parser``'s (a subcommand's) destinations.

    Raises:
      EdkitError: the file is missing or not TOML (with tomllib's line and column), a key is
        not a flag of the command (with the closest name), or a value has the wrong type or is
        not among the choices (the file, the key and its line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise EdkitError(f"--config {path}: {error.strerror or error}") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise EdkitError(f"--config {path}: not valid TOML: {error}") from None
    actions = _actions(parser)
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{path}{_line_of(text, key)}"
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EdkitError(f"{where}: {key!r} is not an option of edkit refine{hint}")
        values[key] = _converted(key, value, action, where, path.parent)
    return values


def _converted(key: str, value: Any, action: argparse.Action, where: str, folder: Path) -> Any:
    if isinstance(value, dict):
        raise EdkitError(f"{where}: {key} is a table; expected a value")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise EdkitError(f"{where}: {key} = {value!r}: expected true or false")
        return value
    if isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool):
        named = action.default if isinstance(action.default, str) else None  # e.g. "auto"
        if not (isinstance(value, bool) or (named is not None and value == named)):
            also = "" if named is None else f', "{named}"'
            raise EdkitError(f"{where}: {key} = {value!r}: expected true, false{also}")
        return value
    if key == "refine":
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise EdkitError(f"{where}: refine = {value!r}: expected a list of group names")
        return ",".join(value)
    if key == "restraints":
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise EdkitError(
                f"{where}: restraints = {value!r}: expected a list of instructions, e.g. "
                '["DFIX 1.09 C2 H1", "RIGU"]'
            )
        return list(value) or None  # [] is the default: no restraints
    if key in PATH_KEYS:
        if not isinstance(value, str):
            raise EdkitError(f"{where}: {key} = {value!r}: expected a path (a string)")
        return str(folder / value)
    if isinstance(value, list | bool) and not isinstance(action, argparse._StoreConstAction):
        raise EdkitError(f"{where}: {key} = {value!r}: expected a single number or name")
    converter = action.type if callable(action.type) else None
    if converter is not None:
        try:
            value = converter(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise EdkitError(f"{where}: {key} = {value!r}: {error}") from None
    if action.choices is not None and value not in action.choices:
        raise EdkitError(
            f"{where}: {key} = {value!r}: expected one of {', '.join(map(str, action.choices))}"
        )
    return value


def apply_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: dict[str, Any]
) -> None:
    """Set every value of ``args.config`` that the command line left at its default."""
    for key, value in read_config(args.config, parser).items():
        if getattr(args, key) == defaults.get(key):
            setattr(args, key, value)


def template(parser: argparse.ArgumentParser) -> str:
    """A TOML file with every key of ``parser`` (``edkit refine``'s), commented with its help
    and default; keys without a TOML value (no default, None) are commented out."""
    lines = [
        "# edkit refine configuration: edkit refine --config FILE (edkit config > FILE writes",
        "# this template). Every key is optional; a flag given on the command line wins, and",
        "# paths are relative to this file. Keys are the flags' names with _ for -.",
        "",
    ]
    for key, action in _actions(parser).items():
        help_text = (action.help or "").replace("%%", "%").replace("%(default)s", "")
        help_text = help_text.replace("\n", " ")
        value = action.default
        if isinstance(action, argparse._StoreTrueAction):
            shown = "true" if value else "false"
        elif key == "restraints":
            shown = "[]"  # e.g. ["DFIX 1.09 0.02 C2 H1", "RIGU"]
        elif key == "refine" and isinstance(value, str):
            shown = "[" + ", ".join(f'"{group}"' for group in value.split(",")) + "]"
        elif isinstance(value, bool) or value is None:
            shown = None
        elif isinstance(value, int | float):
            shown = repr(value)
        else:
            shown = f'"{value}"'
        lines.append(f"# {help_text}")
        lines.append(f"{key} = {shown}" if shown is not None else f"# {key} = ")
        lines.append("")
    return "\n".join(lines)


def validate(args: argparse.Namespace) -> str:
    """Check the inputs and plan a refinement without solving; the lines to print."""
    from edkit.io.cif import read_cif
    from edkit.io.pets import read_pets, select_frames
    from edkit.refine.estimate import estimate_time
    from edkit.refine.kinematic import start_plan
    from edkit.refine.lm import n_free_parameters
    from edkit.refine.options import options_from
    from edkit.refine.prepare import plan_setup

    options = options_from(**options_of(args))
    for flag, path in (("--structure", args.structure), ("--data", args.data)):
        if not Path(path).is_file():
            raise EdkitError(f"{flag} {path}: no such file")
    crystal = read_cif(args.structure)
    dataset = read_pets(args.data)
    if args.every > 1:
        dataset = select_frames(dataset, slice(0, None, args.every))
    setup, mapping, plan = plan_setup(crystal, dataset, options)
    beams = setup.n_beams
    n_free = n_free_parameters(mapping, options.refine)
    searches = args.searches if args.searches is not None else (0 if args.steps else 3)
    steps = (args.steps or args.max_steps) * (1 + searches)  # as the schedule counts them
    lm_iterations = args.lm_rounds * args.lm_iterations
    estimated = estimate_time(setup, plan.devices, n_free, plan.precision, plan.polish_precision)
    estimate = estimated.describe(steps, searches, lm_iterations)
    lines = [
        f"{args.structure}: {crystal.space_group}, {len(crystal.labels)} atoms in the "
        f"asymmetric unit, {n_free} least-squares parameters",
        f"{args.data}: {len(dataset.frame)} frames, {dataset.sizes['refl']} reflections, "
        f"{int(setup.scored.sum())} scored; cell matches within 1 %",
        f"{setup.settings['n_sub']} sub-orientations per frame; beams per frame "
        f"{int(beams.min())}–{int(beams.max())} exact (|S| ≤ {options.sg_max:g} Å⁻¹)"
        + (
            f", {int(setup.n_weak.min())}–{int(setup.n_weak.max())} as Bethe potentials"
            if setup.weak_valid is not None
            else ""
        )
        + (
            f"; {setup.settings['segments']} runs per frame of "
            f"{int(setup.segments.n_beams.min())}–{int(setup.segments.n_beams.max())} beams"
            if setup.segments is not None
            else ""
        ),
        plan.describe(),
        estimate,
        start_plan(options),
        "valid: edkit refine with the same flags would start",
    ]
    return "\n".join(lines)
