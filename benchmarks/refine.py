"""Refinement epoch benchmark on the real quartz settings.

One epoch = value and gradient of the refinement loss over all frames (99 frames × the default
sub-orientations, g_max 1.6 Å⁻¹, profile-net thickness). Prints seconds per epoch, the forward
pass alone, their ratio, and the Levenberg–Marquardt Jacobian time (P tangent passes).
Run: ``python benchmarks/refine.py [--every N]``.
"""

import argparse
import os
import platform
import time
from importlib.resources import files

import jax
from flax import nnx
from timing import best_time  # benchmarks/timing.py (script dir on sys.path)

import edkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--every", type=int, default=1, help="use every N-th frame")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="shard frames over N devices (CPU: set XLA_FLAGS host device count first)",
    )
    parser.add_argument("--precision", choices=("double", "single"), default="double")
    parser.add_argument("--sg-max", type=float, default=None, help="strong-beam cutoff, Å⁻¹")
    parser.add_argument("--sg-weak", type=float, default=None, help="Bethe cutoff, Å⁻¹")
    args = parser.parse_args()
    data_dir = files("edkit") / "data"
    crystal = edkit.read_cif(str(data_dir / "structures" / "quartz_kinematical.cif"))
    data = edkit.read_pets(str(data_dir / "pets" / "quartz_experimental.cif_pets"))
    if args.every > 1:
        data = edkit.select_frames(data, slice(0, None, args.every))
    start = time.perf_counter()
    refinement = edkit.Refinement(
        crystal,
        data,
        thickness="profile-net",
        devices=args.devices,
        precision=args.precision,
        **({} if args.sg_max is None else {"sg_max": args.sg_max}),
        sg_weak=args.sg_weak,
    )
    setup_seconds = time.perf_counter() - start
    setup = refinement.setup
    n_solves = setup.n_frames * setup.settings["n_sub"]

    with jax.enable_x64(True):
        forward = jax.jit(lambda s: nnx.merge(refinement.graphdef, s)(refinement.context).i_calc)
        value_and_grad = jax.jit(jax.value_and_grad(lambda s: refinement._loss_terms(s)[0]))
        state = refinement.state
        start = time.perf_counter()
        jax.block_until_ready(forward(state))
        jax.block_until_ready(value_and_grad(state))
        compile_seconds = time.perf_counter() - start
        t_forward = best_time(lambda: forward(state), args.repeats)
        t_epoch = best_time(lambda: value_and_grad(state), args.repeats)
        jacobian = refinement._jacobian_function()
        jax.block_until_ready(jacobian(state))
        t_jacobian = best_time(lambda: jacobian(state), max(1, args.repeats - 1))
    n_free = int(refinement.mapping.position_mask.sum() + refinement.mapping.adp_mask.sum())
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} "
        f"({jax.default_backend()}), {args.precision} precision, {args.devices} device(s)"
    )
    print(
        f"# {setup.n_frames} frames × {setup.settings['n_sub']} sub-orientations = {n_solves} "
        f"solves, beams/frame mean {setup.n_beams.mean():.1f} max {setup.n_beams.max()}, "
        f"buckets {setup.bucket_sizes}"
    )
    print(f"set-up (beams, grid search, network fit) {setup_seconds:8.2f} s")
    print(f"compile (forward + value&grad)          {compile_seconds:8.2f} s")
    print(f"forward pass                            {t_forward:8.3f} s")
    print(
        f"epoch (value and gradient)              {t_epoch:8.3f} s   "
        f"ratio {t_epoch / t_forward:.2f}"
    )
    print(
        f"LM Jacobian ({n_free} parameters)          {t_jacobian:8.3f} s   "
        f"ratio {t_jacobian / t_forward:.2f}"
    )
    print(f"solves per second (epoch)               {n_solves / t_epoch:8.0f}")


if __name__ == "__main__":
    main()
