"""Property-based tests (hypothesis) of the Bloch-wave kernel on random matrices: for any
Hermitian structure matrix B and thicknesses t (science.md §3),

- the eigen route conserves the total intensity Σ|ψ_g(t)|² = 1 and agrees with the matrix
  exponential exp(itB)e₀ (the independent reference route);
- at t = 0 the wave is the incident beam e₀;
- with absorption (B + iB', B' positive semi-definite) the total intensity never grows with t,
  and the general eigen route agrees with the exponential too;
- the custom JVP (Daleckii–Krein) equals central differences in a random Hermitian direction.

Matrices are 6×6 with entries up to 0.05 Å⁻¹ (quartz's largest couplings are ≈ 0.03) and
thicknesses up to 2000 Å. Derandomised as in test_properties.py; EDKIT_FUZZ_EXAMPLES and
EDKIT_FUZZ_RANDOM=1 explore further.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edkit.physics.bloch import propagate_expm, propagate_general, propagate_hermitian

N = 6
FUZZ = settings(
    max_examples=int(os.environ.get("EDKIT_FUZZ_EXAMPLES", "40")),
    derandomize=os.environ.get("EDKIT_FUZZ_RANDOM") != "1",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ENTRIES = hnp.arrays(np.float64, (N, N), elements=st.floats(-0.05, 0.05))
THICKNESSES = hnp.arrays(np.float64, (3,), elements=st.floats(0.0, 2000.0))

hermitian_route = jax.jit(propagate_hermitian)
general_route = jax.jit(propagate_general)
exponential_route = jax.jit(propagate_expm)


def _hermitian(real: np.ndarray, imaginary: np.ndarray) -> jnp.ndarray:
    m = real + 1j * imaginary
    return jnp.asarray(0.5 * (m + m.conj().T))


@FUZZ
@given(real=ENTRIES, imaginary=ENTRIES, thickness=THICKNESSES)
def test_no_absorption_conserves_intensity_and_matches_the_exponential(
    real, imaginary, thickness
) -> None:
    b = _hermitian(real, imaginary)
    t = jnp.asarray(np.concatenate([[0.0], thickness]))
    psi = np.asarray(hermitian_route(b, t))
    np.testing.assert_allclose(np.sum(np.abs(psi) ** 2, axis=1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(psi[0], np.eye(N)[0], atol=1e-12)
    np.testing.assert_allclose(psi, np.asarray(exponential_route(b, t)), atol=1e-8)


@FUZZ
@given(real=ENTRIES, imaginary=ENTRIES, absorbing=ENTRIES, thickness=THICKNESSES)
def test_absorption_never_adds_intensity_and_matches_the_exponential(
    real, imaginary, absorbing, thickness
) -> None:
    b = _hermitian(real, imaginary)
    # B' = MᵀM/scale: positive semi-definite, at most as large as the couplings.
    b_prime = jnp.asarray(absorbing.T @ absorbing) / (N * 0.05)
    t = jnp.asarray(np.concatenate([[0.0], np.sort(thickness)]))
    psi = np.asarray(general_route(b + 1j * b_prime, t))
    total = np.sum(np.abs(psi) ** 2, axis=1)
    assert abs(total[0] - 1.0) < 1e-10  # t = 0: the incident beam
    assert np.all(np.diff(total) <= 1e-9)  # non-increasing in t
    reference = np.asarray(exponential_route(b + 1j * b_prime, t))
    np.testing.assert_allclose(psi, reference, atol=1e-7)


@FUZZ
@given(real=ENTRIES, imaginary=ENTRIES, d_real=ENTRIES, d_imaginary=ENTRIES)
def test_jvp_matches_central_differences(real, imaginary, d_real, d_imaginary) -> None:
    b, direction = _hermitian(real, imaginary), _hermitian(d_real, d_imaginary)
    t = jnp.asarray([150.0, 900.0])

    def intensities(matrix: jnp.ndarray) -> jnp.ndarray:
        return jnp.abs(propagate_hermitian(matrix, t)) ** 2

    _, tangent = jax.jvp(intensities, (b,), (direction,))
    h = 1e-6
    central = (intensities(b + h * direction) - intensities(b - h * direction)) / (2 * h)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(central), atol=2e-6)
