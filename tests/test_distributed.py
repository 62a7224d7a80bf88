"""Two processes, one CPU device each, joined by ``jax.distributed`` (JAX's multi-controller
model, the several-hosts path of the README) give one process's refinement: the same thickness
search, loss and gradient, and the same loss after two optimiser steps. Collectives between the
processes go through Gloo over TCP."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import edkit
from edkit.refine import core

WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    process, port, data_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{{port}}", num_processes=2, process_id=process)
    assert (len(jax.devices()), len(jax.local_devices())) == (2, 1), jax.devices()
    import numpy as np
    import edkit
    from edkit.refine import core
    crystal = edkit.read_cif(data_dir + "/structures/quartz_kinematical.cif")
    data = edkit.read_pets(data_dir + "/pets/quartz_experimental.cif_pets")
    data = edkit.select_frames(data, slice(0, None, {every}))
    refinement = edkit.Refinement(crystal, data, g_max={g_max}, devices=2, progress=False)
    loss, grads = core.value_and_grad(refinement.state, refinement.problem)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(grads)]
    thickness = np.asarray(refinement.thickness.values)
    after = refinement.step(2)["loss"]  # the optimiser's steps on the replicated parameters
    np.savez(out, loss=np.asarray(loss), thickness=thickness, after=after, *leaves)
    """
)
EVERY, G_MAX = 20, 1.6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow  # two fresh processes compile the step: 57 s, 104 s on one pinned core
def test_two_processes_give_the_single_process_step(data_dir, tmp_path) -> None:
    code = WORKER.format(every=EVERY, g_max=G_MAX)
    port = str(_free_port())
    env = {**os.environ, "EDKIT_CPU_DEVICES": "1"}
    env.pop("XLA_FLAGS", None)
    outputs = [tmp_path / f"process{i}.npz" for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i), port, str(data_dir), str(outputs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [worker.communicate(timeout=600)[0] for worker in workers]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]

    crystal = edkit.read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    data = edkit.read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    data = edkit.select_frames(data, slice(0, None, EVERY))
    refinement = edkit.Refinement(crystal, data, g_max=G_MAX, devices=1, progress=False)
    with jax.enable_x64(True):
        loss, grads = core.value_and_grad(refinement.state, refinement.problem)
    expected = [np.asarray(leaf) for leaf in jax.tree.leaves(grads)]
    thickness = np.asarray(refinement.thickness.values)
    after = refinement.step(2)["loss"]
    for output in outputs:  # both processes hold the whole (replicated) result
        result = np.load(output)
        np.testing.assert_allclose(result["thickness"], thickness, rtol=1e-12)
        np.testing.assert_allclose(result["loss"], np.asarray(loss), rtol=1e-12)
        np.testing.assert_allclose(result["after"], after, rtol=1e-12)
        assert after < float(loss)
        assert len(result.files) == len(expected) + 3
        leaves = [result[f"arr_{i}"] for i in range(len(expected))]
        for got, want in zip(leaves, expected, strict=True):
            # 3e-16 at most measured (gradients up to 3): the same sums, split over processes
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
