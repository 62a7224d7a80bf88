"""Weak beams folded in as Bethe potentials (edkit.physics.bloch.bethe_correction, sg_weak).

The reduced solve must (i) reduce to the plain solve when no weak beam couples, (ii) converge to
the full solve (weak beams solved exactly) as the weak beams move away from the Ewald sphere, at
the second-order rate, (iii) beat simply dropping the weak beams, (iv) keep the scored quartz
intensities and R-factors of the full solve (R difference < 0.1 % absolute), and (v) stay
differentiable, with gradients that match central differences.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit import EdkitError
from edkit.io.cif import read_cif
from edkit.io.pets import read_pets, select_frames
from edkit.physics import bloch, rocking
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import build_frame_setup, frame_intensity_stack, simulate_frames

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


@pytest.mark.slow  # ≥ 12 s; runs in CI's test-slow
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


def _with_terms(setup, terms):
    return dataclasses.replace(setup, settings={**setup.settings, "bethe_terms": terms})


def test_chebyshev_fit_reproduces_polynomials_and_sums_to_identity() -> None:
    basis, fit = rocking.chebyshev_fit(30, 6)
    assert basis.shape == (30, 6) and fit.shape == (6, 30)
    np.testing.assert_allclose(fit @ basis, np.eye(6), atol=1e-12)
    x = (2.0 * np.arange(30) + 1.0) / 30 - 1.0
    cubic = 0.3 - x + 2 * x**3
    np.testing.assert_allclose(basis @ (fit @ cubic), cubic, atol=1e-12)


def test_shared_bethe_converges_to_the_per_orientation_correction(
    quartz_crystal, quartz_frames
) -> None:
    """The Bethe correction built from n Chebyshev terms over each frame's sub-orientations
    converges to the one built at every sub-orientation, geometrically in n; 12 terms keep the
    scored intensities to 1e-5 (measured 4e-7; the Bethe approximation itself is ~1e-3)."""
    exact = build_frame_setup(quartz_crystal, quartz_frames, n_sub=40, sg_max=0.005, sg_weak=0.03)
    reference = simulate_frames(quartz_crystal, quartz_frames, 450.0, setup=exact)
    scored = exact.scored
    i_ref = reference["I_calc"].values[scored]
    errors = []
    for terms in (3, 6, 12):
        shared = simulate_frames(
            quartz_crystal, quartz_frames, 450.0, setup=_with_terms(exact, terms)
        )
        errors.append(np.abs(shared["I_calc"].values[scored] - i_ref).sum() / i_ref.sum())
    print("shared Bethe, relative intensity error for 3, 6, 12 terms:", errors)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5
    # as many terms as sub-orientations is the per-orientation route itself
    same = simulate_frames(quartz_crystal, quartz_frames, 450.0, setup=_with_terms(exact, 40))
    np.testing.assert_array_equal(same["I_calc"].values, reference["I_calc"].values)


def test_shared_bethe_gradients_match_central_differences(quartz_crystal, quartz_frames) -> None:
    setup = build_frame_setup(
        quartz_crystal, select_frames(quartz_frames, [0]), n_sub=12, sg_max=0.005, sg_weak=0.03,
        bethe_terms=5,
    )  # fmt: skip
    tables = structure_tables(quartz_crystal)
    params = structure_params(quartz_crystal)
    c = jnp.asarray(np.random.default_rng(3).uniform(size=(1, 1, setup.hkl.shape[1])))

    def loss(fract, t, corrections):
        p = params._replace(fract=fract)
        stack = frame_intensity_stack(
            p, tables, setup, t, absorption=0.05, orientation_corrections=corrections
        )
        return jnp.sum(c * stack)

    fract, t, corrections = np.asarray(params.fract), jnp.asarray([[420.0]]), jnp.zeros((1, 3))
    grad_fract, grad_angle = jax.jit(jax.grad(loss, argnums=(0, 2)))(fract, t, corrections)
    f = jax.jit(loss)
    step = 1e-6
    for atom, axis in ((0, 0), (1, 2)):
        e = np.zeros_like(fract)
        e[atom, axis] = step
        fd = (float(f(fract + e, t, corrections)) - float(f(fract - e, t, corrections))) / (
            2 * step
        )
        assert abs(fd) > 1e-3
        np.testing.assert_allclose(grad_fract[atom, axis], fd, rtol=1e-5)
    e = np.zeros((1, 3))
    e[0, 1] = 1e-7  # radians
    fd = (float(f(fract, t, corrections + e)) - float(f(fract, t, corrections - e))) / 2e-7
    assert abs(fd) > 1e-3
    np.testing.assert_allclose(grad_angle[0, 1], fd, rtol=1e-4)


def test_bethe_terms_must_be_a_positive_integer(quartz_crystal, quartz_frames) -> None:
    with pytest.raises(EdkitError, match="bethe_terms = 0"):
        build_frame_setup(quartz_crystal, quartz_frames, sg_weak=0.03, bethe_terms=0)


@pytest.mark.slow
def test_borane_bethe_matches_the_full_solve(data_dir) -> None:
    """A large cell (borane, Pccn, 1386 Å³; the CsPbBr₃-sized case of benchmarks/large.py): two
    frames (α = −50°, −30°, θ = 1°, g_max 1.2 Å⁻¹, 600 Å), data simulated with every beam to
    |S| 0.04 Å⁻¹ solved exactly (~610 beams). Against that model, exact to 0.005 + Bethe to 0.04
    (~180 beams solved) and the same with the correction shared by 12 Chebyshev terms keep the
    mean per-frame R_obs within 0.1 % absolute."""
    from edkit.simulate.synthetic import make_dataset, rotation_series

    crystal = read_cif(data_dir / "structures" / "borane.cif")
    geometry = rotation_series(
        cell=crystal.cell, alpha_start=-50.0, alpha_step=20.0, n_frames=2, semiangle=1.0
    )
    options = {"g_max": 1.2, "n_sub": 24}
    data = make_dataset(crystal, geometry, 600.0, sg_max=0.04, seed=3, **options)
    full = build_frame_setup(crystal, data, sg_max=0.04, **options)
    reduced = build_frame_setup(crystal, data, sg_max=0.005, sg_weak=0.04, **options)
    shared = _with_terms(reduced, 12)
    assert full.n_beams.min() > 500 and reduced.n_beams.max() < 0.5 * full.n_beams.min()
    results = [
        simulate_frames(crystal, data, 600.0, setup=setup) for setup in (full, reduced, shared)
    ]
    scored = full.scored & reduced.scored
    i_full, i_reduced, i_shared = (r["I_calc"].values[scored] for r in results)
    r_full, r_reduced, r_shared = (np.nanmean(r["r_obs_frame"].values) for r in results)
    e_reduced, e_shared = (np.abs(i - i_full).sum() / i_full.sum() for i in (i_reduced, i_shared))
    print(
        f"borane: {scored.sum()} scored; intensities vs full {e_reduced:.2e} (Bethe), "
        f"{e_shared:.2e} (shared); R_obs "
        f"{100 * r_full:.3f} / {100 * r_reduced:.3f} / {100 * r_shared:.3f} %"
    )
    assert scored.sum() > 50
    assert abs(r_reduced - r_full) < 1e-3 and abs(r_shared - r_full) < 1e-3
    assert np.abs(i_shared - i_reduced).sum() < 1e-4 * i_reduced.sum()
