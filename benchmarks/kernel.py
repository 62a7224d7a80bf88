"""Kernel benchmark: edkit's Bloch forward and value-and-grad against numpy/LAPACK ``eigh``.

For N = 64, 128, 256, 512 beams: time per orientation of the forward pass (structure matrix,
one ``eigh``, 16 thicknesses, intensities; complex128), its ratio to ``numpy.linalg.eigh`` on the
same matrices in the same run, and value-and-grad time over forward time. Physically scaled
random beam sets (S ~ 1e-2 Å⁻¹, U ~ 1e-2 Å⁻²). ``--real``: real symmetric matrices (a
centrosymmetric crystal with its inversion centre at the origin: real U) against
``numpy.linalg.eigh`` on the same real matrices, and the real forward's ratio to the complex one.
Last row: the whole ``edkit.simulate_pattern`` (beam choice, bookkeeping, structure factors,
solve, DataArray) at N ≈ 600 on CsPbBr₃ (centrosymmetric: a real symmetric solve) against
``numpy.linalg.eigh`` of that pattern's own structure matrix, both timed in the same run.
Run: ``python benchmarks/kernel.py [--quick] [--real] [--sizes N ...]`` (``--sizes`` with no
value: the pattern row only).
"""

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time  # benchmarks/timing.py (script dir on sys.path)

import edkit
from edkit.constants import potential_prefactor
from edkit.physics import bloch
from edkit.physics.beams import coupling_indices
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables
from edkit.simulate.pattern import beam_direction, make_pattern_model

jax.config.update("jax_enable_x64", True)  # a script, not the library: float64 throughout


def beam_sets(n: int, batch: int, seed: int = 0, real: bool = False):
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=0.01, size=(batch, n))
    s[:, 0] = 0.0
    g_normal = rng.normal(scale=0.02, size=(batch, n))
    g_normal[:, 0] = 0.0
    u = rng.normal(scale=0.01, size=(n, n)) + 1j * rng.normal(scale=0.01, size=(n, n))
    u = 0.5 * (u + u.conj().T)
    if real:
        u = u.real
    return jnp.asarray(s), jnp.asarray(g_normal), jnp.asarray(u)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer orientations and repeats")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--real", action="store_true", help="also time real symmetric solves")
    args = parser.parse_args()
    k_mag = 39.87
    thickness = jnp.linspace(50.0, 2000.0, 16)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"JAX {jax.__version__} ({jax.default_backend()}), numpy {np.__version__}, complex128"
    )
    print(f"{'N':>5} {'edkit fwd ms':>13} {'LAPACK eigh ms':>15} {'fwd/LAPACK':>11} "
          f"{'v&g ms':>9} {'v&g/fwd':>8}  matrices")  # fmt: skip
    for n in args.sizes:
        complex_forward = bench_size(n, k_mag, thickness, args.quick, real=False)
        if args.real:
            real_forward = bench_size(n, k_mag, thickness, args.quick, real=True)
            print(f"{'':5} real forward / complex forward: {real_forward / complex_forward:.2f}")
    bench_pattern(thickness, args.quick)


def bench_size(n: int, k_mag: float, thickness: jax.Array, quick: bool, real: bool) -> float:
    """Time one beam count N, print its table row and return the forward seconds."""
    batch = max(2, (8 if quick else 32) * 64 // n)
    repeats = 2 if quick else 3
    s, g_normal, u = beam_sets(n, batch, real=real)
    weights = jnp.linspace(1.0, 2.0, n)

    def one(si, gi, u_scale):
        intensities = bloch.bloch_intensities(si, gi, u * u_scale, k_mag, thickness)
        return jnp.sum(intensities * weights[None, :])

    forward = jax.jit(lambda: jax.lax.map(lambda x: one(x[0], x[1], 1.0), (s, g_normal)))
    value_and_grad = jax.jit(
        lambda: jax.lax.map(
            lambda x: jax.value_and_grad(one, argnums=(0, 2))(x[0], x[1], 1.0), (s, g_normal)
        )
    )
    jax.block_until_ready(forward())
    jax.block_until_ready(value_and_grad())
    t_forward = best_time(forward, repeats) / batch
    t_grad = best_time(value_and_grad, repeats) / batch

    scale = np.pi / k_mag
    matrices = [
        np.asarray(scale * bloch.structure_matrix(s[i], 1.0 / np.sqrt(1 + g_normal[i] / k_mag),
                                                  u, k_mag))
        for i in range(batch)
    ]  # fmt: skip
    t_lapack = best_time(lambda: [np.linalg.eigh(m) for m in matrices], repeats) / batch
    print(
        f"{n:5d} {t_forward * 1e3:13.2f} {t_lapack * 1e3:15.2f} {t_forward / t_lapack:11.2f} "
        f"{t_grad * 1e3:9.2f} {t_grad / t_forward:8.2f}  {'real' if real else 'complex'}"
    )
    return t_forward


#: simulate_pattern case of the last row: CsPbBr₃ (Pbnm, 813 Å³), a general direction near [100]
#: with g_max 2.0 Å⁻¹ and the default sg_max 0.02 Å⁻¹: 605 beams.
PATTERN_CIF = "cspbbr3.cif"
PATTERN_AXIS = (1.0, 0.03, 0.01)
PATTERN_G_MAX = 2.0  # Å⁻¹


def bench_pattern(thickness: jax.Array, quick: bool) -> tuple[float, float]:
    """Time ``simulate_pattern`` at N ≈ 600 and LAPACK ``eigh`` of its real symmetric structure
    matrix (π/K)·A, print the row and return (pattern, eigh) seconds."""
    crystal = edkit.read_cif(edkit.example_file(PATTERN_CIF))
    t = np.asarray(thickness)
    repeats = 3 if quick else 10

    def pattern():
        return edkit.simulate_pattern(crystal, PATTERN_AXIS, t, g_max=PATTERN_G_MAX)

    n = pattern().sizes["beam"]  # also compiles: timed below warm, as every row here
    t_pattern = best_time(pattern, repeats)
    with jax.enable_x64(True):
        model = make_pattern_model(crystal, PATTERN_AXIS, g_max=PATTERN_G_MAX)
        differences, index = coupling_indices(model.hkl)
        f = structure_factors_of(structure_params(crystal), structure_tables(crystal), differences)
        g = jnp.asarray(model.hkl @ crystal.reciprocal_basis)
        k_hat = beam_direction(crystal.real_basis, PATTERN_AXIS)
        k_mag = model.wave_number
        a = bloch.structure_matrix(
            bloch.excitation_errors(g, k_hat, k_mag),
            bloch.metric_factors(g @ k_hat, k_mag),
            potential_prefactor(200e3) * jnp.real(f)[index],
            k_mag,
        )
        matrix = np.ascontiguousarray(np.real(np.asarray(a)) * np.pi / k_mag)
    assert matrix.shape == (n, n)
    t_lapack = best_time(lambda: np.linalg.eigh(matrix), repeats)
    print(
        f"simulate_pattern at N≈600 (CsPbBr₃, N = {n}, {len(t)} thicknesses) vs LAPACK eigh of "
        f"the same N (real symmetric): {t_pattern * 1e3:.1f} ms vs {t_lapack * 1e3:.1f} ms, "
        f"ratio {t_pattern / t_lapack:.2f}"
    )
    return t_pattern, t_lapack


if __name__ == "__main__":
    main()
