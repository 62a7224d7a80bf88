"""Several thickness models scored from one solve of each orientation.

The profile network's start spread (:func:`edkit.refine.prepare.start_spread`) compares
candidates that share the structure and orientations and differ only in each frame's
thickness nodes and weights. One eigendecomposition serves every thickness, so a streamed
problem solves each orientation once at the union of the candidates' nodes and weights the
intensities once per candidate: one pass instead of one per candidate (≈ 150 s each on a
CsPbBr₃-sized dataset).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edkit.refine.core import Intermediates, intermediates, placed
from edkit.refine.objective import chunk_partial_sum, loss_from_sums
from edkit.refine.problem import Chunk, Problem
from edkit.simulate.stack import StackConfig, stack_frames


@functools.partial(jax.jit, static_argnums=(4, 5))
def chunk_candidate_sums(
    z: Intermediates,
    weights: jax.Array,
    chunk: Chunk,
    reciprocal: jax.Array,
    config: StackConfig,
    objective: str,
) -> tuple[jax.Array, jax.Array]:
    """One chunk's training partial sums and I_calc for K weightings of the same thickness
    nodes, from one solve: ``weights`` (K, n_f, n_t) replace ``z.thickness_weights``.
    Returns (K,) sums and (K, r) intensities."""
    stack = stack_frames(
        z.potentials, reciprocal, chunk.arrays, z.thickness[chunk.frames],
        z.orientation[chunk.frames], config,
    )  # fmt: skip

    def one(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        i_calc = jnp.einsum("ct,ctn->cn", w[chunk.frames], stack)[chunk.refl_frame, chunk.refl_beam]
        n_local = chunk.frames.shape[0]
        train = chunk_partial_sum(
            objective, chunk.i_obs, chunk.sigma, i_calc, chunk.train, chunk.refl_frame, n_local
        )
        return train, i_calc

    return jax.vmap(one)(weights)


def candidate_losses(problem: Problem, candidates: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Training losses and I_calc of parameter sets that differ only in the thickness model,
    from one solve per orientation: each frame is solved once at the union of the candidates'
    thickness nodes (one eigendecomposition serves every thickness), then weighted K ways.

    Returns (K,) losses and (K, n_refl) intensities, equal to K streamed forward passes.
    Raises ValueError when the candidates differ in anything but the thickness nodes/weights.
    """
    zs = [intermediates(placed(params, problem), problem) for params in candidates]
    for z in zs[1:]:
        same = jax.tree.map(
            lambda a, b: bool(jnp.array_equal(a, b)), (z.potentials, z.orientation),
            (zs[0].potentials, zs[0].orientation),
        )  # fmt: skip
        if not all(jax.tree.leaves(same)):
            raise ValueError("candidate_losses: the candidates differ beyond the thickness model")
    nodes = jnp.concatenate([z.thickness for z in zs], axis=1)
    # Candidate k weights its own nodes and gives the others' zero weight.
    blocks = [[z.thickness_weights if j == k else jnp.zeros_like(z.thickness) for j, z in
               enumerate(zs)] for k in range(len(zs))]  # fmt: skip
    weights = jnp.stack([jnp.concatenate(row, axis=1) for row in blocks])
    z = zs[0]._replace(thickness=nodes, thickness_weights=weights[0])
    sums = jnp.zeros(len(zs), dtype=nodes.dtype)
    i_calc = jnp.zeros((len(zs), problem.n_refl), dtype=nodes.dtype)
    for chunk in problem.chunks:
        s, i_chunk = chunk_candidate_sums(
            z, weights, chunk, problem.tables.reciprocal_basis, problem.config, problem.objective
        )
        sums = sums + s
        i_calc = i_calc.at[:, chunk.refl_index].set(i_chunk, mode="drop")
    denominator = problem.train_denominator
    losses = [float(loss_from_sums(problem.objective, s, denominator)[0]) for s in sums]
    return np.asarray(losses), np.asarray(i_calc)
