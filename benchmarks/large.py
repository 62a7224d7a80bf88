"""A CsPbBr₃-sized refinement epoch: borane (Pccn, 20 atoms in the asymmetric unit, 1386 Å³),
60 frames × 60 sub-orientations, about 610 beams per frame before pruning.

The rotation series is generated (α from −60° in 2° steps, θ = 1°), its intensities simulated
by edkit itself (``edkit.synthetic.make_dataset``) so the loss is realistic. Methods, each in its
own process (peak memory is its own), each adding one step to the previous one:

* ``exact``: every beam with |S_g| ≤ sg_weak solved exactly, complex Hermitian solves — timed on
  ``--exact-frames`` frames and extrapolated to all frames (the method the Bethe route replaces);
* ``bethe``: beams with |S_g| ≤ sg_max solved exactly, the rest up to sg_weak as Bethe
  potentials built at every sub-orientation, the whole frame recomputed in the backward pass
  (``remat=True``), eight frames per batch (the first Bethe version);
* ``shared``: the Bethe correction shared by each frame's sub-orientations (``bethe_terms``
  Chebyshev terms in the angle instead of one n²·n_w product per sub-orientation), the backward
  pass keeping the eigendecompositions (``remat="eigensystems"``), one frame per batch;
* ``real``: borane is centrosymmetric (Pccn, inversion at the origin): real potentials and real
  symmetric solves (edkit's default for such crystals), float64;
* ``real-single``: ``real`` with float32 solves (``solve_dtype=complex64``).

Each prints seconds for the forward pass and the epoch (value and gradient), the number of
eigendecompositions and their mean size, the process's peak resident memory (``peak MB``: the
whole process, the epoch included; the heap XLA's compiler frees is handed back with glibc's
``malloc_trim`` before the first run) and the peak while compiling (``compile MB``), and the
epoch's ratios to ``exact`` and to the previous row.
Run: ``python benchmarks/large.py [--frames 60] [--n-sub 60] [--methods real,real-single]``
(about 20 minutes for every method on a 2-core CPU; notebooks/06_performance.ipynb runs a
small version).
"""

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time  # benchmarks/timing.py (script dir on sys.path)

import edkit
from edkit import metrics
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import build_frame_setup, frame_intensity_stack, reflection_intensities
from edkit.simulate.synthetic import make_dataset, rotation_series

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


def _release_freed_heap() -> None:
    """Hand the heap that XLA's compiler freed back to the OS (glibc ``malloc_trim``; ~1.2 GB
    here), so that the epoch's peak memory is the epoch's, not the compiler's leftovers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def measure(method: str, args) -> dict:
    crystal = edkit.read_cif(edkit.example_file("borane.cif"))
    data = _dataset(args.frames, args.n_sub, args.cache)
    shared = method in ("shared", "real", "real-single")
    if method == "exact":
        data = edkit.select_frames(data, slice(0, None, max(1, args.frames // args.exact_frames)))
        setup = build_frame_setup(crystal, data, g_max=G_MAX, sg_max=SG_WEAK, n_sub=args.n_sub)
    else:
        setup = build_frame_setup(
            crystal, data, g_max=G_MAX, sg_max=SG_MAX, sg_weak=SG_WEAK, n_sub=args.n_sub,
            bethe_terms=args.bethe_terms if shared else None,
        )  # fmt: skip
    options = {
        "solve_dtype": jnp.complex64 if method == "real-single" else None,
        "real_potential": method.startswith("real"),
        "batch_size": 1 if shared else 8,
    }
    remat = "eigensystems" if shared else True
    tables = structure_tables(crystal)
    i_obs = jnp.asarray(data["I_obs"].values)
    sigma = jnp.asarray(data["sigma"].values)
    mask = jnp.asarray(setup.scored)
    frames = jnp.asarray(setup.refl_frame)

    def loss(params, thickness):
        stack = frame_intensity_stack(params, tables, setup, thickness, remat=remat, **options)
        i_calc = reflection_intensities(setup, stack[:, 0, :])
        return metrics.jana_wr_loss(i_obs, sigma, i_calc, mask, frames, setup.n_frames)

    with jax.enable_x64(True):
        params = structure_params(crystal)
        thickness = jnp.full((setup.n_frames, 1), THICKNESS)
        forward = jax.jit(lambda p, t: frame_intensity_stack(p, tables, setup, t, **options))
        epoch = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        start = time.perf_counter()
        forward = forward.lower(params, thickness).compile()
        epoch = epoch.lower(params, thickness).compile()
        compile_seconds = time.perf_counter() - start
        compile_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _release_freed_heap()
        jax.block_until_ready(forward(params, thickness))
        jax.block_until_ready(epoch(params, thickness))
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
        "compile_peak_mb": compile_peak,
        "n_scored": int(setup.scored.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--n-sub", type=int, default=60)
    parser.add_argument("--exact-frames", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="exact,bethe,shared,real,real-single")
    parser.add_argument("--bethe-terms", type=int, default=12)
    parser.add_argument("--cache", help="netCDF of the simulated series (default: in TMPDIR)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache is None:
        name = f"edkit_borane_{args.frames}x{args.n_sub}.nc"
        args.cache = os.path.join(tempfile.gettempdir(), name)
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
        f"{'ep/fwd':>6} {'vs exact':>8} {'vs prev':>7} {'peak MB':>8} {'compile MB':>10}  note"
    )
    first = previous = None
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--one", method]
        for key in ("frames", "n_sub", "exact_frames", "repeats", "cache", "bethe_terms"):
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
            f"{first['epoch'] / row['epoch']:8.2f} "
            f"{(previous or row)['epoch'] / row['epoch']:7.2f} {row['peak_mb']:8.0f} "
            f"{row['compile_peak_mb']:10.0f}  {note}",
            flush=True,
        )
        previous = row


if __name__ == "__main__":
    main()
