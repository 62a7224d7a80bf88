"""Least squares on the structure: the normal matrix JᵀWJ accumulated chunk by chunk of frames.

The crystallographer's least squares (Jana2020's) on the weighted |F| residuals
r = sqrt(w)(F_o − k_f F_c) of the training reflections, with respect to the free structural
coefficients θ (positions in Å, ADPs in Å²; thickness, orientations and networks held). The
full Jacobian (n_refl × n_par) is never formed: θ enters the frames only through F, |K| (and κ),
so their tangents dF/dθ (n_par × m) are taken once by forward mode, and each chunk of frames adds
its J_cᵀJ_c (n_par × n_par), J_cᵀr_c and r_cᵀr_c, with J_c from one linearisation of the chunk
and n_par tangent passes. Levenberg–Marquardt and the standard uncertainties use these sums.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edkit.errors import EdkitError
from edkit.metrics import jana_residuals
from edkit.progress import progress_bar
from edkit.refine import core
from edkit.refine.core import (
    Intermediates,
    chunk_intensities,
    intermediates,
    model_intermediates,
    sum_over_chunks,
)
from edkit.refine.problem import Chunk, Problem
from edkit.simulate.stack import Potentials, StackConfig

#: Least squares have converged when no shift exceeds this fraction of its s.u. (Jana's and
#: SHELX's measure; both default to 0.01 or less).
SHIFT_TOLERANCE = 0.01


class NormalEquations(NamedTuple):
    """Σ over chunks: JᵀJ (n_par, n_par), Jᵀr (n_par,), rᵀr (), and the residual count."""

    normal: np.ndarray
    gradient: np.ndarray
    cost: float
    n_residuals: int


def free_masks(mapping: Any, enabled: dict[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    """Free position (n, 3) and ADP (n, 6) coefficients of the enabled groups."""
    return (
        mapping.position_mask & enabled.get("positions", False),
        mapping.adp_mask & enabled.get("adp", False),
    )


def n_free_parameters(mapping: Any, refine: tuple[str, ...]) -> int:
    """Free structural coefficients (least-squares parameters) when the groups ``refine`` are
    refined (see :func:`free_masks`)."""
    pos_mask, adp_mask = free_masks(mapping, dict.fromkeys(refine, True))
    return int(pos_mask.sum() + adp_mask.sum())


def shift_structure(
    params: Any, graphdef: Any, pos_mask: np.ndarray, adp_mask: np.ndarray, theta: jax.Array
) -> Any:
    """``params`` with the free coefficients moved by ``theta`` (positions first, then ADPs)."""
    model = nnx.merge(graphdef, params, copy=True)  # never mutate ``params`` itself
    n_pos = int(pos_mask.sum())
    model.positions[...] = model.positions[...].at[pos_mask].add(theta[:n_pos])
    model.adp[...] = model.adp[...].at[adp_mask].add(theta[n_pos:])
    return nnx.split(model, nnx.Param)[1]


def _residuals(z: Intermediates, chunk: Chunk, reciprocal: jax.Array, config: StackConfig):
    i_calc = chunk_intensities(z, chunk, reciprocal, config)
    n_local = chunk.frames.shape[0]
    return jana_residuals(chunk.i_obs, chunk.sigma, i_calc, chunk.train, chunk.refl_frame, n_local)


def chunk_normal_terms(
    z: Intermediates,
    tangents: Potentials,
    chunk: Chunk,
    reciprocal: jax.Array,
    config: StackConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One chunk's JᵀJ, Jᵀr and rᵀr; ``tangents`` are dPotentials/dθ with a leading n_par
    axis. Memory: one linearisation of the chunk and one tangent pass at a time."""

    def residuals(pot: Potentials) -> jax.Array:
        return _residuals(z._replace(potentials=pot), chunk, reciprocal, config)

    r, linear = jax.linearize(residuals, z.potentials)
    jac = jax.lax.map(linear, tangents)  # (n_par, r)
    return jac @ jac.T, jac @ r, r @ r


chunk_normal = jax.jit(chunk_normal_terms, static_argnums=(4,))


def chunk_cost_terms(
    z: Intermediates, chunk: Chunk, reciprocal: jax.Array, config: StackConfig
) -> jax.Array:
    """One chunk's rᵀr (forward only)."""
    r = _residuals(z, chunk, reciprocal, config)
    return r @ r


chunk_cost = jax.jit(chunk_cost_terms, static_argnums=(3,))


def _sum_chunks(function: Any, compiled: Any, args: tuple, problem: Problem, bar: Any) -> Any:
    """:func:`~edkit.refine.core.sum_over_chunks` with ``bar`` advanced by one per chunk (a
    fused problem runs as one program: the bar advances once by all its chunks)."""
    if problem.fused:
        total = sum_over_chunks(function, compiled, args, problem)
        bar.update(len(problem.chunks))
        return total
    total = None
    for chunk in problem.chunks:
        out = compiled(*args, chunk, problem.tables.reciprocal_basis, problem.config)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
        bar.update()
    return total


class StructureLeastSquares:
    """Normal equations and costs over the free structural coefficients of a problem.

    Args:
      problem: the refinement's fixed data.
      pos_mask, adp_mask: free coefficients (see :func:`free_masks`).
      progress: a progress bar (tqdm, with ETA) over the chunks of each normal-matrix
        accumulation (the standard uncertainties' and each Levenberg–Marquardt iteration's);
        None: where someone watches (:func:`edkit.progress.wants_progress`).
    """

    def __init__(
        self,
        problem: Problem,
        pos_mask: np.ndarray,
        adp_mask: np.ndarray,
        *,
        progress: bool | None = None,
    ) -> None:
        self.problem = problem
        self.progress = progress
        self.pos_mask, self.adp_mask = np.asarray(pos_mask), np.asarray(adp_mask)
        self.n_free = int(self.pos_mask.sum() + self.adp_mask.sum())
        if self.n_free == 0:
            raise EdkitError("no structural parameter is refined (enable 'positions' or 'adp')")
        self.n_residuals = int(sum(int(np.sum(c.train)) for c in problem.chunks))
        self.n_residuals += core.n_restraint_residuals(problem)  # restraints are observations
        self._tangents: Callable = jax.jit(self._tangents_of)
        self._restraints: Callable = jax.jit(
            lambda params: core.restraint_normal_terms(
                problem, lambda theta: self.shift(params, theta), self.n_free
            )
        )

    def shift(self, params: Any, theta: np.ndarray) -> Any:
        """``params`` moved by ``theta`` along the free coefficients."""
        return shift_structure(
            params, self.problem.graphdef, self.pos_mask, self.adp_mask, jnp.asarray(theta)
        )

    def _tangents_of(self, params: Any, problem: Problem) -> tuple[Intermediates, Potentials]:
        def potentials_of(theta):
            return model_intermediates(self.shift(params, theta), problem).potentials

        z = model_intermediates(params, problem)
        _, linear = jax.linearize(potentials_of, jnp.zeros(self.n_free))
        return z, jax.vmap(linear)(jnp.eye(self.n_free))

    def normal_equations(self, params: Any) -> NormalEquations:
        """Σ_c J_cᵀJ_c, Σ_c J_cᵀr_c and Σ_c r_cᵀr_c at ``params``, chunk by chunk."""
        problem = self.problem
        with progress_bar(len(problem.chunks) + 1, "normal matrix", "chunk", self.progress) as bar:
            z, tangents = self._tangents(params, problem)  # dF/dθ: one forward-mode pass
            bar.update()
            normal, gradient, cost = _sum_chunks(
                chunk_normal_terms, chunk_normal, (z, tangents), problem, bar
            )
        if problem.restraints is not None:  # their rows join the data's
            r_normal, r_gradient, r_cost = self._restraints(params)
            normal, gradient, cost = normal + r_normal, gradient + r_gradient, cost + r_cost
        return NormalEquations(
            np.asarray(normal), np.asarray(gradient), float(cost), self.n_residuals
        )

    def cost(self, params: Any) -> float:
        """Σ r² at ``params`` (forward only, chunk by chunk; the restraints' Σ r² included)."""
        problem = self.problem
        z = intermediates(params, problem)
        cost = float(sum_over_chunks(chunk_cost_terms, chunk_cost, (z,), problem))
        return cost + float(core.restraint_value(params, problem))


class LeastSquaresResult(NamedTuple):
    """What :func:`levenberg_marquardt` ends with.

    ``costs``: Σr² after each iteration; ``max_shift_su``: the largest |shift|/s.u. of the last
    accepted iteration (inf before any); ``equations``: the normal equations at ``params`` when
    computed on the way (for the s.u.'s, else None); ``reason``: why it stopped, in words."""

    params: Any
    costs: list[float]
    cost: float
    max_shift_su: float
    equations: NormalEquations | None
    reason: str


def max_shift_over_su(equations: NormalEquations, n_free: int, shift: np.ndarray) -> float:
    """max_i |shift_i| / s.u._i with the s.u.'s of :func:`covariance` (Jana's and SHELX's
    convergence measure; they stop below 0.01–0.001)."""
    cov, _ = covariance(equations, n_free)
    su = np.sqrt(np.maximum(np.diag(cov), 0.0))
    ratio = np.abs(shift) / np.where(su > 0, su, np.inf)
    return float(np.max(ratio)) if ratio.size else 0.0


def levenberg_marquardt(
    least_squares: StructureLeastSquares,
    params: Any,
    iterations: int,
    *,
    damping: float = 1e-3,
    tolerance: float = 1e-6,
    shift_tolerance: float = 0.0,
    progress: bool | None = None,
) -> LeastSquaresResult:
    """Levenberg–Marquardt: (JᵀJ + λ diag JᵀJ) δ = −Jᵀr, a shift accepted if Σr² drops, λ
    adapted. Stops after ``iterations``, when no shift lowers Σr², when Σr² falls by less than
    the fraction ``tolerance``, or when max |δ|/s.u. < ``shift_tolerance`` (0: not used).

    ``progress``: a progress bar over the iterations with the cost (None: that of
    ``least_squares``); each normal matrix has its own bar over the chunks."""
    show = least_squares.progress if progress is None else progress
    n_free = least_squares.n_free
    with progress_bar(iterations, "least squares", "iteration", show, leave=True) as bar:
        current = least_squares.normal_equations(params)
        equations: NormalEquations | None = current  # at ``params``, while they hold there
        cost = current.cost
        costs: list[float] = []
        max_ratio, reason = math.inf, f"{iterations} iteration(s) done"
        for iteration in range(iterations):
            normal, gradient = current.normal, current.gradient
            accepted, improvement = False, 0.0
            for _attempt in range(8):
                lhs = normal + damping * np.diag(np.maximum(np.diag(normal), 1e-12))
                shift = -np.linalg.solve(lhs, gradient)
                trial = least_squares.shift(params, shift)
                trial_cost = least_squares.cost(trial)
                if np.isfinite(trial_cost) and trial_cost < cost:
                    accepted, improvement = True, (cost - trial_cost) / cost
                    max_ratio = max_shift_over_su(current, n_free, shift)
                    params, cost = trial, trial_cost
                    damping = max(damping / 10.0, 1e-9)
                    break
                damping *= 10.0
            costs.append(cost)
            bar.update()
            bar.set_postfix(cost=f"{cost:.5g}", damping=f"{damping:.1e}")
            if not accepted:
                reason = "no shift lowers the cost (converged at this damping)"
                break  # params unchanged: ``equations`` still hold at them
            equations = None
            if improvement < tolerance:
                reason = f"the cost fell by {improvement:.1e} (< {tolerance:.0e})"
                break
            if max_ratio < shift_tolerance:
                reason = f"max shift/s.u. {max_ratio:.4f} (< {shift_tolerance:g})"
                break
            if iteration + 1 < iterations:
                current = equations = least_squares.normal_equations(params)
    return LeastSquaresResult(params, costs, cost, max_ratio, equations, reason)


def covariance(equations: NormalEquations, n_free: int) -> tuple[np.ndarray, float]:
    """Covariance of the free coefficients, pinv(JᵀJ)·GoF² (Jana's convention), and the GoF
    sqrt(Σr²/(n − n_par))."""
    dof = max(equations.n_residuals - n_free, 1)
    gof = float(np.sqrt(equations.cost / dof))
    return np.linalg.pinv(equations.normal) * gof**2, gof


def standard_uncertainties(
    mapping: Any, pos_mask: np.ndarray, adp_mask: np.ndarray, cov: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """s.u.'s of fractional coordinates (n, 3) and of U^cif 6-vectors (n, 6) from the
    covariance of the free coefficients (positions first), through each atom's basis."""
    n_pos = int(pos_mask.sum())
    n_atoms = mapping.fract0.shape[0]
    fract_su, u_su = np.zeros((n_atoms, 3)), np.zeros((n_atoms, 6))
    blocks = (
        (pos_mask, cov[:n_pos, :n_pos], mapping.position_basis, fract_su),
        (adp_mask, cov[n_pos:, n_pos:], mapping.adp_basis, u_su),
    )
    for free, block, basis, out in blocks:
        index = np.argwhere(free)  # (k, 2): atom, coefficient
        for atom in np.unique(index[:, 0]) if len(index) else []:
            rows = np.nonzero(index[:, 0] == atom)[0]
            b = basis[atom][:, index[rows, 1]]
            out[atom] = np.sqrt(np.maximum(np.diag(b @ block[np.ix_(rows, rows)] @ b.T), 0))
    return fract_su, u_su
