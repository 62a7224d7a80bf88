"""Files written whole or not at all.

Every file edkit writes (checkpoints, refined CIFs, PETS files, reports, netCDF results) goes
through :func:`write_atomically`: the content is written to ``<name>.partial`` next to the
target, flushed to the disk and renamed over the target, which POSIX makes atomic. A kill at
any moment leaves either the old file or the new one, never half of one; a write that fails (a
full disk, a read-only folder) removes its partial file and raises an :class:`EdkitError` that
names the path.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edkit.errors import EdkitError

#: What is appended to a target's name while it is being written.
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where :func:`write_atomically` writes ``path``'s content before renaming it."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary)`` to write the file, then move it to ``path`` in one rename.

    Args:
      path: the target file; its folder must exist.
      write: writes the whole content to the path it is given (a sibling of ``path``).

    Returns:
      ``path`` as a :class:`~pathlib.Path`.

    Raises:
      EdkitError: the file could not be written (the path and the system's reason); neither a
        partial file nor a changed target is left behind. Errors ``write`` raises itself (an
        :class:`EdkitError` about the content) pass through after the same clean-up.
    """
    target = Path(path)
    temporary = partial_path(target)
    try:
        write(temporary)
        # Flushed before the rename: after a crash the new name never points at lost data.
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = error.strerror or str(error) or type(error).__name__
            raise EdkitError(f"{target}: could not be written ({reason})") from error
        raise
    return target
