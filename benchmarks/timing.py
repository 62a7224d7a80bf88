"""Shared timing helper of the benchmark scripts (style.md §9: compile first, block, min)."""

import time
from collections.abc import Callable
from typing import Any

import jax


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time in seconds of ``fn()`` over ``repeats`` runs, results blocked on."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)
