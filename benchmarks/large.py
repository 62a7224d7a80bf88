"""A CsPbBr₃-sized refinement epoch. Two cases (``--case``):

* ``borane`` (default): borane (Pccn, 20 atoms in the asymmetric unit, 1386 Å³), 60 frames × 60
  sub-orientations, g_max 1.2 Å⁻¹, about 610 beams per frame before pruning; θ = 1°;
* ``cspbbr3``: orthorhombic CsPbBr₃ itself (Pbnm, a 8.2, b 8.4, c 11.8 Å, Z = 4,
  ``edkit/data/structures/cspbbr3.cif``, approximate coordinates), 200 kV, 60 frames, g_max
  2.3 Å⁻¹, θ = 1.47° so that edkit's default sub-orientation step (0.05°) gives 60
  sub-orientations per frame; intensities simulated at 400 Å with the exact beams of
  |S_g| ≤ 0.005 Å⁻¹ (about 810 per frame). Its beam counts per frame are printed first.

The rotation series is generated (α from −60° in 2° steps), its intensities simulated
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
* ``real-single``: ``real`` with float32 solves (``solve_dtype=complex64``);
* ``runs`` (not in the default list): ``real`` with each frame's sub-orientations in
  ``--segments`` runs, each solving only its own beams (``build_frame_setup(segments=...)``);
  ``runs-tails`` adds the first-order tails of the frame's other beams (``tails=True``);
* ``real-wide``, ``runs-wide`` (not in the default list): ``real`` and ``runs`` with twice the
  exact window (|S_g| ≤ 0.01 Å⁻¹). Every method's scored intensities are compared with
  ``real-wide``'s when it ran (``vs wide %``: Σ|ΔI| / ΣI over the reflections both score), else
  with the first method's;
* ``refine-step`` (not in the default list): ``edkit.Refinement(crystal, dataset, g_max=...)``
  with default options (its construction, i.e. planning and the thickness grid search, timed
  separately), then ``step()`` twice: the first compiles, the second is the epoch. Prints the
  peak resident memory and the planner's estimate (``Refinement.memory_plan``) and their ratio.

Each prints seconds for the forward pass and the epoch (value and gradient), the number of
eigendecompositions and their mean size, the process's peak resident memory (``peak MB``: the
whole process, the epoch included; the heap XLA's compiler frees is handed back with glibc's
``malloc_trim`` before the first run) and the peak while compiling (``compile MB``), and the
epoch's ratios to ``exact`` and to the previous row.
Run: ``python benchmarks/large.py [--frames 60] [--n-sub 60] [--methods real,real-single]``
(about 20 minutes for every method on a 2-core CPU; notebooks/06_performance.ipynb runs a
small version); ``python benchmarks/large.py --case cspbbr3 --methods refine-step`` (the first
run simulates and caches the series: about 20 minutes on one core).
"""

import argparse
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
from large_pipeline import measure_pipeline, print_pipeline  # benchmarks/ (script dir on path)
from timing import best_time  # benchmarks/timing.py (script dir on sys.path)

import edkit
from edkit import metrics
from edkit.heap import release_freed_heap
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import build_frame_setup, frame_intensity_stack, reflection_intensities
from edkit.simulate.synthetic import make_dataset, rotation_series

SG_MAX = 0.005  # Å⁻¹, exact
SG_WEAK = 0.04  # Å⁻¹, Bethe
REFINE_SG_WEAK = 0.03  # Å⁻¹, Bethe in edkit.Refinement's defaults (beam counts of cspbbr3)
#: Per case: structure, g_max (Å⁻¹), rocking semi-angle θ (°), simulated thickness (Å),
#: sub-orientations per frame (None: edkit's default step, 60 at θ = 1.47°).
CASES = {
    "borane": {"cif": "borane.cif", "g_max": 1.2, "semiangle": 1.0, "thickness": 600.0,
               "n_sub": 60},
    "cspbbr3": {"cif": "cspbbr3.cif", "g_max": 2.3, "semiangle": 1.47, "thickness": 400.0,
                "n_sub": None},
}  # fmt: skip


def _crystal(args):
    return edkit.read_cif(edkit.example_file(CASES[args.case]["cif"]))


def _dataset(args):
    """The case's rotation series with simulated intensities (cached as netCDF): 200 kV,
    α from −60° in 2° steps, exact beams of |S_g| ≤ SG_MAX (``make_dataset`` has no Bethe)."""
    if os.path.exists(args.cache):
        import xarray as xr

        return xr.load_dataset(args.cache, engine="h5netcdf")
    crystal = _crystal(args)
    geometry = rotation_series(
        cell=crystal.cell, alpha_start=-60.0, alpha_step=2.0, n_frames=args.frames,
        semiangle=args.semiangle, voltage=200e3, dstarmax=args.g_max,
    )  # fmt: skip
    start = time.perf_counter()
    data = make_dataset(
        crystal, geometry, CASES[args.case]["thickness"], g_max=args.g_max, sg_max=SG_MAX,
        n_sub=args.n_sub, seed=1,
    )  # fmt: skip
    print(
        f"# simulated {args.frames} frames × {data.attrs['synthetic_n_sub']} sub-orientations "
        f"in {time.perf_counter() - start:.0f} s: {data.sizes['refl']} reflections -> "
        f"{args.cache}",
        flush=True,
    )
    data.to_netcdf(args.cache, engine="h5netcdf")
    return data


def _beam_counts(args, data) -> str:
    """Beams per frame before pruning (min/median/max over all frames): exact ones
    (|S_g| ≤ SG_MAX at some sub-orientation) and Bethe ones (up to REFINE_SG_WEAK, edkit's
    refinement default, and up to SG_WEAK, this benchmark's)."""
    crystal = _crystal(args)
    lines = []
    for weak in (REFINE_SG_WEAK, SG_WEAK):
        setup = build_frame_setup(
            crystal, data, g_max=args.g_max, sg_max=SG_MAX, sg_weak=weak, n_sub=args.n_sub
        )
        counts = {
            f"exact |S|≤{SG_MAX}": setup.n_beams,
            f"Bethe ≤{weak}": setup.n_weak,
            "together": setup.n_beams + setup.n_weak,
        }
        lines.append(
            "# beams per frame (min/median/max): "
            + ", ".join(f"{k} {v.min()}/{np.median(v):.0f}/{v.max()}" for k, v in counts.items())
            + f" ({setup.settings['n_sub']} sub-orientations)"
        )
    return "\n".join(lines)


def measure(method: str, args) -> dict:
    if method == "pipeline":
        options = {"g_max": args.g_max}
        if args.n_sub != CASES[args.case]["n_sub"]:
            options["n_sub"] = args.n_sub  # a small test's sub-orientations (not a default)
        return measure_pipeline(
            _crystal(args),
            _dataset(args),
            options,
            args.pipeline_steps,
            args.pipeline_lm,
            args.pipeline_lm_frames,
        )
    if method == "refine-step":
        return measure_refine_step(args)
    crystal = _crystal(args)
    data = _dataset(args)
    shared = method in (
        "shared", "real", "real-single", "runs", "runs-tails", "real-wide", "runs-wide"
    )  # fmt: skip
    solves_real = method.startswith(("real", "runs"))
    sg_max = 2 * SG_MAX if method.endswith("-wide") else SG_MAX
    if method == "exact":
        data = edkit.select_frames(data, slice(0, None, max(1, args.frames // args.exact_frames)))
        setup = build_frame_setup(crystal, data, g_max=args.g_max, sg_max=SG_WEAK, n_sub=args.n_sub)
    else:
        setup = build_frame_setup(
            crystal, data, g_max=args.g_max, sg_max=sg_max, sg_weak=SG_WEAK, n_sub=args.n_sub,
            bethe_terms=args.bethe_terms if shared else None,
            segments=args.segments if method.startswith("runs") else 1,
            tails=method == "runs-tails",
        )  # fmt: skip
    options = {
        "solve_dtype": jnp.complex64 if method == "real-single" else None,
        "real_potential": solves_real,
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
        thickness = jnp.full((setup.n_frames, 1), CASES[args.case]["thickness"])
        forward = jax.jit(lambda p, t: frame_intensity_stack(p, tables, setup, t, **options))
        epoch = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        start = time.perf_counter()
        forward = forward.lower(params, thickness).compile()
        epoch = epoch.lower(params, thickness).compile()
        compile_seconds = time.perf_counter() - start
        compile_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        release_freed_heap()
        jax.block_until_ready(forward(params, thickness))
        jax.block_until_ready(epoch(params, thickness))
        t_forward = best_time(lambda: forward(params, thickness), args.repeats)
        t_epoch = best_time(lambda: epoch(params, thickness), args.repeats)
        i_calc = reflection_intensities(setup, forward(params, thickness)[:, 0, :])
    np.savez(_intensity_file(args, method), i_calc=np.asarray(i_calc), scored=setup.scored)
    sizes = np.concatenate(
        [np.full(len(b), s) for b, s in zip(setup.buckets, setup.bucket_sizes, strict=True)]
    )
    if setup.segments is not None:  # the runs' padded sizes: what the solves pay
        runs = setup.segments
        sizes = np.concatenate(
            [np.full(len(b), s) for b, s in zip(setup.buckets, runs.sizes, strict=True)]
        )
    scale = args.frames / setup.n_frames  # exact: extrapolate to all frames
    return {
        "method": method,
        "frames_timed": setup.n_frames,
        "solves": int(args.frames * setup.settings["n_sub"]),
        "n_sub": int(setup.settings["n_sub"]),
        "mean_size": float(sizes.mean()),
        "beams": float(setup.n_beams.mean()),
        "weak": float(setup.n_weak.mean()),
        "compile": compile_seconds,
        "forward": t_forward * scale,
        "epoch": t_epoch * scale,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compile_peak_mb": compile_peak,
        "n_scored": int(setup.scored.sum()),
        "run_beams": None if setup.segments is None else float(setup.segments.n_beams.mean()),
    }


def _intensity_file(args, method: str) -> str:
    return f"{args.cache}.{method}.npz"


def _difference_percent(args, method: str, reference: str) -> float:
    """Σ|I − I_ref| / ΣI_ref (%) over the reflections both methods score."""
    this, ref = (np.load(_intensity_file(args, m)) for m in (method, reference))
    if this["scored"].shape != ref["scored"].shape:  # exact: timed on a subset of frames
        return float("nan")
    both = this["scored"] & ref["scored"]
    return 100.0 * np.abs(this["i_calc"] - ref["i_calc"])[both].sum() / ref["i_calc"][both].sum()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_refine_step(args) -> dict:
    """One full refinement step with edkit's default options, in this process: construction
    (planning, thickness grid search), a first step (compiles), a second step (the epoch), the
    process's peak resident memory and the planner's estimate of it."""
    crystal = _crystal(args)
    data = _dataset(args)
    options = {"g_max": args.g_max}
    if args.n_sub != CASES[args.case]["n_sub"]:
        options["n_sub"] = args.n_sub  # a small test's sub-orientations (not a default)
    start = time.perf_counter()
    refinement = edkit.Refinement(crystal, data, **options)
    construct = time.perf_counter() - start
    construct_peak = _peak_mb()
    plan = getattr(refinement, "memory_plan", None)
    print(
        f"# constructed in {construct:.1f} s, peak {construct_peak:.0f} MB; "
        f"{plan.describe() if plan is not None else 'no memory_plan'}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    refinement.step()
    first = time.perf_counter() - start
    first_peak = _peak_mb()
    print(f"# first step {first:.1f} s, peak {first_peak:.0f} MB", file=sys.stderr, flush=True)
    solved = refinement.seconds
    start = time.perf_counter()
    record = refinement.step()
    epoch = time.perf_counter() - start
    solved = refinement.seconds - solved  # the compiled step alone, without the step's record
    peak = _peak_mb()
    setup = refinement.setup
    row = {
        "method": "refine-step",
        "options": dict(options),
        "n_sub": int(setup.settings["n_sub"]),
        "solves": int(setup.n_frames * setup.settings["n_sub"]),
        "beams": float(setup.n_beams.mean()),
        "weak": float(setup.n_weak.mean()) if setup.n_weak is not None else 0.0,
        "construct": construct,
        "first_step": first,
        "epoch": epoch,
        "epoch_compiled": solved,
        "loss": float(record.get("loss", float("nan"))),
        "r_obs": float(record.get("r_obs", float("nan"))),
        "construct_peak_mb": construct_peak,
        "first_step_peak_mb": first_peak,
        "peak_mb": peak,
        "plan": None,
    }
    if plan is not None:
        row["plan"] = {
            "peak_mb": getattr(plan, "peak_bytes", float("nan")) / 2**20,
            "chunk_frames": getattr(plan, "chunk_frames", None),
            "remat": str(getattr(plan, "remat", None)),
            "budget_mb": (getattr(plan, "budget_bytes", None) or float("nan")) / 2**20,
            "describe": plan.describe() if hasattr(plan, "describe") else repr(plan),
        }
    return row


def _print_refine_step(row: dict) -> None:
    print(
        f"refine-step: {row['solves']} solves ({row['n_sub']} sub-orientations/frame), "
        f"mean {row['beams']:.0f} beams + {row['weak']:.0f} Bethe; Refinement(...) "
        f"{row['construct']:.1f} s (peak {row['construct_peak_mb']:.0f} MB), first step "
        f"(compiles) {row['first_step']:.1f} s (peak {row['first_step_peak_mb']:.0f} MB), "
        f"epoch (second step) {row['epoch']:.2f} s ({row['epoch_compiled']:.2f} s in the "
        f"compiled step); loss {row['loss']:.6g}, R_obs {row['r_obs']:.4g}",
        flush=True,
    )
    plan = row["plan"]
    measured = row["peak_mb"]
    if plan is None:
        print(f"peak RSS {measured:.0f} MB; no memory_plan (Refinement has no such attribute)")
        return
    print(plan["describe"])
    print(
        f"peak RSS {measured:.0f} MB; planned {plan['peak_mb']:.0f} MB (budget "
        f"{plan['budget_mb']:.0f} MB, chunk_frames {plan['chunk_frames']}, remat "
        f"{plan['remat']}); estimate/measured {plan['peak_mb'] / measured:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=sorted(CASES), default="borane")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument(
        "--n-sub", type=int, help="sub-orientations per frame (default: the case's, see CASES)"
    )
    parser.add_argument("--g-max", type=float, help="Å⁻¹ (default: the case's)")
    parser.add_argument("--semiangle", type=float, help="θ, degrees (default: the case's)")
    parser.add_argument("--exact-frames", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="exact,bethe,shared,real,real-single")
    parser.add_argument("--bethe-terms", type=int, default=12)
    parser.add_argument("--segments", type=int, default=6, help="runs per frame (runs methods)")
    parser.add_argument("--cache", help="netCDF of the simulated series (default: in TMPDIR)")
    parser.add_argument(
        "--paper-settings", action="store_true",
        help="the CsPbBr3 case, the whole default refinement phase by phase (large_pipeline.py)",
    )  # fmt: skip
    parser.add_argument("--pipeline-steps", type=int, default=3, help="Adam steps run")
    parser.add_argument("--pipeline-lm", type=int, default=1, help="LM iterations run")
    parser.add_argument(
        "--pipeline-lm-frames", type=int, default=0,
        help="run LM and s.u.'s on this many frames and scale (0: all frames)",
    )  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paper_settings:
        args.case, args.methods = "cspbbr3", "pipeline"
    case = CASES[args.case]
    defaults = {"n_sub": case["n_sub"], "g_max": case["g_max"], "semiangle": case["semiangle"]}
    explicit_n_sub = args.n_sub is not None
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cache is None:
        name = f"edkit_{args.case}_{args.frames}x{args.n_sub or 'default'}"
        if (args.g_max, args.semiangle) != (case["g_max"], case["semiangle"]):
            name += f"_g{args.g_max:g}_t{args.semiangle:g}"
        args.cache = os.path.join(tempfile.gettempdir(), name + ".nc")
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    data = _dataset(args)  # simulate once, outside the timed processes
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} "
        f"({jax.default_backend()}); {args.case}, {args.frames} frames × "
        f"{data.attrs.get('synthetic_n_sub', args.n_sub)} sub-orientations (θ {args.semiangle}°), "
        f"g_max {args.g_max}, exact |S|≤{SG_MAX}, Bethe ≤{SG_WEAK} Å⁻¹; {args.cache}"
    )
    print(_beam_counts(args, data), flush=True)
    methods = [m for m in args.methods.split(",") if m]  # "": simulate and count only
    command_args = ["--case", args.case, "--g-max", str(args.g_max), "--semiangle"]
    command_args += [str(args.semiangle)] + (["--n-sub", str(args.n_sub)] if explicit_n_sub else [])
    for key in ("frames", "exact_frames", "repeats", "cache", "bethe_terms", "segments"):
        command_args += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if "pipeline" in methods:
        methods.remove("pipeline")
        command = [sys.executable, __file__, "--one", "pipeline", *command_args]
        command += ["--pipeline-steps", str(args.pipeline_steps), "--pipeline-lm"]
        command += [str(args.pipeline_lm), "--pipeline-lm-frames", str(args.pipeline_lm_frames)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"pipeline failed (exit {done.returncode}); its messages are above")
        print_pipeline(json.loads(done.stdout.strip().splitlines()[-1]))
    if "refine-step" in methods:
        methods.remove("refine-step")
        command = [sys.executable, __file__, "--one", "refine-step", *command_args]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # progress: stderr
        if done.returncode != 0:
            sys.exit(f"refine-step failed (exit {done.returncode}); its messages are above")
        _print_refine_step(json.loads(done.stdout.strip().splitlines()[-1]))
    if not methods:
        return
    print(
        f"{'method':13} {'solves':>6} {'size':>5} {'weak':>5} {'fwd s':>8} {'epoch s':>8} "
        f"{'ep/fwd':>6} {'vs first':>8} {'vs prev':>7} {'peak MB':>8} {'compile MB':>10} "
        f"{'vs wide %':>9}  note"
    )
    first = previous = None
    rows = {}
    for method in methods:
        command = [sys.executable, __file__, "--one", method, *command_args]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows[method] = json.loads(out.strip().splitlines()[-1])
    # real-wide's intensities from an earlier run of the same series serve as well.
    wide_saved = os.path.exists(_intensity_file(args, "real-wide"))
    reference = "real-wide" if "real-wide" in rows or wide_saved else methods[0]
    for method, row in rows.items():
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
            f"{row['compile_peak_mb']:10.0f} {_difference_percent(args, method, reference):9.3f}"
            f"  {note}",
            flush=True,
        )
        previous = row


if __name__ == "__main__":
    main()
