"""The pure refinement core: ``init`` and ``step``, frames streamed, gradients accumulated.

In the optax / jax-md manner (style.md §4): :func:`init` makes a :class:`RefineState`
(parameters, optimiser state, step counter) and :func:`step` maps ``(state, problem)`` to
``(state, metrics)``; failure is data (:class:`Metrics`), not an exception.

A step runs in three compiled pieces, so that memory is that of one chunk of frames:

1. ``intermediates``: parameters → what the frames share (F of every hkl difference, |K|, κ)
   and what they take per frame (thickness nodes and weights, orientation corrections). Cheap.
2. for each chunk of frames: the chunk's partial sum of the loss and its cotangent with respect
   to those intermediates (one ``jax.vjp`` through the chunk's Bloch solves; compiled once per
   chunk shape and shared by every refinement). The sums and cotangents are added up exactly.
3. ``apply``: the loss's outer function (e.g. wR = sqrt(N/D)) scales the summed cotangent, one
   pull-back through step 1 gives the parameters' gradient, and the optax update is applied.
"""

import collections
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from edkit.refine.objective import chunk_partial_sum, loss_from_sums
from edkit.refine.problem import Chunk, Problem
from edkit.refine.restraints import restraint_residuals
from edkit.simulate.sharding import replicated
from edkit.simulate.stack import Potentials, StackConfig, potentials, stack_frames


class Intermediates(NamedTuple):
    """What the chunks take from the parameters (see the module docstring).

    Attributes:
      potentials: F (m,), |K| and κ. thickness, thickness_weights: nodes (Å) and weights per
      frame, (n_f, n_t). orientation: small correction angles per frame, radians, (n_f, 3).
    """

    potentials: Potentials
    thickness: jax.Array
    thickness_weights: jax.Array
    orientation: jax.Array


class RefineState(NamedTuple):
    """Parameters (``nnx.State`` of the hybrid model), optimiser state and completed steps."""

    params: Any
    opt_state: Any
    step: jax.Array


class Metrics(NamedTuple):
    """What a step measured (at the parameters it started from).

    Attributes:
      loss: training loss including the ADP penalty, (). validation_loss: on held-out frames
      (NaN without them), (). penalty: the ADP penalty, (). finite: loss and gradient finite
      (else the update was skipped), bool (). grad_norms: {group: ‖gradient‖}. i_calc: each
      reflection's calculated intensity (unscaled; 0 where not simulated), (n_refl,).
    """

    loss: jax.Array
    validation_loss: jax.Array
    penalty: jax.Array
    finite: jax.Array
    grad_norms: dict[str, jax.Array]
    i_calc: jax.Array


#: How often each compiled piece was traced (incremented while tracing; tests count them).
TRACES: collections.Counter[str] = collections.Counter()

#: ADP penalty weight (keeps every ADP tensor positive definite).
ADP_PENALTY = 10.0


def model_intermediates(params: Any, problem: Problem) -> Intermediates:
    """Parameters → :class:`Intermediates` (differentiable)."""
    model = nnx.merge(problem.graphdef, params)
    structure = problem.mapping.structure(
        model.positions[...], model.adp[...], model.occupancy[...]
    )
    kappa = jnp.abs(model.absorption[...]) if problem.config.absorbing else None
    pot = potentials(
        structure,
        problem.tables,
        problem.differences,
        problem.config.voltage,
        kappa,
        problem.real_potential,
    )
    values, weights = model.thickness(problem.features)
    return Intermediates(pot, values, weights, model.orientation[...])


@jax.jit
def intermediates(params: Any, problem: Problem) -> Intermediates:
    """Compiled :func:`model_intermediates` (the forward part of a step)."""
    TRACES["intermediates"] += 1
    return model_intermediates(params, problem)


def chunk_intensities(
    z: Intermediates, chunk: Chunk, reciprocal: jax.Array, config: StackConfig
) -> jax.Array:
    """Calculated intensity of each reflection of ``chunk``, (r,)."""
    frames = chunk.frames
    stack = stack_frames(
        z.potentials,
        reciprocal,
        chunk.arrays,
        z.thickness[frames],
        z.orientation[frames],
        config,
    )  # (c, n_t, n)
    frame_values = jnp.einsum("ct,ctn->cn", z.thickness_weights[frames], stack)
    return frame_values[chunk.refl_frame, chunk.refl_beam]


def _chunk_sums(z, chunk, reciprocal, config, objective):
    i_calc = chunk_intensities(z, chunk, reciprocal, config)
    n_local = chunk.frames.shape[0]
    args = (chunk.i_obs, chunk.sigma, i_calc)
    train = chunk_partial_sum(objective, *args, chunk.train, chunk.refl_frame, n_local)
    validation = chunk_partial_sum(objective, *args, chunk.validation, chunk.refl_frame, n_local)
    return train, (validation, i_calc)


@functools.partial(jax.jit, static_argnums=(3, 4))
def chunk_value_and_cotangent(
    z: Intermediates, chunk: Chunk, reciprocal: jax.Array, config: StackConfig, objective: str
) -> tuple[jax.Array, jax.Array, jax.Array, Intermediates]:
    """One chunk: its training and validation partial sums, its reflections' intensities and
    the cotangent of the training sum with respect to ``z``. Compiled once per chunk shape."""
    TRACES["chunk"] += 1
    train, pullback, (validation, i_calc) = jax.vjp(
        lambda z: _chunk_sums(z, chunk, reciprocal, config, objective), z, has_aux=True
    )
    (cotangent,) = pullback(jnp.ones_like(train))
    return train, validation, i_calc, cotangent


@functools.partial(jax.jit, static_argnums=(2,))
def fused_value_and_cotangent(
    z: Intermediates, problem: Problem, gradient: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, Intermediates | None]:
    """Every chunk in one compiled program with its tables as constants (small problems,
    ``Problem.fused``; traced once per problem): XLA folds the tables and may run independent
    chunks concurrently. Same sums as the chunk-by-chunk loop; without ``gradient`` the
    cotangent is None."""
    TRACES["fused"] += 1
    assert problem.host is not None
    reciprocal, config, objective = (
        problem.tables.reciprocal_basis,
        problem.config,
        problem.objective,
    )
    train = validation = jnp.zeros(())
    total = None
    i_calc = jnp.zeros(problem.n_refl, dtype=z.thickness.dtype)
    for chunk in problem.host.chunks:

        def sums(z, chunk=chunk):
            return _chunk_sums(z, chunk, reciprocal, config, objective)

        if gradient:
            s_train, pullback, (s_val, i_chunk) = jax.vjp(sums, z, has_aux=True)
            (cotangent,) = pullback(jnp.ones_like(s_train))
            total = cotangent if total is None else jax.tree.map(jnp.add, total, cotangent)
        else:
            s_train, (s_val, i_chunk) = sums(z)
        train, validation = train + s_train, validation + s_val
        i_calc = i_calc.at[chunk.refl_index].set(i_chunk, mode="drop")
    return train, validation, i_calc, total


@functools.partial(jax.jit, static_argnums=(0,))
def _fused_sum(function: Any, args: tuple, problem: Problem) -> Any:
    TRACES["fused"] += 1
    assert problem.host is not None
    total = None
    for chunk in problem.host.chunks:
        out = function(*args, chunk, problem.tables.reciprocal_basis, problem.config)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    return total


def sum_over_chunks(function: Any, compiled: Any, args: tuple, problem: Problem) -> Any:
    """Σ over the chunks of ``function(*args, chunk, reciprocal, config)`` (a pytree): one
    program for a fused problem, else ``compiled`` (its jitted twin) chunk by chunk."""
    if problem.fused:
        return _fused_sum(function, args, problem)
    total = None
    for chunk in problem.chunks:
        out = compiled(*args, chunk, problem.tables.reciprocal_basis, problem.config)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    return total


@functools.partial(jax.jit, static_argnums=(3, 4))
def chunk_forward(
    z: Intermediates, chunk: Chunk, reciprocal: jax.Array, config: StackConfig, objective: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One chunk without the gradient: training and validation partial sums and I_calc."""
    train, (validation, i_calc) = _chunk_sums(z, chunk, reciprocal, config, objective)
    return train, validation, i_calc


def group_labels(params: Any) -> Any:
    """The parameter group of every leaf: its top-level attribute name in the model."""
    return jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key), params)


def make_optimizer(
    params: Any, groups: tuple[str, ...], rates: dict[str, float], decay_steps: int
) -> optax.GradientTransformation:
    """Adam per group with a live learning rate (``inject_hyperparams``: changing it never
    recompiles), the decay 1/(1 + n/decay_steps), and non-finite updates skipped and counted
    (``apply_if_finite``)."""

    def scaled(learning_rate):
        return optax.scale(-learning_rate)

    decay = max(int(decay_steps), 1)
    transforms = {
        group: optax.chain(
            optax.scale_by_adam(),
            optax.inject_hyperparams(scaled)(learning_rate=rates[group]),
            optax.scale_by_schedule(lambda count: 1.0 / (1.0 + count / decay)),
        )
        for group in groups
    }
    return optax.apply_if_finite(
        optax.multi_transform(transforms, group_labels(params)), max_consecutive_errors=10**9
    )


def set_learning_rates(opt_state: Any, rates: dict[str, float]) -> Any:
    """``opt_state`` with these groups' learning rates (0 switches a group off)."""
    inner = opt_state.inner_state
    for group, rate in rates.items():
        chain = inner.inner_states[group].inner_state
        chain[1].hyperparams["learning_rate"] = jnp.asarray(rate, dtype=jnp.float64)
    return opt_state


def init(params: Any, problem: Problem) -> RefineState:
    """The state at step 0 for the model parameters ``params`` (an ``nnx.State``)."""
    return RefineState(params, problem.optimizer.init(params), jnp.asarray(0))


def restraint_sum(params: Any, problem: Problem) -> jax.Array:
    """Σ r² of the restraints' residuals (0 without restraints): added to the loss's sum N."""
    if problem.restraints is None:
        return jnp.zeros(())
    model = nnx.merge(problem.graphdef, params)
    structure = problem.mapping.structure(
        model.positions[...], model.adp[...], model.occupancy[...]
    )
    r = restraint_residuals(
        problem.restraints, structure.fract, structure.u_star, problem.mapping.real_basis
    )
    return jnp.sum(r * r)


restraint_value = jax.jit(restraint_sum)


def restraint_normal_terms(
    problem: Problem, shifted: Any, n: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The restraints' share of normal equations over ``n`` coefficients θ: (JᵀJ (n, n),
    Jᵀr (n,), rᵀr ()), with J = ∂r/∂θ at θ = 0 and ``shifted(θ)`` the parameters moved by θ.
    Zeros without restraints. Each restraint residual counts as one observation."""
    tables = problem.restraints
    if tables is None:
        return jnp.zeros((n, n)), jnp.zeros(n), jnp.zeros(())

    def residuals(theta: jax.Array) -> jax.Array:
        model = nnx.merge(problem.graphdef, shifted(theta))
        structure = problem.mapping.structure(
            model.positions[...], model.adp[...], model.occupancy[...]
        )
        return restraint_residuals(
            tables, structure.fract, structure.u_star, problem.mapping.real_basis
        )

    theta = jnp.zeros(n)
    r = residuals(theta)
    jacobian = jax.jacfwd(residuals)(theta)
    return jacobian.T @ jacobian, jacobian.T @ r, jnp.sum(r * r)


def n_restraint_residuals(problem: Problem) -> int:
    """Observations the restraints add (0 without restraints)."""
    return 0 if problem.restraints is None else problem.restraints.n_residuals


def penalty_of(params: Any, problem: Problem) -> jax.Array:
    """The ADP penalty (zero while every ADP tensor is positive definite)."""
    model = nnx.merge(problem.graphdef, params)
    return ADP_PENALTY * problem.mapping.adp_penalty(model.adp[...])


@jax.jit
def apply_gradient(
    state: RefineState, problem: Problem, cotangent: Intermediates, factor: jax.Array
) -> tuple[RefineState, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Pull the summed chunk cotangent (times the loss's outer derivative ``factor``) back to the
    parameters, add the penalty's gradient and apply the optimiser (skipped if non-finite)."""
    TRACES["apply"] += 1
    penalty, grads = parameter_gradient(state.params, problem, cotangent, factor)
    updates, opt_state = problem.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    labels = group_labels(grads)
    norms: dict[str, jax.Array] = {}
    for label, leaf in zip(
        jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(grads), strict=True
    ):
        norms[label] = norms.get(label, 0.0) + jnp.sum(jnp.abs(leaf) ** 2)
    norms = {k: jnp.sqrt(v) for k, v in norms.items()}
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return RefineState(params, opt_state, state.step + 1), penalty, finite, norms


def placed[T](tree: T, problem: Problem) -> T:
    """``tree`` (parameters, optimiser state) on the devices the frames are sharded over, one
    copy each, as the sharded programs return it: a step's inputs then have one placement from
    the first step on, and its program is compiled once. A no-op on one device."""
    if problem.config.devices <= 1:
        return tree
    return jax.device_put(tree, replicated(problem.config.devices))


def accumulate(problem: Problem, params: Any, *, gradient: bool = True):
    """Stream every chunk: the summed training and validation partial sums, every reflection's
    I_calc (n_refl,) and, with ``gradient``, the summed cotangent of the training sum."""
    z = intermediates(placed(params, problem), problem)
    reciprocal = problem.tables.reciprocal_basis
    if problem.fused:
        return fused_value_and_cotangent(z, problem, gradient)
    train = validation = jnp.zeros(())
    total = None
    i_calc = jnp.zeros(problem.n_refl, dtype=z.thickness.dtype)
    for chunk in problem.chunks:
        args = (z, chunk, reciprocal, problem.config, problem.objective)
        if gradient:
            s_train, s_val, i_chunk, cotangent = chunk_value_and_cotangent(*args)
            total = cotangent if total is None else jax.tree.map(jnp.add, total, cotangent)
        else:
            s_train, s_val, i_chunk = chunk_forward(*args)
        train, validation = train + s_train, validation + s_val
        i_calc = i_calc.at[chunk.refl_index].set(i_chunk, mode="drop")
    return train, validation, i_calc, total


def step(state: RefineState, problem: Problem) -> tuple[RefineState, Metrics]:
    """One optimisation step over every frame, streamed chunk by chunk (see module docstring).

    The value and gradient equal those of the whole dataset at once (the chunks' sums are
    exact partial sums). A non-finite gradient leaves the parameters unchanged
    (``Metrics.finite`` False; the optimiser counts it).
    """
    state = placed(state, problem)
    train, validation, i_calc, cotangent = accumulate(problem, state.params)
    train = train + restraint_value(state.params, problem)
    loss, factor = loss_from_sums(problem.objective, train, problem.train_denominator)
    val_loss, _ = loss_from_sums(problem.objective, validation, problem.validation_denominator)
    new_state, penalty, finite, norms = apply_gradient(state, problem, cotangent, factor)
    finite = finite & jnp.isfinite(loss)
    metrics = Metrics(loss + penalty, val_loss, penalty, finite, norms, i_calc)
    return new_state, metrics


def predict(params: Any, problem: Problem) -> np.ndarray:
    """Every reflection's I_calc (unscaled; 0 where not simulated), streamed, (n_refl,)."""
    _, _, i_calc, _ = accumulate(problem, params, gradient=False)
    return np.asarray(i_calc)


@jax.jit
def parameter_gradient(
    params: Any, problem: Problem, cotangent: Intermediates, factor: jax.Array
) -> tuple[jax.Array, Any]:
    """The penalty and the parameters' gradient of the loss (penalty included) from the summed
    chunk cotangent and the loss's outer derivative ``factor``."""
    _, pullback = jax.vjp(lambda p: model_intermediates(p, problem), params)
    (grads,) = pullback(jax.tree.map(lambda x: x * factor.astype(x.real.dtype), cotangent))
    penalty, penalty_grads = jax.value_and_grad(penalty_of)(params, problem)
    grads = jax.tree.map(jnp.add, grads, penalty_grads)
    if problem.restraints is not None:  # their Σr² sits inside the loss's sum, like the data's
        restraint_grads = jax.grad(restraint_sum)(params, problem)
        grads = jax.tree.map(lambda g, r: g + factor.astype(g.dtype) * r, grads, restraint_grads)
    return penalty, grads


def value_and_grad(params: Any, problem: Problem) -> tuple[jax.Array, Any]:
    """The training loss (penalty included) and its gradient w.r.t. ``params``, streamed."""
    params = placed(params, problem)
    train, _, _, cotangent = accumulate(problem, params)
    train = train + restraint_value(params, problem)
    loss, factor = loss_from_sums(problem.objective, train, problem.train_denominator)
    penalty, grads = parameter_gradient(params, problem, cotangent, factor)
    return loss + penalty, grads
