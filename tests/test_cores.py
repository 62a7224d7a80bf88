"""edkit.cores: one CPU device per core, LAPACK single-threaded inside each, and the frames
sharded over them by default with the single-device results (thickness search, a refinement
step). The import checks run in fresh processes (the device count is fixed once JAX starts)."""

import json
import os
import textwrap

import pytest
from conftest import run_python

from edkit import cores

REPORT = textwrap.dedent(
    """
    import json, sys
    {before}
    import edkit, jax, threadpoolctl
    from edkit import cores
    jax.numpy.zeros(1).block_until_ready()
    blas = {{lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()}}
    print(json.dumps({{"devices": jax.local_device_count(), "blas": blas,
                      "usable": cores.usable_cores()}}))
    """
)


def _import_report(before: str = "", **environment: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cores.ENVIRONMENT)}
    result = run_python(REPORT.format(before=before), {**env, **environment}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _scipy_threads(report: dict) -> list[int]:
    return [n for path, n in report["blas"].items() if "scipy.libs" in path]


def test_import_asks_for_one_cpu_device_per_core_and_single_threaded_lapack() -> None:
    report = _import_report()
    expected = min(report["usable"], cores.MAX_DEVICES)
    assert report["devices"] == expected
    if expected > 1:
        assert _scipy_threads(report) and set(_scipy_threads(report)) == {1}
        numpy_threads = [n for path, n in report["blas"].items() if "numpy.libs" in path]
        assert all(n == report["usable"] for n in numpy_threads)  # NumPy's BLAS untouched


def test_the_users_choice_wins() -> None:
    single = _import_report(**{cores.ENVIRONMENT: "1"})
    assert single["devices"] == 1
    assert all(n == single["usable"] for n in _scipy_threads(single))  # threads left alone
    assert _import_report(**{cores.ENVIRONMENT: "3"})["devices"] == 3
    forced = _import_report(XLA_FLAGS="--xla_force_host_platform_device_count=3")
    assert forced["devices"] == 3
    # JAX already running before edkit is imported: its one device stays, no error.
    started = _import_report(before="import jax; jax.numpy.ones(1).block_until_ready()")
    assert started["devices"] == 1


def test_a_bad_environment_value_is_ignored_with_a_warning() -> None:
    environment = {**os.environ, cores.ENVIRONMENT: "lots"}
    result = run_python("import edkit", environment, "-W", "error::UserWarning", timeout=120)
    assert result.returncode != 0
    assert "EDKIT_CPU_DEVICES='lots' is not a positive integer" in result.stderr


SHARDED = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    import edkit
    from edkit.refine.planner import plan_memory
    from edkit.simulate.frames import build_frame_setup
    from edkit.simulate.stream import stream_frames
    from edkit.simulate.thickness_search import thickness_search
    from edkit.physics.structure import structure_params, structure_tables

    devices = jax.local_device_count()
    crystal = edkit.read_cif(edkit.example_file("quartz_kinematical.cif"))
    data = edkit.read_pets(edkit.example_file("quartz_experimental.cif_pets"))
    data = edkit.select_frames(data, [0, 10, 20, 30, 40])  # odd count: a padded shard

    # The thickness search sharded over two devices and on one.
    setup = build_frame_setup(crystal, data, g_max=1.0, n_sub=6)
    grid = np.arange(100.0, 1501.0, 50.0)
    one = thickness_search(crystal, data, grid, setup=setup, devices=1, chunk_frames=4)
    two = thickness_search(crystal, data, grid, setup=setup, devices=2, chunk_frames=4)
    np.testing.assert_allclose(two["r_obs_frame"], one["r_obs_frame"], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(two["thickness_best"], one["thickness_best"])

    # Simulated frames (streamed, sharded by default) and on one device.
    with jax.enable_x64(True):
        args = (structure_params(crystal), structure_tables(crystal), setup,
                np.full((setup.n_frames, 2), 400.0))
        np.testing.assert_allclose(stream_frames(*args), stream_frames(*args, devices=1),
                                   rtol=1e-12, atol=1e-14)

    # A refinement shards by default; its steps are those of one device.
    options = {"g_max": 1.0, "n_sub": 6, "thickness_grid": (300.0, 900.0, 100.0)}
    default = edkit.Refinement(crystal, data, **options)
    single = edkit.Refinement(crystal, data, devices=1, **options)
    np.testing.assert_allclose(default.thickness.values, single.thickness.values, rtol=1e-12)
    losses = []
    for _ in range(2):
        a, b = default.step(), single.step()
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-11)
        losses.append(a["loss"])
    np.testing.assert_allclose(default.crystal.fract, single.crystal.fract, rtol=0, atol=1e-12)

    # The planner: fewer devices when a chunk of one frame each does not fit.
    one_plan = plan_memory(setup, devices=1, memory_limit=20e9)
    tight = plan_memory(setup, devices=None,
                        memory_limit=one_plan.fixed_bytes + 1.5 * one_plan.frame_bytes)
    roomy = plan_memory(setup, devices=None, memory_limit=20e9)
    given = [plan_memory(setup, devices=None, chunk_frames=c, memory_limit=20e9).devices
             for c in (1, 3, 4)]
    print(json.dumps({
        "devices": devices, "default_plan": default.memory_plan.devices,
        "described": default.memory_plan.describe(), "single_plan": single.memory_plan.devices,
        "tight": [tight.devices, tight.chunk_frames],
        "roomy": [roomy.devices, roomy.chunk_frames], "given": given, "losses": losses,
    }))
    """
)


@pytest.mark.slow  # 52 s in CI (2026-12-06): keeps the default test run under 10 minutes
def test_sharded_search_frames_and_steps_give_the_single_device_results() -> None:
    """In a fresh process with edkit's default devices (two forced if this machine has one
    core): the search, simulated frames and refinement steps equal one device's; the planner
    uses fewer devices when their chunk does not fit and never pads a given chunk size."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cores.ENVIRONMENT)}
    if cores.usable_cores() < 2:
        env[cores.ENVIRONMENT] = "2"
    result = run_python(SHARDED, env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    devices = report["devices"]
    assert devices >= 2
    assert report["default_plan"] == min(devices, 5)
    assert f"sharded over {min(devices, 5)} devices" in report["described"]
    assert report["single_plan"] == 1
    assert report["tight"] == [1, 1]
    assert report["roomy"][0] == min(devices, 5) and report["roomy"][1] % report["roomy"][0] == 0
    assert report["given"][0] == 1 and 3 % report["given"][1] == 0 and report["given"][2] >= 2
    assert all(loss > 0 for loss in report["losses"])
