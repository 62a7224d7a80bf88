"""Refinement epoch benchmark on the real quartz settings, method against method in one run.

One epoch = value and gradient of the refinement loss over all frames (99 frames × the default
sub-orientations, g_max 1.6 Å⁻¹, profile-net thickness), streamed chunk by chunk of frames as
``Refinement`` does it (``edkit.refine.core.value_and_grad``; chunks chosen by the memory
planner). Each method runs in its own process
(so its peak memory is its own) and prints: seconds per epoch, the forward pass alone, their
ratio, the number of eigendecompositions and their mean size, the peak resident memory, and the
epoch's ratio to the first method (the first refinement version: every beam with |S_g| ≤ 0.015
solved exactly, all frames padded to one size, complex128). The default's steps solve in
complex64 (``precision="auto"``); ``shared-double`` is the same in complex128.

Run: ``python benchmarks/refine.py [--every N] [--methods a,b,…]``.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
from timing import best_time  # benchmarks/timing.py (script dir on sys.path)

import edkit
from edkit import cores
from edkit.refine import core
from edkit.refine.problem import build_problem

#: name → (Refinement options, pad every frame to the largest bucket, description)
METHODS: dict[str, tuple[dict, bool, str]] = {
    "v1": (
        {"sg_max": 0.015, "sg_weak": None, "precision": "double"},
        True,
        "|S|≤0.015 exact, one padded size, complex128",
    ),
    "buckets": (
        {"sg_max": 0.015, "sg_weak": None, "precision": "double"},
        False,
        "|S|≤0.015 exact, beam-count buckets",
    ),
    "bethe": (
        {"sg_max": 0.005, "sg_weak": 0.03, "bethe_terms": None, "precision": "double"},
        False,
        "|S|≤0.005 exact + Bethe ≤0.03, built at each sub-orientation",
    ),
    "shared": (
        {"sg_max": 0.005, "sg_weak": 0.03, "bethe_terms": 12},
        False,
        "Bethe shared by 12 Chebyshev terms per frame (the default: complex64 steps)",
    ),
    "shared-double": (
        {"sg_max": 0.005, "sg_weak": 0.03, "bethe_terms": 12, "precision": "double"},
        False,
        "shared Bethe, complex128 steps (the default before 2026-12-06)",
    ),
    "shared-single": (
        {"sg_max": 0.005, "sg_weak": 0.03, "bethe_terms": 12, "precision": "single"},
        False,
        "shared Bethe, complex64 solves everywhere",
    ),
    "runs": (
        {"sg_max": 0.005, "sg_weak": 0.03, "bethe_terms": 12, "segments": 4},
        False,
        "shared Bethe, 4 runs per frame each with its own beams",
    ),
    "runs-tails": (
        {
            "sg_max": 0.005,
            "sg_weak": 0.03,
            "bethe_terms": 12,
            "segments": 4,
            "segment_tails": True,
        },
        False,
        "4 runs with the other beams' first-order tails",
    ),
}


def measure(name: str, every: int, repeats: int, devices: int | None) -> dict:
    """Set up one method's refinement and time its forward pass and epoch (this process)."""
    options, one_size, _ = METHODS[name]
    crystal = edkit.read_cif(edkit.example_file("quartz_kinematical.cif"))
    data = edkit.read_pets(edkit.example_file("quartz_experimental.cif_pets"))
    if every > 1:
        data = edkit.select_frames(data, slice(0, None, every))
    start = time.perf_counter()
    refinement = edkit.Refinement(
        crystal, data, thickness="profile-net", devices=devices, **options
    )
    if one_size:  # the first version: no buckets, every frame at the largest size
        refinement.setup = dataclasses.replace(refinement.setup, buckets=(), bucket_sizes=())
        old = refinement.problem
        refinement.problem = build_problem(
            refinement.setup, refinement.i_obs, refinement.sigma, refinement.train_mask,
            refinement.validation_mask, tables=old.tables, features=old.features,
            mapping=old.mapping, graphdef=old.graphdef, optimizer=old.optimizer,
            config=old.config, objective=old.objective,
            chunk_frames=refinement.memory_plan.chunk_frames,
        )  # fmt: skip
    setup_seconds = time.perf_counter() - start
    setup, problem = refinement.setup, refinement.problem
    with jax.enable_x64(True):
        state = refinement.state
        start = time.perf_counter()
        jax.block_until_ready(core.predict(state, problem))
        jax.block_until_ready(core.value_and_grad(state, problem))
        compile_seconds = time.perf_counter() - start
        t_forward = best_time(lambda: core.predict(state, problem), repeats)
        t_epoch = best_time(lambda: core.value_and_grad(state, problem), repeats)
    sizes = (
        [setup.hkl.shape[1]] * setup.n_frames
        if not setup.buckets
        else [s for b, s in zip(setup.buckets, setup.bucket_sizes, strict=True) for _ in b]
    )
    return {
        "name": name,
        "frames": setup.n_frames,
        "n_sub": setup.settings["n_sub"],
        "solves": setup.n_frames * setup.settings["n_sub"],
        "mean_size": float(sum(sizes) / len(sizes)),
        "beams": float(setup.n_beams.mean()),
        "weak": float(setup.n_weak.mean()),
        "setup": setup_seconds,
        "compile": compile_seconds,
        "forward": t_forward,
        "epoch": t_epoch,
        "chunks": len(problem.chunks),
        "devices": refinement.memory_plan.devices,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--every", type=int, default=1, help="use every N-th frame")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="shard frames over N devices (default: every local device, on CPU one per core "
        "as edkit.cores sets up; 1 for the single-device route)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one method, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.every, args.repeats, args.devices)))
        return
    names = args.methods.split(",")
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} "
        f"({jax.default_backend()}), {cores.describe()}, devices={args.devices or 'default'}; "
        f"real quartz, every "
        f"{args.every} frame(s), profile-net thickness"
    )
    header = (
        f"{'method':13} {'solves':>6} {'size':>5} {'weak':>5} {'fwd s':>7} {'epoch s':>8} "
        f"{'ep/fwd':>6} {'vs v1':>6} {'peak MB':>8} {'dev':>3}  description"
    )
    print(header)
    first = None
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--every", str(args.every)]
        command += ["--repeats", str(args.repeats)]
        if args.devices is not None:
            command += ["--devices", str(args.devices)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        first = first or row
        print(
            f"{name:13} {row['solves']:6d} {row['mean_size']:5.0f} {row['weak']:5.1f} "
            f"{row['forward']:7.3f} {row['epoch']:8.3f} {row['epoch'] / row['forward']:6.2f} "
            f"{first['epoch'] / row['epoch']:6.2f} {row['peak_mb']:8.0f} {row['devices']:3d}  "
            f"{METHODS[name][2]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
