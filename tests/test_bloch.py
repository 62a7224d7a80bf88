"""The Bloch-wave kernel against analytic limits, invariants and the expm reference route."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit.constants import electron_wavelength
from edkit.physics import bloch

# science.md §4: two-beam check, quartz 100 at 200 kV, U0 = 0, identity orientation.
TWO_BEAM_U = 0.0202608
TWO_BEAM_K = 1.0 / electron_wavelength(200e3)  # 39.8734569
# S = −|a*|²/(2K) for g ⟂ beam, |a*| = 2/(a√3), a = 4.9226 Å: −6.8998e-4 (science.md rounds it).
TWO_BEAM_S = -((2.0 / (4.9226 * np.sqrt(3.0))) ** 2) / (2.0 * TWO_BEAM_K)
TWO_BEAM_T = np.array([50.0, 100.0, 200.0, 500.0, 1000.0])
TWO_BEAM_I = np.array([0.0063323, 0.0248730, 0.0924545, 0.3341640, 0.0664138])


def two_beam_analytic(t):
    s_eff = np.sqrt(TWO_BEAM_S**2 + (TWO_BEAM_U / TWO_BEAM_K) ** 2)
    return (TWO_BEAM_U / TWO_BEAM_K) ** 2 * np.sin(np.pi * t * s_eff) ** 2 / s_eff**2


def random_system(n, seed, *, degenerate=False):
    """A physically scaled random beam set: S ~ 1e-2 Å⁻¹, U ~ 1e-2 Å⁻², g_n ~ 1e-2 Å⁻¹.

    With ``degenerate`` the structure matrix is built from a spectrum with repeated eigenvalues
    (as symmetry-related beams give at a zone axis) and normal incidence (g_n = 0).
    """
    rng = np.random.default_rng(seed)
    k_mag = 39.87
    s = rng.normal(scale=0.01, size=n)
    s[0] = 0.0
    g_normal = rng.normal(scale=0.02, size=n)
    g_normal[0] = 0.0
    u = rng.normal(scale=0.01, size=(n, n)) + 1j * rng.normal(scale=0.01, size=(n, n))
    u = 0.5 * (u + u.conj().T)
    if degenerate:
        spectrum = rng.normal(scale=1.0, size=n)
        spectrum[1::2] = spectrum[0:-1:2]  # pairs of equal eigenvalues
        q, _ = np.linalg.qr(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))
        a = (q * spectrum) @ q.conj().T
        s = np.real(np.diag(a)) / (2.0 * k_mag)
        u = a - np.diag(np.diag(a))
        g_normal = np.zeros(n)
    return jnp.asarray(s), jnp.asarray(g_normal), jnp.asarray(u), k_mag


def test_two_beam_pendelloesung_matches_analytic_and_reference():
    s = jnp.array([0.0, TWO_BEAM_S])
    potential = jnp.array([[0.0, -TWO_BEAM_U], [-TWO_BEAM_U, 0.0]], dtype=complex)
    intensities = bloch.bloch_intensities(
        s, jnp.zeros(2), potential, TWO_BEAM_K, jnp.asarray(TWO_BEAM_T)
    )
    assert intensities.dtype == jnp.float64
    np.testing.assert_allclose(intensities[:, 1], two_beam_analytic(TWO_BEAM_T), atol=1e-8, rtol=0)
    # The table follows from U_g quoted to 6 digits: agreement to a few 1e-7.
    np.testing.assert_allclose(intensities[:, 1], TWO_BEAM_I, atol=3e-7, rtol=0)
    np.testing.assert_allclose(TWO_BEAM_S, -6.8998e-4, rtol=1e-4)
    np.testing.assert_allclose(intensities.sum(axis=1), 1.0, atol=1e-12)


def test_kinematic_thin_crystal_limit():
    """Thin crystal, weak beams: I_g = (π t |U_g|/K)² sinc²(π S_g t) from the first Born term."""
    s, g_normal, u, k_mag = random_system(12, 1)
    u = 1e-3 * u  # weak scattering: multiple scattering negligible
    t = jnp.array([20.0])
    intensities = bloch.bloch_intensities(s, jnp.zeros_like(g_normal), u, k_mag, t)[0]
    x = np.pi * np.asarray(s) * 20.0
    kinematic = (np.pi * 20.0 * np.abs(np.asarray(u)[0]) / k_mag) ** 2 * np.sinc(x / np.pi) ** 2
    np.testing.assert_allclose(intensities[1:], kinematic[1:], rtol=1e-3)


@pytest.mark.parametrize("degenerate", [False, True])
def test_flux_conservation_without_absorption(degenerate):
    s, g_normal, u, k_mag = random_system(25, 2, degenerate=degenerate)
    t = jnp.linspace(0.0, 2000.0, 9)
    intensities = bloch.bloch_intensities(s, g_normal, u, k_mag, t)
    flux = jnp.sum((1.0 + g_normal / k_mag)[None, :] * intensities, axis=1)
    np.testing.assert_allclose(flux, 1.0, atol=1e-10)
    if not degenerate:  # the metric is not a no-op: the plain sum differs from 1 when g_n ≠ 0
        assert jnp.max(jnp.abs(intensities[1:].sum(axis=1) - 1.0)) > 1e-6


def test_zero_thickness_gives_incident_beam():
    s, g_normal, u, k_mag = random_system(10, 3)
    intensities = bloch.bloch_intensities(s, g_normal, u, k_mag, jnp.array([0.0]))
    expected = np.zeros(10)
    expected[0] = 1.0
    np.testing.assert_allclose(intensities[0], expected, atol=1e-14)


def test_eigen_and_expm_routes_agree():
    s, g_normal, u, k_mag = random_system(30, 4)
    t = jnp.array([10.0, 300.0, 1500.0])
    eigen = bloch.bloch_intensities(s, g_normal, u, k_mag, t)
    expm = bloch.bloch_intensities_expm(s, g_normal, u, k_mag, t)
    np.testing.assert_allclose(eigen, expm, atol=1e-8)


def test_absorption_exact_routes_agree_and_perturbation_is_second_order():
    s, g_normal, u, k_mag = random_system(20, 5)
    u0 = 0.1
    diag_u0 = u0 * jnp.eye(20)
    t = jnp.array([200.0, 800.0])
    errors, effects = [], []
    for kappa in (0.04, 0.02, 0.01):
        absorptive = kappa * (u + diag_u0)
        exact = bloch.bloch_intensities(s, g_normal, u, k_mag, t, absorptive, method="eig")
        reference = bloch.bloch_intensities_expm(s, g_normal, u, k_mag, t, absorptive)
        np.testing.assert_allclose(exact, reference, atol=1e-9)
        perturbative = bloch.bloch_intensities(
            s, g_normal, u, k_mag, t, absorptive, method="perturbative"
        )
        errors.append(float(jnp.max(jnp.abs(perturbative - exact))))
        plain = bloch.bloch_intensities(s, g_normal, u, k_mag, t)
        effects.append(float(jnp.max(jnp.abs(plain - exact))))
        # Absorption removes flux.
        flux = jnp.sum((1.0 + g_normal / k_mag)[None, :] * exact, axis=1)
        assert jnp.all(flux < 1.0)
    # First-order eigenvalues with unperturbed eigenvectors: ψ is off by O(κ) (the eigenvector
    # correction), so halving κ halves the error; the absorption effect itself is captured.
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    np.testing.assert_allclose(ratios, 2.0, rtol=0.1)
    assert 0.0 < errors[-1] < 0.5 * effects[-1]


def test_uniform_absorption_is_exact_in_every_route():
    s, g_normal, u, k_mag = random_system(15, 6)
    g_normal = jnp.zeros_like(g_normal)  # a uniform U'0 M_i² is uniform only at normal incidence
    absorptive = 0.02 * jnp.eye(15, dtype=complex)
    t = jnp.array([500.0])
    plain = bloch.bloch_intensities(s, g_normal, u, k_mag, t)
    damping = np.exp(-2.0 * np.pi * 500.0 * 0.02 / k_mag)
    for method in ("eig", "perturbative", "expm"):
        absorbed = bloch.bloch_intensities(s, g_normal, u, k_mag, t, absorptive, method=method)
        np.testing.assert_allclose(absorbed, plain * damping, atol=1e-10)


def _loss_fn(method, absorb):
    def loss(params, s, g_normal, u, k_mag):
        scale, shift, thickness = params
        absorptive = 0.03 * (u + 0.1 * jnp.eye(u.shape[0])) if absorb else None
        intensities = bloch.bloch_intensities(
            s + shift,
            g_normal,
            u * scale,
            k_mag,
            jnp.stack([thickness, 0.7 * thickness]),
            absorptive,
            method=method,
        )
        weights = jnp.linspace(1.0, 2.0, intensities.shape[1])
        return jnp.sum(intensities * weights[None, :])

    return loss


@pytest.mark.parametrize(
    ("method", "absorb", "degenerate"),
    [
        ("eig", False, False),
        ("eig", False, True),
        ("eig", True, False),
        ("eig", True, True),
        ("expm", True, False),
    ],
)
def test_gradients_match_finite_differences(method, absorb, degenerate):
    s, g_normal, u, k_mag = random_system(15, 7, degenerate=degenerate)
    s_shift = jnp.zeros_like(s).at[3].set(1.0)
    params = (jnp.array(1.0), jnp.array(0.0), jnp.array(400.0))
    loss = _loss_fn(method, absorb)

    def f(scale, shift, thickness):
        return loss((scale, shift * s_shift, thickness), s, g_normal, u, k_mag)

    grads = jax.grad(f, argnums=(0, 1, 2))(*params)
    for i, step in enumerate((1e-5, 1e-6, 1e-3)):
        up = list(params)
        down = list(params)
        up[i] = up[i] + step
        down[i] = down[i] - step
        fd = (f(*up) - f(*down)) / (2 * step)
        assert np.isfinite(float(grads[i]))
        np.testing.assert_allclose(float(grads[i]), float(fd), rtol=1e-5, atol=1e-10)


def test_degenerate_gradient_matches_expm_autodiff():
    """At exact degeneracy, the Daleckii–Krein gradient equals autodiff through expm."""
    s, g_normal, u, k_mag = random_system(13, 8, degenerate=True)
    t = jnp.array([300.0, 900.0])
    v = jnp.linalg.eigvalsh(bloch.structure_matrix(s, jnp.ones(13), u, k_mag))
    assert jnp.min(jnp.abs(jnp.diff(jnp.sort(v)))) < 1e-10  # really degenerate

    def via(route):
        def f(u_scale):
            return jnp.sum(route(s, g_normal, u * u_scale, k_mag, t) ** 2)

        return jax.grad(f)(1.0)

    np.testing.assert_allclose(
        via(bloch.bloch_intensities), via(bloch.bloch_intensities_expm), rtol=1e-8
    )


def test_single_precision_solve_matches_double_and_keeps_dtypes():
    """complex64 solves (geometry still float64): intensities to ~1e-5 of the brightest beam,
    gradients finite and within 1e-3; outputs come back in float64."""
    s, g_normal, u, k_mag = random_system(30, 9)
    t = jnp.array([100.0, 600.0])
    double = bloch.bloch_intensities(s, g_normal, u, k_mag, t)
    single = bloch.bloch_intensities(s, g_normal, u, k_mag, t, solve_dtype=jnp.complex64)
    assert single.dtype == jnp.float64
    error = float(jnp.max(jnp.abs(single - double)))
    assert 0.0 < error < 1e-5 * float(jnp.max(double))

    weights = jnp.linspace(0.0, 1.0, 30)  # not the conserved flux, whose gradient cancels

    def loss(scale, dtype):
        intensities = bloch.bloch_intensities(s, g_normal, u * scale, k_mag, t, solve_dtype=dtype)
        return jnp.sum(intensities * weights[None, :])

    g_double = jax.grad(loss)(1.0, None)
    g_single = jax.grad(loss)(1.0, jnp.complex64)
    assert np.isfinite(float(g_single))
    np.testing.assert_allclose(float(g_single), float(g_double), rtol=1e-3)
