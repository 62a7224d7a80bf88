"""The streamed refinement core (edkit.refine.core, lm, planner) against direct, unchunked routes.

The problem: α-quartz on 5 frames of a generated rotation series (g_max 1.0 Å⁻¹, 5
sub-orientations, Bethe beams as the refinement's defaults), a profile-net thickness and
orientation corrections, the start displaced. The direct routes differentiate the whole dataset
at once through ``frame_intensity_stack`` and the metrics module's losses, as edkit did before
frames were streamed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import twenty_steps_trace_once
from flax import nnx

from edkit import EdkitError, Refinement, metrics, read_cif, read_pets
from edkit.refine import core, lm, planner
from edkit.refine.planner import plan_memory
from edkit.simulate import frames as frames_module
from edkit.simulate.stack import frame_intensity_stack
from edkit.simulate.synthetic import make_dataset, rotation_series

G_MAX = 1.0
N_SUB = 5


@pytest.fixture(scope="module")
def dataset(data_dir):
    quartz = read_cif(data_dir / "structures" / "quartz.cif")
    experiment = read_pets(data_dir / "pets" / "quartz_experimental.cif_pets")
    geometry = rotation_series(
        experiment, alpha_start=-30.0, alpha_step=12.0, n_frames=5, semiangle=1.5
    )
    return make_dataset(quartz, geometry, 450.0, n_sub=N_SUB, g_max=G_MAX, seed=3)


@pytest.fixture(scope="module")
def start(data_dir):
    quartz = read_cif(data_dir / "structures" / "quartz.cif")
    fract = quartz.fract.copy()
    fract[1] += [0.004, -0.003, 0.002]
    return quartz.replace(fract=fract)


def _refinement(start, dataset, chunk_frames):
    # divergence_factor: these tests count traces and compare routes; from the search's close
    # start (within 8 % of the true 450 Å) the first Adam step on the thickness network raises
    # the loss fivefold, which the default factor (3) reports as divergence.
    return Refinement(
        start, dataset, g_max=G_MAX, n_sub=N_SUB, thickness_grid=(200.0, 800.0, 100.0),
        chunk_frames=chunk_frames, divergence_factor=10.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_frame_chunks(start, dataset):
    return _refinement(start, dataset, 1)


def _stepped_params(refinement):
    """Parameters away from the start in every group (orientations and network included)."""
    params = refinement.state
    key = iter(jax.random.split(jax.random.key(0), 64))
    return jax.tree.map(lambda x: x + 1e-3 * jax.random.normal(next(key), x.shape), params)


def _direct_intensities(refinement, params):
    """Every reflection's I_calc with the whole dataset at once (frame_intensity_stack)."""
    problem, setup = refinement.problem, refinement.setup
    model = nnx.merge(problem.graphdef, params)
    values, weights = model.thickness(problem.features)
    stack = frame_intensity_stack(
        model.structure(problem.mapping), problem.tables, setup, values,
        orientation_corrections=model.orientation[...],
    )  # fmt: skip
    return frames_module.reflection_intensities(setup, jnp.einsum("ft,ftn->fn", weights, stack))


def _direct_loss(refinement, params):
    """The whole dataset at once: metrics' wR of :func:`_direct_intensities`."""
    setup = refinement.setup
    i_calc = _direct_intensities(refinement, params)
    loss = metrics.jana_wr_loss(
        jnp.asarray(refinement.i_obs), jnp.asarray(refinement.sigma), i_calc,
        jnp.asarray(refinement.train_mask), jnp.asarray(setup.refl_frame), setup.n_frames,
    )  # fmt: skip
    return loss + core.penalty_of(params, refinement.problem)


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_chunked_value_and_gradient_equal_the_whole_dataset_at_once(one_frame_chunks) -> None:
    r = one_frame_chunks
    assert len(r.problem.chunks) == r.setup.n_frames  # one frame per chunk
    params = _stepped_params(r)
    with jax.enable_x64(True):  # the same chunks with complex128 solves, as the direct path
        value, grads = core.value_and_grad(params, r.polish_problem)
        direct_value, direct_grads = jax.value_and_grad(_direct_loss, argnums=1)(r, params)
    assert float(value) == pytest.approx(float(direct_value), rel=1e-10)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(direct_grads), strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-300)
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-10 * scale


@pytest.mark.slow  # ≥ 12 s; runs in CI's test-slow
def test_streamed_steps_trace_once_per_chunk_shape(start, dataset) -> None:
    r = _refinement(start, dataset, 1)
    assert not r.problem.fused and len(r.problem.chunks) == r.setup.n_frames
    twenty_steps_trace_once(r)


@pytest.mark.slow  # ≥ 12 s; runs in CI's test-slow
def test_chunk_sizes_give_the_same_step(one_frame_chunks, start, dataset) -> None:
    whole = _refinement(start, dataset, 64)
    assert len(whole.problem.chunks) < len(one_frame_chunks.problem.chunks)
    params = _stepped_params(one_frame_chunks)
    with jax.enable_x64(True):
        a = core.predict(params, one_frame_chunks.problem)
        b = core.predict(params, whole.problem)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


def _direct_normal_equations(refinement, least_squares):
    """JᵀJ, Jᵀr, rᵀr from the full Jacobian of every training residual (jacfwd)."""
    setup = refinement.setup
    mask = jnp.asarray(refinement.train_mask)

    def residuals(theta):
        i_calc = _direct_intensities(refinement, least_squares.shift(refinement.state, theta))
        return metrics.jana_residuals(
            jnp.asarray(refinement.i_obs), jnp.asarray(refinement.sigma), i_calc, mask,
            jnp.asarray(setup.refl_frame), setup.n_frames,
        )  # fmt: skip

    theta = jnp.zeros(least_squares.n_free)
    r = residuals(theta)
    jac = jax.jacfwd(residuals)(theta)  # (n_refl, n_par): the full Jacobian, small here
    return np.asarray(jac.T @ jac), np.asarray(jac.T @ r), float(r @ r)


@pytest.mark.slow  # compile-heavy; runs in CI's test-slow
def test_accumulated_normal_matrix_equals_the_full_jacobian(one_frame_chunks) -> None:
    r = one_frame_chunks
    least_squares = r._structure_least_squares()
    with jax.enable_x64(True):
        equations = least_squares.normal_equations(r.state)
        normal, gradient, cost = _direct_normal_equations(r, least_squares)
    np.testing.assert_allclose(
        equations.normal, normal, rtol=1e-8, atol=1e-8 * np.abs(normal).max()
    )
    np.testing.assert_allclose(
        equations.gradient, gradient, rtol=1e-8, atol=1e-8 * np.abs(gradient).max()
    )
    assert equations.cost == pytest.approx(cost, rel=1e-10)
    # The LM step and the s.u.'s from either matrix agree to 1e-8.
    shift = np.linalg.solve(equations.normal + 1e-3 * np.diag(np.diag(equations.normal)),
                            -equations.gradient)  # fmt: skip
    direct_shift = np.linalg.solve(normal + 1e-3 * np.diag(np.diag(normal)), -gradient)
    np.testing.assert_allclose(shift, direct_shift, rtol=1e-8, atol=1e-8 * np.abs(shift).max())
    cov, gof = lm.covariance(equations, least_squares.n_free)
    direct_cov, direct_gof = lm.covariance(
        lm.NormalEquations(normal, gradient, cost, equations.n_residuals), least_squares.n_free
    )
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), np.sqrt(np.diag(direct_cov)), rtol=1e-8)
    assert gof == pytest.approx(direct_gof, rel=1e-10)


def test_a_tiny_memory_limit_is_refused_before_any_heavy_work(start, dataset, monkeypatch):
    def no_grid_search(*args, **kwargs):
        raise AssertionError("the grid search ran before the memory check")

    monkeypatch.setattr("edkit.refine.prepare.thickness_search", no_grid_search)
    with pytest.raises(EdkitError, match=r"needs about [0-9.]+ GB .* budget is 0\.00 GB"):
        Refinement(start, dataset, g_max=G_MAX, n_sub=N_SUB, memory_limit=1e6)
    with pytest.raises(EdkitError, match="memory size"):
        Refinement(start, dataset, g_max=G_MAX, n_sub=N_SUB, memory_limit="lots")


def test_planner_chooses_smaller_chunks_for_a_smaller_budget(one_frame_chunks) -> None:
    setup = one_frame_chunks.setup
    roomy = plan_memory(setup, memory_limit=20e9)
    assert roomy.remat is False and roomy.chunk_frames == setup.n_frames
    fixed = roomy.fixed_bytes
    tight = plan_memory(setup, memory_limit=fixed + 1.5 * roomy.frame_bytes)
    assert tight.chunk_frames == 1
    assert tight.peak_bytes <= tight.budget_bytes
    assert "frame(s) per chunk" in tight.describe()


def test_auto_precision_steps_in_single_and_polishes_small_solves_in_double(
    one_frame_chunks, monkeypatch
) -> None:
    """precision="auto": complex64 solves in the gradient steps; the least squares and s.u.'s
    in complex128 below AUTO_SINGLE_BEAMS beams (memory planned for them), complex64 above."""
    r = one_frame_chunks
    setup = r.setup
    assert r.options.precision == "auto"  # the default
    small = plan_memory(setup, memory_limit=20e9, precision="auto")
    n = small.largest[0]
    assert n < planner.AUTO_SINGLE_BEAMS
    assert (small.precision, small.polish_precision) == ("single", "double")
    assert "complex64 solves (complex128 in least squares)" in small.describe()
    assert r.problem.config.solve_dtype == "complex64"
    assert r.polish_problem.config.solve_dtype is None  # complex128 under x64
    assert r._structure_least_squares().problem is r.polish_problem
    assert r.full_least_squares().problem is r.polish_problem
    with jax.enable_x64(True):  # the two problems really solve in different precisions
        steps = np.asarray(core.predict(r.state, r.problem))
        polish = np.asarray(core.predict(r.state, r.polish_problem))
    difference = np.abs(steps - polish).max() / np.abs(polish).max()
    assert 1e-12 < difference < 1e-5, difference
    double = plan_memory(setup, memory_limit=20e9, precision="double")
    assert (double.precision, double.polish_precision) == ("double", "double")
    assert "complex64" not in double.describe()
    assert double.frame_bytes == small.frame_bytes  # planned for the double least squares
    single = plan_memory(setup, memory_limit=20e9, precision="single")
    assert (single.precision, single.polish_precision) == ("single", "single")
    monkeypatch.setattr(planner, "AUTO_SINGLE_BEAMS", n)  # as if this were a large crystal
    large = plan_memory(setup, memory_limit=20e9, precision="auto")
    assert (large.precision, large.polish_precision) == ("single", "single")
    assert "complex64 solves" in large.describe() and "complex128" not in large.describe()
    assert large.frame_bytes < small.frame_bytes
