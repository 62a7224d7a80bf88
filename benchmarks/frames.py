"""Frame benchmark: all 99 quartz frames (real data geometry) against numpy/LAPACK ``eigh``.

Simulates every frame of ``quartz_experimental.cif_pets`` with ``quartz.cif`` (g_max 1.6 Å⁻¹,
sg_max 0.015 Å⁻¹, n_sub sub-orientations per frame, one thickness per frame, complex128) with
:func:`frame_intensity_stack` under ``jax.jit``; the time is the minimum of a few
repeats after compilation. The reference is ``numpy.linalg.eigh`` on the same structure matrices
(B = (π/K) A at each frame's padded solve size, built exactly as the kernel builds them) for a
random sample of sub-orientations, stacked by size, scaled to the total number of
eigendecompositions: the ratio is edkit's whole forward pass (structure factors, matrices, eigh,
propagation, rocking sum) over LAPACK's eigh alone.

Run: ``python benchmarks/frames.py [--n-sub 41] [--sample 200]``. On a shared machine pin it
(``taskset -c 1 python benchmarks/frames.py``): XLA's CPU thread pool degrades badly (10–100×
on eigh, measured) when another process holds a core.
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time  # benchmarks/timing.py (script dir on sys.path)

from edkit.constants import potential_prefactor
from edkit.io.cif import read_cif
from edkit.io.pets import read_pets
from edkit.physics import bloch
from edkit.physics.orientation import rotation_x
from edkit.physics.rocking import INERT_EXCITATION_ERROR, LAB_BEAM
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables
from edkit.simulate.frames import build_frame_setup, frame_intensity_stack

jax.config.update("jax_enable_x64", True)  # a script, not the library: float64 throughout

DATA = os.path.join(os.path.dirname(__file__), "..", "edkit", "data")


def solve_sizes(setup) -> np.ndarray:
    """The matrix size each frame is solved at (its bucket's size, else the common padding)."""
    sizes = np.full(setup.n_frames, setup.hkl.shape[1])
    for frames, size in zip(setup.buckets, setup.bucket_sizes, strict=True):
        sizes[frames] = size
    return sizes


def structure_matrices(crystal, setup, samples, padded: bool = True) -> list[np.ndarray]:
    """B = (π/K) A for (frame, sub-orientation) pairs, as ``frame_intensities`` builds it."""
    params, tables = structure_params(crystal), structure_tables(crystal)
    f_all = np.asarray(structure_factors_of(params, tables, jnp.asarray(setup.differences)))
    prefactor = potential_prefactor(setup.voltage)
    k_mag = setup.wave_number
    reciprocal = np.asarray(tables.reciprocal_basis)
    sizes = solve_sizes(setup)
    out = []
    for f, k in samples:
        n = int(sizes[f]) if padded else int(setup.n_beams[f])
        valid = setup.valid[f, :n]
        rotation = np.asarray(rotation_x(setup.angles[f, k])) @ setup.rotations[f]
        k_hat = rotation.T @ LAB_BEAM
        g_cart = setup.hkl[f, :n] @ reciprocal
        s = np.where(valid, -(g_cart @ k_hat) - np.sum(g_cart**2, axis=1) / (2 * k_mag),
                     INERT_EXCITATION_ERROR)  # fmt: skip
        g_normal = np.where(valid, g_cart @ k_hat, 0.0)
        coupled = valid[:, None] & valid[None, :]
        potential = np.where(coupled, prefactor * f_all[setup.coupling[f, :n, :n]], 0.0)
        metric = np.asarray(bloch.metric_factors(jnp.asarray(g_normal), k_mag))
        a = np.asarray(bloch.structure_matrix(jnp.asarray(s), jnp.asarray(metric),
                                              jnp.asarray(potential), k_mag))  # fmt: skip
        out.append((np.pi / k_mag) * a)
    return out


def stacked_eigh(matrices: list[np.ndarray]) -> list:
    """numpy.linalg.eigh on stacks of equal-size matrices (one gufunc call per size)."""
    by_size: dict[int, list[np.ndarray]] = {}
    for m in matrices:
        by_size.setdefault(m.shape[0], []).append(m)
    return [np.linalg.eigh(np.stack(group)) for group in by_size.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-sub", type=int, default=41, help="sub-orientations per frame")
    parser.add_argument("--sample", type=int, default=200, help="LAPACK sample size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dataset = read_pets(os.path.join(DATA, "pets", "quartz_experimental.cif_pets"))
    crystal = read_cif(os.path.join(DATA, "structures", "quartz.cif"))
    start = time.perf_counter()
    setup = build_frame_setup(crystal, dataset, g_max=1.6, sg_max=0.015, n_sub=args.n_sub)
    t_setup = time.perf_counter() - start
    n_frames, n_sub = setup.n_frames, setup.settings["n_sub"]
    n_eig = n_frames * n_sub
    params, tables = structure_params(crystal), structure_tables(crystal)
    thickness = jnp.full((n_frames, 1), 500.0)
    forward = jax.jit(lambda p, t: frame_intensity_stack(p, tables, setup, t))
    start = time.perf_counter()
    jax.block_until_ready(forward(params, thickness))
    t_compile = time.perf_counter() - start
    t_edkit = best_time(lambda: forward(params, thickness), args.repeats)

    rng = np.random.default_rng(0)
    flat = rng.choice(n_eig, size=min(args.sample, n_eig), replace=False)
    samples = [(int(i // n_sub), int(i % n_sub)) for i in flat]
    padded = structure_matrices(crystal, setup, samples, padded=True)
    bare = structure_matrices(crystal, setup, samples, padded=False)
    assert all(np.allclose(m, m.conj().T, atol=1e-12) for m in padded)  # Hermitian, as solved
    t_pad = best_time(lambda: stacked_eigh(padded), args.repeats) / len(samples)
    t_bare = best_time(lambda: stacked_eigh(bare), args.repeats) / len(samples)
    t_lapack = t_pad * n_eig
    beams, sizes = setup.n_beams, solve_sizes(setup)

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable by this process), "
        f"JAX {jax.__version__} ({jax.default_backend()}), numpy {np.__version__}, complex128"
    )
    print(
        f"# quartz_experimental: {n_frames} frames × {n_sub} sub-orientations, g_max 1.6 Å⁻¹, "
        f"sg_max 0.015 Å⁻¹, 1 thickness; setup {t_setup:.2f} s, compile {t_compile:.2f} s, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows = [
        ("eigendecompositions (frames × n_sub)", f"{n_eig}"),
        ("beams per frame: mean / max", f"{beams.mean():.1f} / {beams.max()}"),
        ("solve size (padded): mean / max", f"{sizes.mean():.1f} / {sizes.max()}"),
        ("edkit wall time, all frames", f"{t_edkit:.3f} s"),
        ("edkit eigendecompositions per second", f"{n_eig / t_edkit:.0f}"),
        ("edkit per eigendecomposition", f"{t_edkit / n_eig * 1e3:.3f} ms"),
        ("LAPACK eigh per matrix, padded size", f"{t_pad * 1e3:.3f} ms"),
        ("LAPACK eigh per matrix, real beams only", f"{t_bare * 1e3:.3f} ms"),
        ("LAPACK eigh scaled to all (padded)", f"{t_lapack:.3f} s"),
        ("ratio edkit / LAPACK eigh (padded)", f"{t_edkit / t_lapack:.2f}"),
        ("ratio edkit / LAPACK eigh (real beams)", f"{t_edkit / (t_bare * n_eig):.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")


if __name__ == "__main__":
    main()
