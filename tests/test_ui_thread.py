"""UiThread: display updates from a worker thread run on the kernel's thread, in order."""

import asyncio
import threading

from edkit.widgets.ui_thread import UiThread


def test_calls_from_a_worker_run_on_the_loop_thread_in_order():
    async def main() -> tuple[list[tuple[int, str]], UiThread]:
        ui = UiThread()  # created while the loop runs, like a widget in a notebook cell
        seen: list[tuple[int, str]] = []

        def record(i: int) -> None:
            seen.append((i, threading.current_thread().name))

        def fail() -> None:
            raise RuntimeError("Set changed size during iteration")

        def worker() -> None:
            for i in range(5):
                ui.call(record, i)
                if i == 2:
                    ui.call(fail)  # a display glitch: logged, the later calls still run

        thread = threading.Thread(target=worker, name="worker")
        thread.start()
        thread.join()
        assert seen == []  # nothing ran on the worker; the loop has not had its turn yet
        for _ in range(3):
            await asyncio.sleep(0)
        return seen, ui

    seen, ui = asyncio.run(main())
    assert seen == [(i, "MainThread") for i in range(5)]
    assert len(ui.errors) == 1 and "changed size" in str(ui.errors[0])


def test_drain_runs_queued_calls_on_a_blocked_loop_thread():
    """A cell that waits (``panel.wait()``) blocks the loop; drain() shows the updates."""

    async def main() -> list[int]:
        ui = UiThread()
        seen: list[int] = []
        thread = threading.Thread(target=lambda: [ui.call(seen.append, i) for i in range(3)])
        thread.start()
        thread.join()
        ui.drain()  # on the owner thread, without yielding to the loop
        return seen

    assert asyncio.run(main()) == [0, 1, 2]


def test_without_a_loop_calls_run_at_once():
    ui = UiThread()
    seen: list[str] = []
    thread = threading.Thread(target=lambda: ui.call(seen.append, "now"))
    thread.start()
    thread.join()
    assert seen == ["now"]
