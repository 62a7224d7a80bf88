"""Test set-up: float64 physics, strict rank promotion (style.md §8)."""

import gc
import os
import subprocess
import sys
from pathlib import Path

# One CPU device in the test processes (their subprocesses inherit it): these tests run small
# problems whose time is mostly compiling, and a program sharded over two devices compiles
# slower (the default suite took 699 s instead of ≈ 530 s). tests/test_cores.py checks, in fresh
# processes with edkit's default of one device per core, that sharded searches, frames and
# steps equal one device's. Set EDKIT_CPU_DEVICES yourself to run the suite otherwise.
os.environ.setdefault("EDKIT_CPU_DEVICES", "1")

import jax
import pytest

# Physics is validated in float64; edkit's public entry points scope x64 themselves, the tests
# also call the pure kernels directly, so they need it on globally.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

DATA = Path(__file__).resolve().parents[1] / "edkit" / "data"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module: JAX's compiled programs and traces dropped, garbage collected.

    Every program XLA compiles for the CPU maps its code into the process (about nine memory
    mappings for a small one, more for a large one), and a process may hold at most
    ``vm.max_map_count`` mappings (65530 by default). One pytest process runs every test, and
    the programs kept by jitted functions' caches add up: the slow tests, run one after the
    other, reached the limit, and XLA's compiler then crashed with a segmentation fault (CI,
    2026-12-04, in tests/test_pattern.py). Clearing the caches returns the mappings."""
    yield
    jax.clear_caches()
    gc.collect()


def run_python(
    code: str, env: dict[str, str], *options: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (this interpreter, ``options`` before ``-c``) with
    environment ``env``; its output captured as text, its exit status not checked."""
    return subprocess.run(
        [sys.executable, *options, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The package's bundled data folder (structures/, pets/)."""
    return DATA


@pytest.fixture(scope="module")
def quartz_crystal(data_dir):
    """The published quartz structure (bundled data)."""
    from edkit.io.cif import read_cif

    return read_cif(data_dir / "structures" / "quartz.cif")


@pytest.fixture(scope="module")
def quartz_frames(data_dir):
    """The real quartz dataset (PETS2, bundled data)."""
    from edkit.io.pets import read_pets

    return read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")


def inject_nan_loss(refinement, monkeypatch, at_call: int = 2) -> None:
    """Make the refinement core's step report a NaN loss on its ``at_call``-th call (a
    divergence the Refinement must detect and recover from); other calls are untouched."""
    import jax.numpy as jnp

    from edkit.refine import core

    original, calls = core.step, []

    def step(state, problem):
        new_state, measured = original(state, problem)
        calls.append(1)
        if len(calls) == at_call:
            measured = measured._replace(loss=jnp.asarray(jnp.nan))
        return new_state, measured

    monkeypatch.setattr(core, "step", step)


def twenty_steps_trace_once(r) -> None:
    """20 steps with a learning-rate change and a group switched off in between: the chunk's
    value-and-gradient is traced once per chunk shape (or, for a problem run as one program,
    once), the update once (optax alias_test's log_compilations idea, with a trace counter)."""
    from edkit.refine import core

    pieces = (
        core.intermediates,
        core.chunk_value_and_cotangent,
        core.fused_value_and_cotangent,
        core.apply_gradient,
    )
    for piece in pieces:
        piece.clear_cache()
    core.TRACES.clear()
    messages = list(r.messages)  # the set-up's (the start spread chosen)
    r.step(5)
    r.set_learning_rate("positions", 1e-3)
    r.step(5)
    r.set_enabled("adp", False)
    r.step(5)
    r.set_enabled("adp", True)
    r.set_learning_rate("thickness", 1e-4)
    r.step(5)
    assert r.step_count == 20 and r.messages == messages  # no divergence
    if r.problem.fused:
        assert core.TRACES["fused"] == 1 and core.TRACES["chunk"] == 0
    else:
        assert core.TRACES["chunk"] == len(set(r.problem.chunk_shapes)) >= 1
    assert core.TRACES["apply"] == 1
    assert core.TRACES["intermediates"] == 1
