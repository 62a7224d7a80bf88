"""Run display updates from worker threads on the kernel's own thread.

A panel steps its refinement in a background thread so the kernel stays free. Its plots are
Bokeh documents that the kernel's thread also changes whenever the browser reports something
(a range, a selection, a redraw), and Bokeh documents are not thread-safe: a stream ``send``
from the worker while the kernel's thread handles such a message once failed a CI run with
"Set changed size during iteration" inside HoloViews. So the worker only computes; every
change to a widget or a plot goes through :class:`UiThread`, which hands it to the kernel's
event loop (``loop.call_soon_threadsafe``), where it runs between the messages the kernel
handles. Outside a kernel (a script, pytest) there is no running loop and updates run at once.
"""

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["UiThread"]

_log = logging.getLogger("edkit.widgets")


class UiThread:
    """Calls made from any thread, run in order on the thread that created this object.

    Created on the kernel's thread while its event loop runs (any widget constructor in a
    notebook cell), it queues calls from other threads and asks the loop to run them; created
    with no running loop, it runs every call at once on the calling thread.

    Attributes:
      errors: exceptions raised by queued calls (logged, never re-raised into the loop).
    """

    def __init__(self) -> None:
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._owner = threading.get_ident()
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.errors: list[BaseException] = []

    @property
    def on_owner(self) -> bool:
        """True on the thread that runs the queued calls."""
        return threading.get_ident() == self._owner

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the owner thread: now if this is it (or there is no
        loop), else as soon as its event loop is free, after every call queued before."""
        loop = self._loop
        if loop is None or (self.on_owner and not self._pending):
            function(*args)
            return
        self._pending.append((function, args))
        if self.on_owner:
            self.drain()
            return
        try:
            loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # the kernel is shutting down: nobody will show the update
            self._pending.clear()

    def drain(self) -> None:
        """Run the queued calls (owner thread only; elsewhere it does nothing)."""
        if not self.on_owner:
            return
        while self._pending:
            function, args = self._pending.popleft()
            try:
                function(*args)
            except Exception as error:  # a display glitch must not stop the refinement
                self.errors.append(error)
                _log.warning("edkit widget update %s failed: %r", function, error)
