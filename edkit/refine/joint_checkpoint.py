"""Save a :class:`~edkit.refine.joint.JointRefinement` and continue it later, exactly.

The folder holds one :mod:`edkit.refine.checkpoint` per dataset (``dataset_1``, ``dataset_2``,
…: its data, start, state, Adam moments and history, with the joint refinement's best state as
the dataset's best) and ``joint.json`` with the joint bookkeeping (names, step count, best loss
and step, the joint losses and records, messages), written last: a folder without it is not a
complete joint checkpoint. Loaded, the next step is the one an uninterrupted run would take (on
CPU bit-identical).
"""

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edkit.errors import EdkitError
from edkit.io.atomic import write_atomically
from edkit.refine import core

if TYPE_CHECKING:
    from edkit.refine.joint import JointRefinement

#: The joint bookkeeping's file in a joint checkpoint folder.
JOINT_FILE = "joint.json"
JOINT_VERSION = 1


def member_folder(folder: Path, index: int) -> Path:
    """Where dataset ``index`` (from 0) of a joint checkpoint lives."""
    return folder / f"dataset_{index + 1}"


def save_joint(joint: "JointRefinement", folder: Path) -> Path:
    """Write ``joint`` into ``folder`` (module docstring); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (member, best) in enumerate(zip(joint.members, joint.best_states, strict=True)):
        # Each dataset's checkpoint carries the joint best (a member keeps no best of its own).
        own = member.best_state, member.best_step, member.best_loss
        member.best_state, member.best_step = best, joint.best_step
        member.best_loss = joint.best_loss
        try:
            member.save(member_folder(folder, k))
        finally:
            member.best_state, member.best_step, member.best_loss = own
    config = {
        "version": JOINT_VERSION,
        "names": joint.names,
        "step_count": joint.step_count,
        "best_step": joint.best_step,
        "best_loss": joint.best_loss if math.isfinite(joint.best_loss) else None,
        "losses": joint._losses,
        "records": joint._records,
        "messages": joint.messages,
        "stop_reason": joint.stop_reason,
    }
    text = json.dumps(config, indent=1)
    write_atomically(folder / JOINT_FILE, lambda path: path.write_text(text))
    return folder


def load_joint(cls: type["JointRefinement"], folder: Path) -> "JointRefinement":
    """A joint refinement from a folder written by :func:`save_joint`."""
    from edkit.refine.refinement import Refinement

    path = folder / JOINT_FILE
    if not path.is_file():
        raise EdkitError(f"{folder}: not a joint checkpoint (no {JOINT_FILE})")
    try:
        config: dict[str, Any] = json.loads(path.read_text())
        names = [str(n) for n in config["names"]]
    except (ValueError, KeyError, TypeError) as error:
        raise EdkitError(f"{path}: corrupted joint checkpoint ({error})") from None
    if config.get("version") != JOINT_VERSION:
        raise EdkitError(f"{path}: joint checkpoint version {config.get('version')!r}, "
                         f"this edkit reads {JOINT_VERSION}")  # fmt: skip
    joint = cls.__new__(cls)
    joint.names = names
    joint.members = [Refinement.load(member_folder(folder, k)) for k in range(len(names))]
    joint.options = joint.members[0].options
    joint.step_count = int(config["step_count"])
    joint.best_step = int(config["best_step"])
    best = config["best_loss"]
    joint.best_loss = math.inf if best is None else float(best)
    joint.best_states = [member.best_state for member in joint.members]
    joint.messages = list(config["messages"])
    joint.stop_reason = str(config["stop_reason"])
    joint._losses = [float(v) for v in config["losses"]]
    joint._records = list(config["records"])
    joint._labels = core.group_labels(joint.members[0].state)
    joint.last_uncertainties = None
    return joint
