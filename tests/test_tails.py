"""First-order tails of left-out beams (edkit.physics.tails).

(i) The tails are the exact solution of the block-triangular system (no coupling back): checked
against the matrix exponential, with a left-out beam degenerate with a Bloch wave; (ii) the
two-beam kinematic limit against the exact two-beam solve; (iii) derivatives against central
differences, and finite at exactly degenerate eigenvalues; (iv) frame level: runs of
sub-orientations with tails are closer to the whole-frame solve than without, and their
gradient matches finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

from edkit.io.pets import select_frames
from edkit.physics import bloch
from edkit.physics.structure import structure_params, structure_tables
from edkit.physics.tails import intensities_with_tails, propagate_hermitian_tails
from edkit.simulate.frames import build_frame_setup, frame_intensity_stack, simulate_frames

THICKNESS = np.array([40.0, 310.0, 820.0])


def _system(real: bool, n: int = 6, n_out: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n)) + (0 if real else 1j) * rng.normal(size=(n, n))
    b = 0.02 * (a + a.conj().T)
    b[np.diag_indices(n)] = rng.normal(size=n) * 0.05
    coupling = 0.01 * (
        rng.normal(size=(n_out, n)) + (0 if real else 1j) * rng.normal(size=(n_out, n))
    )
    diagonal = rng.normal(size=n_out) * 0.1
    diagonal[0] = np.linalg.eigvalsh(b)[2] + 1e-9  # a left-out beam on a Bloch wave: the series
    return b, coupling, diagonal


@pytest.mark.parametrize("real", [False, True])
def test_tails_solve_the_block_triangular_system(real) -> None:
    b, coupling, diagonal = _system(real)
    n = len(b)
    with jax.enable_x64(True):
        psi, tail = propagate_hermitian_tails(
            jnp.asarray(b), jnp.asarray(coupling), jnp.asarray(diagonal), jnp.asarray(THICKNESS)
        )
        full = np.zeros((n + len(diagonal),) * 2, complex)
        full[:n, :n], full[n:, :n], full[n:, n:] = b, coupling, np.diag(diagonal)
        expected = np.stack([np.asarray(expm(1j * t * jnp.asarray(full)))[:, 0] for t in THICKNESS])
    assert np.abs(expected[:, n:]).max() > 0.1  # the degenerate beam grows secularly
    np.testing.assert_allclose(psi, expected[:, :n], atol=1e-12)
    np.testing.assert_allclose(tail, expected[:, n:], atol=1e-11)


def test_two_beam_tail_is_the_kinematic_limit() -> None:
    """Only 000 solved; beam g left out: |ψ_g|² = U_g² sin²(πSt)/(πS)² (kinematic, γ = 1 here),
    within O(U²) of the exact two-beam Pendellösung."""
    k_mag, s_g, u_g = 40.0, 0.004, 2e-4  # Å⁻¹, Å⁻¹, Å⁻²
    t = jnp.asarray(np.linspace(50.0, 900.0, 12))
    with jax.enable_x64(True):
        tails = intensities_with_tails(
            jnp.zeros(1), jnp.zeros(1), jnp.zeros((1, 1)), k_mag, t,
            jnp.asarray([s_g]), jnp.zeros(1), jnp.full((1, 1), u_g),
        )  # fmt: skip
        exact = bloch.bloch_intensities(
            jnp.asarray([0.0, s_g]), jnp.zeros(2), jnp.asarray([[0.0, u_g], [u_g, 0.0]]), k_mag, t
        )
    kinematic = (u_g / k_mag) ** 2 * np.sin(np.pi * s_g * np.asarray(t)) ** 2 / s_g**2
    assert kinematic.max() > 1e-6
    np.testing.assert_allclose(tails[:, 1], kinematic, rtol=1e-10)
    np.testing.assert_allclose(tails[:, 0], 1.0)
    np.testing.assert_allclose(tails[:, 1], exact[:, 1], rtol=1e-3)


def _loss(b, coupling, diagonal, thickness):
    psi, tail = propagate_hermitian_tails(b, coupling, diagonal, thickness)
    weights = jnp.arange(1.0, tail.shape[1] + 1.0)
    return jnp.sum(jnp.abs(tail) ** 2 * weights[None, :]) + jnp.sum(jnp.abs(psi) ** 2)


@pytest.mark.parametrize("real", [False, True])
def test_tail_derivatives_match_central_differences(real) -> None:
    b, coupling, diagonal = _system(real, seed=3)
    rng = np.random.default_rng(4)
    directions = [rng.normal(size=b.shape), rng.normal(size=coupling.shape),
                  rng.normal(size=diagonal.shape), rng.normal(size=THICKNESS.shape)]  # fmt: skip
    if not real:
        directions[0] = directions[0] + 1j * rng.normal(size=b.shape)
        directions[1] = directions[1] + 1j * rng.normal(size=coupling.shape)
    directions[0] = directions[0] + directions[0].conj().T  # Hermitian perturbations
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (b, coupling, diagonal, THICKNESS)]
        for k, direction in enumerate(directions):
            tangents = [jnp.zeros_like(a) for a in args]
            tangents[k] = jnp.asarray(direction, args[k].dtype)
            _, derivative = jax.jvp(_loss, args, tangents)
            h = 1e-5 if k == 3 else 1e-8  # the resonant tail curves on a 1e-3 scale

            def shifted(sign, k=k, direction=direction, h=h):
                moved = list(args)
                moved[k] = args[k] + sign * h * jnp.asarray(direction, args[k].dtype)
                return float(_loss(*moved))

            central = (shifted(1) - shifted(-1)) / (2 * h)
            assert abs(central) > 1e-3
            np.testing.assert_allclose(float(derivative), central, rtol=1e-6)
        # Reverse mode is the transposed JVP: the gradient along b's direction agrees.
        grad_b = jax.grad(_loss)(*args)
        assert np.isfinite(np.asarray(grad_b)).all()


def test_tail_gradient_is_finite_at_degenerate_eigenvalues() -> None:
    b = np.diag([0.0, 0.03, 0.03, -0.02])  # an exactly degenerate pair
    coupling = np.full((2, 4), 0.01)
    with jax.enable_x64(True):
        grads = jax.grad(_loss, argnums=(0, 1, 2, 3))(
            jnp.asarray(b), jnp.asarray(coupling), jnp.asarray([0.05, -0.07]),
            jnp.asarray(THICKNESS),
        )  # fmt: skip
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.slow  # 18 s; runs in CI's test-slow
def test_runs_with_tails_come_closer_to_the_frame_solve(quartz_crystal, quartz_frames) -> None:
    """Real quartz, 6 frames, 24 runs of one sub-orientation (each its own beams): the tails
    halve the scored intensities' distance to the whole-frame solve and to a wider one."""
    frames = select_frames(quartz_frames, list(range(0, 30, 5)))
    options = {"sg_max": 0.005, "sg_weak": 0.03, "n_sub": 24, "bethe_terms": 4}
    whole = build_frame_setup(quartz_crystal, frames, **options)
    wide = build_frame_setup(quartz_crystal, frames, **{**options, "sg_max": 0.03, "sg_weak": 0.06})
    bare = build_frame_setup(quartz_crystal, frames, segments=24, **options)
    tails = build_frame_setup(quartz_crystal, frames, segments=24, tails=True, **options)
    assert tails.segments is not None and tails.segments.tail is not None
    assert bare.segments is not None and bare.segments.tail is None
    scored = whole.scored
    i_whole, i_wide, i_bare, i_tails = (
        simulate_frames(quartz_crystal, frames, 450.0, setup=s)["I_calc"].values[scored]
        for s in (whole, wide, bare, tails)
    )

    def distance(i, reference):
        return np.abs(i - reference).sum() / reference.sum()

    assert distance(i_tails, i_whole) < 0.6 * distance(i_bare, i_whole)
    assert distance(i_tails, i_wide) < 0.6 * distance(i_bare, i_wide)
    # As close to the wider solve as the whole-frame solve itself (measured 1.27 % and 1.06 %).
    assert distance(i_tails, i_wide) < 1.5 * distance(i_whole, i_wide)


def test_runs_with_tails_gradient_matches_central_differences(
    quartz_crystal, quartz_frames
) -> None:
    frames = select_frames(quartz_frames, [3])
    setup = build_frame_setup(
        quartz_crystal,
        frames,
        sg_max=0.005,
        sg_weak=0.03,
        n_sub=8,
        segments=4,
        g_max=0.9,
        tails=True,
    )
    assert setup.segments is not None and setup.segments.tail_valid is not None
    assert setup.segments.tail_valid.any()
    tables, params = structure_tables(quartz_crystal), structure_params(quartz_crystal)
    weights = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 1, setup.hkl.shape[1])))

    @jax.jit
    def loss(fract, t):
        stack = frame_intensity_stack(params._replace(fract=fract), tables, setup, t)
        return jnp.sum(weights * stack)

    with jax.enable_x64(True):
        fract, t = jnp.asarray(params.fract), jnp.full((1, 1), 380.0)
        grad_fract, grad_t = jax.grad(loss, argnums=(0, 1))(fract, t)
        direction = np.random.default_rng(1).normal(size=fract.shape)
        h = 1e-6
        central = (
            float(loss(fract + h * direction, t)) - float(loss(fract - h * direction, t))
        ) / (2 * h)
        np.testing.assert_allclose(float(np.sum(grad_fract * direction)), central, rtol=1e-6)
        central_t = (float(loss(fract, t + 1e-3)) - float(loss(fract, t - 1e-3))) / 2e-3
        np.testing.assert_allclose(float(grad_t[0, 0]), central_t, rtol=1e-6)


def test_single_precision_tails_hold_the_intensities() -> None:
    """complex64 / float32 solves (what ``precision="auto"`` picks for large runs): the tails'
    intensities within 1e-4 of double's, relative to the strongest."""
    rng = np.random.default_rng(7)
    n, n_out, k_mag = 40, 60, 40.0
    u = 0.004 * rng.normal(size=(n, n))
    potential = u + u.T
    s = np.concatenate([[0.0], rng.uniform(-0.02, 0.02, n - 1)])
    s_tail = rng.choice([-1, 1], n_out) * rng.uniform(0.006, 0.05, n_out)
    tail_potential = 0.004 * rng.normal(size=(n_out, n))
    t = jnp.asarray([150.0, 420.0, 900.0])
    with jax.enable_x64(True):
        args = (jnp.asarray(s), jnp.zeros(n), jnp.asarray(potential), k_mag, t,
                jnp.asarray(s_tail), jnp.zeros(n_out), jnp.asarray(tail_potential))  # fmt: skip
        double = np.asarray(intensities_with_tails(*args))
        single = np.asarray(intensities_with_tails(*args, solve_dtype=jnp.complex64))
    assert np.isfinite(single).all() and double[:, n:].max() > 1e-4
    np.testing.assert_allclose(single, double, atol=1e-4 * double.max())
