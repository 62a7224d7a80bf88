"""Frames sharded over two forced CPU devices give the single-device results."""

import os
import textwrap

import pytest
from conftest import run_python

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import edkit
    from edkit.simulate.frames import build_frame_setup, frame_intensity_stack
    from edkit.physics.structure import structure_params, structure_tables

    assert jax.device_count() == 2, jax.devices()
    data_dir = "{data}"
    crystal = edkit.read_cif(data_dir + "/structures/quartz.cif")
    data = edkit.read_pets(data_dir + "/pets/quartz_experimental.cif_pets")
    data = edkit.select_frames(data, [0, 20, 40, 60, 80])  # odd count: exercises the padding
    setup = build_frame_setup(crystal, data, n_sub=5, g_max=1.0)
    tables, params = structure_tables(crystal), structure_params(crystal)
    thickness = jnp.tile(jnp.array([300.0, 700.0]), (setup.n_frames, 1))

    def loss(p, t, devices):
        stack = frame_intensity_stack(p, tables, setup, t, devices=devices, batch_size=1)
        return jnp.sum(stack * jnp.linspace(0.0, 1.0, stack.shape[-1]))

    single = frame_intensity_stack(params, tables, setup, thickness, batch_size=1)
    sharded = frame_intensity_stack(params, tables, setup, thickness, devices=2, batch_size=1)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-13)
    g1 = jax.grad(loss, argnums=(0, 1))(params, thickness, 1)
    g2 = jax.grad(loss, argnums=(0, 1))(params, thickness, 2)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    print("max forward difference", float(np.max(np.abs(sharded - single))))
    """
)


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_sharded_frames_match_single_device(data_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = run_python(SCRIPT.format(data=data_dir), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max forward difference" in result.stdout
