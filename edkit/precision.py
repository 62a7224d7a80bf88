"""Scoped float64: edkit's physics runs in float64 without flipping JAX's global flag."""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import jax

P = ParamSpec("P")
R = TypeVar("R")


def x64(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` inside ``jax.enable_x64(True)`` (float64/complex128 arrays)."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with jax.enable_x64(True):
            return function(*args, **kwargs)

    return wrapper
