"""Progress bars with elapsed time and ETA for the long phases (tqdm.auto: a text bar in a
terminal, a widget in a notebook).

A phase that is not told whether to show one (``progress=None``) shows it where someone watches:
an interactive terminal or a Jupyter kernel. Redirected output (logs, ``edkit refine`` captured
by a test) stays clean.
"""

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "wants_progress"]


def wants_progress(progress: bool | None) -> bool:
    """``progress`` itself, or for None: stderr is a terminal, or this runs in a Jupyter kernel."""
    if progress is not None:
        return bool(progress)
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    if type(shell).__name__ == "ZMQInteractiveShell":  # a notebook's (or Voilà's) kernel
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(
    total: int, description: str, unit: str, progress: bool | None, *, leave: bool = False
) -> Any:
    """A tqdm bar over ``total`` units (disabled unless :func:`wants_progress`)."""
    return tqdm(
        total=total, desc=description, unit=unit, disable=not wants_progress(progress), leave=leave
    )
