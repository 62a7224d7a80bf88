"""Frames split over devices: one mesh axis ("frames"), JAX's own sharding (``shard_map``).

On CPU, ``EDKIT_CPU_DEVICES`` (or ``XLA_FLAGS=--xla_force_host_platform_device_count``) makes the
host's cores separate devices; on accelerators they are the devices JAX sees.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edkit.errors import EdkitError


def frame_mesh(devices: int) -> Mesh:
    """The one-axis mesh ("frames") of the first ``devices`` devices that frames are split over.

    Raises:
      EdkitError: JAX sees fewer devices.
    """
    available = jax.devices()
    if devices > len(available):
        raise EdkitError(
            f"devices = {devices}, but JAX sees {len(available)}; on CPU set "
            f"EDKIT_CPU_DEVICES={devices} before importing edkit (or start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices})"
        )
    return Mesh(np.array(available[:devices]), ("frames",))


def replicated(devices: int) -> NamedSharding:
    """Where parameters live when frames are sharded over ``devices``: a copy on each device of
    :func:`frame_mesh` (what the sharded programs return them as, so that every step's inputs
    keep one placement and its program is compiled once)."""
    return NamedSharding(frame_mesh(devices), PartitionSpec())


def sharded_map(map_frames: Callable, shared: tuple, inputs: tuple, devices: int) -> Any:
    """Run ``map_frames(shared, *inputs)`` with the frames (leading axis of ``inputs`` and of
    every output) split over ``devices`` devices (results identical to the single-device map:
    the same per-frame program runs on each shard).

    ``jax.devices()`` is the global device list, so after ``jax.distributed.initialize`` on every
    host the same call spans hosts (multi-controller; see the README; tested with two local
    processes in tests/test_distributed.py)."""
    n = inputs[0].shape[0]
    pad = (-n) % devices  # shards must be equal: repeat the last frame, drop it afterwards
    if pad:
        inputs = tuple(jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) for x in inputs)
    mesh = frame_mesh(devices)
    sharded = jax.shard_map(
        map_frames,
        mesh=mesh,
        in_specs=(PartitionSpec(), *(PartitionSpec("frames") for _ in inputs)),
        out_specs=PartitionSpec("frames"),
    )
    return jax.tree.map(lambda x: x[:n], sharded(shared, *inputs))
