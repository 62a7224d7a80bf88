"""Weak beams folded in as Bethe potentials (edkit.physics.bloch.bethe_correction, sg_weak).

The reduced solve must (i) reduce to the plain solve when no weak beam couples, (ii) converge to
the full solve (weak beams solved exactly) as the weak beams move away from the Ewald sphere, at
the second-order rate, (iii) beat simply dropping the weak beams, (iv) keep the scored quartz
intensities and R-factors of the full solve (R difference < 0.1 % absolute), and (v) stay
differentiable, with gradients that match central differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit.frames import build_frame_setup, frame_intensity_stack, simulate_frames
from edkit.io.cif import read_cif
from edkit.io.pets import read_pets, select_frames
from edkit.physics import bloch
from edkit.structure import structure_params, structure_tables

K = 40.0  # Å⁻¹


def _random_hermitian_coupling(n: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    u = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    u = scale * (u + u.conj().T) / 2
    np.fill_diagonal(u, 0.0)
    return u


def _full_and_reduced(weak_shift: float, seed: int = 0):
    """Strong beams 0..n_s−1 near the Ewald sphere, weak beams at |S| ≳ ``weak_shift``.

    Returns the strong beams' intensities from (full solve, Bethe-reduced, weak beams dropped).
    """
    rng = np.random.default_rng(seed)
    n_s, n_w = 6, 10
    n = n_s + n_w
    u = _random_hermitian_coupling(n, rng, 0.02)  # Å⁻², typical |U_g|
    s = np.concatenate(
        [[0.0], rng.uniform(-2e-3, 2e-3, n_s - 1), weak_shift * rng.choice([-1, 1], n_w)]
    )
    s[n_s:] *= rng.uniform(1.0, 2.0, n_w)
    g_normal = np.zeros(n)
    thickness = jnp.asarray([200.0, 600.0])
    full = bloch.bloch_intensities(jnp.asarray(s), g_normal, jnp.asarray(u), K, thickness)
    correction = bloch.bethe_correction(
        jnp.asarray(u[:n_s, n_s:]), jnp.asarray(u[n_s:, :n_s]), jnp.asarray(s[n_s:]), K
    )
    strong = (jnp.asarray(s[:n_s]), g_normal[:n_s], jnp.asarray(u[:n_s, :n_s]), K, thickness)
    reduced = bloch.bloch_intensities(*strong, bethe=correction)
    dropped = bloch.bloch_intensities(*strong)
    return np.asarray(full[:, :n_s]), np.asarray(reduced), np.asarray(dropped)


def test_bethe_converges_to_the_full_solve_at_second_order() -> None:
    errors, dropped_errors = [], []
    for shift in (0.02, 0.04, 0.08):
        full, reduced, dropped = _full_and_reduced(shift)
        errors.append(np.abs(reduced - full).max())
        dropped_errors.append(np.abs(dropped - full).max())
    # Dropping weak beams errs to first order in U/(2KS); Bethe's remaining error shrinks faster.
    assert all(e < d / 3 for e, d in zip(errors, dropped_errors, strict=True))
    assert errors[2] < errors[0] / 6  # ≥ second order: ×4 in S → ≥ ×16 expected, ×6 required
    assert errors[2] < 1e-4


def test_bethe_without_weak_coupling_changes_nothing() -> None:
    rng = np.random.default_rng(3)
    n = 5
    u = jnp.asarray(_random_hermitian_coupling(n, rng, 0.02))
    s = jnp.asarray(np.concatenate([[0.0], rng.uniform(-3e-3, 3e-3, n - 1)]))
    zero_out, zero_in = jnp.zeros((n, 4), complex), jnp.zeros((4, n), complex)
    correction = bloch.bethe_correction(zero_out, zero_in, jnp.full(4, 0.05), K)
    t = jnp.asarray([300.0])
    plain = bloch.bloch_intensities(s, jnp.zeros(n), u, K, t)
    with_bethe = bloch.bloch_intensities(s, jnp.zeros(n), u, K, t, bethe=correction)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_bethe))


def test_bethe_keeps_flux_without_absorption_and_absorbs_with_it() -> None:
    """The Hermitian correction keeps Σ I = 1 among strong beams; with U + iU' couplings and
    the mean absorption U'₀ the flux decays."""
    rng = np.random.default_rng(4)
    n_s, n_w = 5, 7
    u = _random_hermitian_coupling(n_s + n_w, rng, 0.02)
    s_strong = jnp.asarray(np.concatenate([[0.0], rng.uniform(-2e-3, 2e-3, n_s - 1)]))
    s_weak = jnp.asarray(rng.uniform(0.02, 0.04, n_w))
    t = jnp.asarray([100.0, 900.0])
    correction = bloch.bethe_correction(
        jnp.asarray(u[:n_s, n_s:]), jnp.asarray(u[n_s:, :n_s]), s_weak, K
    )
    strong = (s_strong, jnp.zeros(n_s), jnp.asarray(u[:n_s, :n_s]), K, t)
    i = bloch.bloch_intensities(*strong, bethe=correction)
    np.testing.assert_allclose(np.asarray(i).sum(axis=1), 1.0, atol=1e-10)
    kappa, u0 = 0.1, 0.05  # U₀ ≈ 0.05 Å⁻²: the mean absorption κU₀ of every beam
    v = (1 + 1j * kappa) * u
    absorbing = bloch.bethe_correction(
        jnp.asarray(v[:n_s, n_s:]), jnp.asarray(v[n_s:, :n_s]), s_weak, K
    )
    absorptive = jnp.asarray(kappa * (u[:n_s, :n_s] + u0 * np.eye(n_s)))
    i_abs = bloch.bloch_intensities(*strong, absorptive, "eig", bethe=absorbing)
    assert np.all(np.asarray(i_abs).sum(axis=1) < 1.0)
    assert np.all(np.isfinite(np.asarray(i_abs)))


@pytest.fixture(scope="module")
def quartz_crystal(data_dir):
    return read_cif(data_dir / "structures" / "quartz.cif")


@pytest.fixture(scope="module")
def quartz_frames(data_dir):
    return select_frames(read_pets(data_dir / "pets" / "quartz_experimental.cif_pets"), [2, 40])


def test_quartz_bethe_matches_the_full_solve(quartz_crystal, quartz_frames) -> None:
    """Strong |S| ≤ 0.005 + Bethe up to 0.03 Å⁻¹ against all beams to 0.03 solved exactly."""
    options = {"n_sub": 15}
    full = build_frame_setup(quartz_crystal, quartz_frames, sg_max=0.03, **options)
    reduced = build_frame_setup(
        quartz_crystal, quartz_frames, sg_max=0.005, sg_weak=0.03, **options
    )
    dropped = build_frame_setup(quartz_crystal, quartz_frames, sg_max=0.005, **options)
    assert reduced.n_beams.mean() < 0.6 * full.n_beams.mean()
    np.testing.assert_array_equal(reduced.n_beams + reduced.n_weak, full.n_beams)
    results = [
        simulate_frames(quartz_crystal, quartz_frames, 450.0, setup=setup)
        for setup in (full, reduced, dropped)
    ]
    scored = full.scored & reduced.scored
    assert scored.sum() > 20
    i_full, i_reduced, i_dropped = (r["I_calc"].values[scored] for r in results)
    error = np.abs(i_reduced - i_full).sum() / i_full.sum()
    error_dropped = np.abs(i_dropped - i_full).sum() / i_full.sum()
    assert error < 0.01 and error < error_dropped / 3
    r_full, r_reduced = (np.nanmean(r["r_obs_frame"].values) for r in results[:2])
    assert abs(r_full - r_reduced) < 1e-3  # 0.1 % absolute


def test_bethe_gradients_match_central_differences(quartz_crystal, quartz_frames) -> None:
    setup = build_frame_setup(
        quartz_crystal, select_frames(quartz_frames, [0]), n_sub=4, sg_max=0.005, sg_weak=0.03
    )
    tables = structure_tables(quartz_crystal)
    params = structure_params(quartz_crystal)
    rng = np.random.default_rng(2)
    c = jnp.asarray(rng.uniform(size=(1, 1, setup.hkl.shape[1])))

    def loss(fract, t):
        p = params._replace(fract=fract)
        return jnp.sum(c * frame_intensity_stack(p, tables, setup, t, absorption=0.05))

    fract = np.asarray(params.fract)
    t = jnp.asarray([[420.0]])
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(fract), t))
    f = jax.jit(loss)
    step = 1e-6
    for atom, axis in ((0, 0), (1, 2)):
        e = np.zeros_like(fract)
        e[atom, axis] = step
        fd = (float(f(fract + e, t)) - float(f(fract - e, t))) / (2 * step)
        assert abs(fd) > 1e-3
        np.testing.assert_allclose(grad[atom, axis], fd, rtol=1e-5)
