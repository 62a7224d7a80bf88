"""Scoped float64: edkit's physics runs in float64 without flipping JAX's global flag."""

import functools
from collections.abc import Callable

import jax


def x64[**P, R](function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` inside ``jax.enable_x64(True)`` (float64/complex128 arrays)."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with jax.enable_x64(True):
            return function(*args, **kwargs)

    return wrapper
