"""A CsPbBr₃-sized refinement epoch: borane (Pccn, 20 atoms in the asymmetric unit, 1386 Å³),
60 frames × 60 sub-orientations, about 610 beams per frame before pruning.

The rotation series is generated (α from −60° in 2° steps, θ = 1°), its intensities simulated
by edkit itself (``edkit.synthetic.make_dataset``) so the loss is realistic. Methods, each in its
own process (peak memory is its own):

* ``exact``: every beam with |S_g| ≤ sg_weak solved exactly — timed on ``--exact-frames`` frames
  and extrapolated to all frames (it is the method the Bethe route replaces);
* ``bethe``: beams with |S_g| ≤ sg_max solved exactly, the rest up to sg_weak as Bethe
  potentials, complex128;
* ``bethe-single``: the same with complex64 solves.

Each prints seconds for the forward pass and the epoch (value and gradient), the number of
eigendecompositions and their mean size, peak resident memory, and the epoch ratio to ``exact``.
Run: ``python benchmarks/large.py [--frames 60] [--n-sub 60]``.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time  # benchmarks/timing.py (script dir on sys.path)

import edkit
from edkit.frames import build_frame_setup, frame_intensity_stack, reflection_intensities
from edkit.refine import metrics
from edkit.structure import structure_params, structure_tables
from edkit.synthetic import make_dataset, rotation_series

G_MAX = 1.2  # Å⁻¹
SG_MAX = 0.005  # Å⁻¹, exact
SG_WEAK = 0.04  # Å⁻¹, Bethe
THICKNESS = 600.0  # Å


def _dataset(n_frames: int, n_sub: int, cache: str):
    """The borane rotation series with simulated intensities (cached as netCDF)."""
    if os.path.exists(cache):
        import xarray as xr

        return xr.load_dataset(cache, engine="h5netcdf")
    crystal = edkit.read_cif(edkit.example_file("borane.cif"))
    geometry = rotation_series(
        cell=crystal.cell, alpha_start=-60.0, alpha_step=2.0, n_frames=n_frames, semiangle=1.0
    )
    data = make_dataset(
        crystal, geometry, THICKNESS, g_max=G_MAX, sg_max=SG_MAX, n_sub=n_sub, seed=1
    )
    data.to_netcdf(cache, engine="h5netcdf")
    return data


def measure(method: str, args) -> dict:
    crystal = edkit.read_cif(edkit.example_file("borane.cif"))
    data = _dataset(args.frames, args.n_sub, args.cache)
    if method == "exact":
        data = edkit.select_frames(data, slice(0, None, max(1, args.frames // args.exact_frames)))
        setup = build_frame_setup(crystal, data, g_max=G_MAX, sg_max=SG_WEAK, n_sub=args.n_sub)
    else:
        setup = build_frame_setup(
            crystal, data, g_max=G_MAX, sg_max=SG_MAX, sg_weak=SG_WEAK, n_sub=args.n_sub
        )
    solve_dtype = jnp.complex64 if method == "bethe-single" else None
    tables = structure_tables(crystal)
    i_obs = jnp.asarray(data["I_obs"].values)
    sigma = jnp.asarray(data["sigma"].values)
    mask = jnp.asarray(setup.scored)
    frames = jnp.asarray(setup.refl_frame)

    def loss(params, thickness):
        stack = frame_intensity_stack(
            params, tables, setup, thickness, solve_dtype=solve_dtype, remat=True
        )
        i_calc = reflection_intensities(setup, stack[:, 0, :])
        return metrics.jana_wr_loss(i_obs, sigma, i_calc, mask, frames, setup.n_frames)

    with jax.enable_x64(True):
        params = structure_params(crystal)
        thickness = jnp.full((setup.n_frames, 1), THICKNESS)
        forward = jax.jit(
            lambda p, t: frame_intensity_stack(p, tables, setup, t, solve_dtype=solve_dtype)
        )
        epoch = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        start = time.perf_counter()
        jax.block_until_ready(forward(params, thickness))
        jax.block_until_ready(epoch(params, thickness))
        compile_seconds = time.perf_counter() - start
        t_forward = best_time(lambda: forward(params, thickness), args.repeats)
        t_epoch = best_time(lambda: epoch(params, thickness), args.repeats)
    sizes = np.concatenate(
        [np.full(len(b), s) for b, s in zip(setup.buckets, setup.bucket_sizes, strict=True)]
    )
    scale = args.frames / setup.n_frames  # exact: extrapolate to all frames
    return {
        "method": method,
        "frames_timed": setup.n_frames,
        "solves": int(args.frames * setup.settings["n_sub"]),
        "mean_size": float(sizes.mean()),
        "beams": float(setup.n_beams.mean()),
        "weak": float(setup.n_weak.mean()),
        "compile": compile_seconds,
        "forward": t_forward * scale,
        "epoch": t_epoch * scale,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "n_scored": int(setup.scored.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--n-sub", type=int, default=60)
    parser.add_argument("--exact-frames", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="exact,bethe,bethe-single")
    parser.add_argument("--cache", default="/tmp/edkit_borane_bench.nc")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    _dataset(args.frames, args.n_sub, args.cache)  # simulate once, outside the timed processes
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} "
        f"({jax.default_backend()}); borane, {args.frames} frames × {args.n_sub} "
        f"sub-orientations, g_max {G_MAX}, exact |S|≤{SG_MAX}, Bethe ≤{SG_WEAK} Å⁻¹"
    )
    print(
        f"{'method':13} {'solves':>6} {'size':>5} {'weak':>5} {'fwd s':>8} {'epoch s':>8} "
        f"{'ep/fwd':>6} {'vs exact':>8} {'peak MB':>8}  note"
    )
    first = None
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--one", method]
        for key in ("frames", "n_sub", "exact_frames", "repeats", "cache"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        first = first or row
        note = (
            f"timed on {row['frames_timed']} frames, scaled"
            if row["frames_timed"] < args.frames
            else ""
        )
        print(
            f"{method:13} {row['solves']:6d} {row['mean_size']:5.0f} {row['weak']:5.0f} "
            f"{row['forward']:8.2f} {row['epoch']:8.2f} {row['epoch'] / row['forward']:6.2f} "
            f"{first['epoch'] / row['epoch']:8.2f} {row['peak_mb']:8.0f}  {note}",
            flush=True,
        )


if __name__ == "__main__":
    main()
