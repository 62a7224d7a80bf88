"""``JointRefinement``: one structure refined against several datasets at once.

Each dataset keeps what belongs to its crystal and its experiment: a full
:class:`~edkit.refine.refinement.Refinement` of its own (beam set-up, thickness model and its
search, orientation corrections, frame scales, UB and cell, memory plan). They share the
structure: the fractional positions, ADPs and occupancies of one :class:`~edkit.crystal.Crystal`.

**One loss.** With objective "jana" every dataset's frames add to one weighted sum, so the joint
loss is wR = sqrt(Σ_d N_d / Σ_d D_d) (N_d = Σ w (F_o − k_f F_c)² over dataset d's scored
reflections, D_d = Σ w F_o²): split one dataset into two and the loss is the same. Each step
streams every dataset's frames through the same core, takes the loss's derivative with respect to
every parameter, **sums the structure's gradient over the datasets**, and lets each dataset's
Adam apply it. The structure's Adam moments then see the same gradients in every dataset, so
the datasets' copies of the structure stay identical (checked after every step).

The least squares (``refine_structure``) and the s.u.'s sum the datasets' normal equations over
the shared structural coefficients: JᵀJ = Σ_d J_dᵀJ_d, GoF over every dataset's residuals.
"""

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import xarray as xr
from tqdm.auto import tqdm

from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.precision import x64
from edkit.refine import core, joint_checkpoint, kinematic, lm, results
from edkit.refine.convergence import Convergence
from edkit.refine.objective import loss_from_sums
from edkit.refine.options import GROUPS, STRUCTURE_GROUPS, options_from
from edkit.refine.refinement import Refinement

__all__ = ["JointRefinement"]


@jax.jit
def _apply(state: core.RefineState, problem: Any, grads: Any) -> core.RefineState:
    updates, opt_state = problem.optimizer.update(grads, state.opt_state, state.params)
    return core.RefineState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)


def _shared(labels: Any, grads: list[Any]) -> list[Any]:
    """Each dataset's gradient with its structure leaves replaced by their sum over datasets
    (the other leaves, per frame, differ in shape between datasets and stay their own)."""
    names = jax.tree.leaves(labels)
    leaves = [jax.tree.leaves(g) for g in grads]
    summed = [
        sum(own[i] for own in leaves) if name in STRUCTURE_GROUPS else None
        for i, name in enumerate(names)
    ]
    return [
        jax.tree.unflatten(jax.tree.structure(g),
                           [own[i] if summed[i] is None else summed[i] for i in range(len(own))])
        for g, own in zip(grads, leaves, strict=True)
    ]  # fmt: skip


class JointRefinement:
    """A refinement of one structure against several datasets (module docstring).

    Args:
      crystal: the starting structure (shared).
      datasets: two or more ``read_pets`` datasets (each may have its own cell and UB).
      names: a name per dataset for reports (default: each one's source file).
      progress: progress bars while each dataset is set up (None: where someone watches).
      **options: :class:`~edkit.refine.options.RefinementOptions` for every dataset
        (``restraints`` act once, through the first dataset).

    Attributes:
      members: one :class:`Refinement` per dataset.
      names: the datasets' names.
      step_count, best_loss, best_step, messages, stop_reason: as :class:`Refinement`'s.
    """

    def __init__(
        self,
        crystal: Crystal,
        datasets: Sequence[xr.Dataset],
        *,
        names: Sequence[str] | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> None:
        datasets = list(datasets)
        if len(datasets) < 2:
            raise EdkitError(
                f"JointRefinement needs two or more datasets, got {len(datasets)} "
                "(use edkit.Refinement for one)"
            )
        options = kinematic.joint_member_options(options)
        opts = options_from(**options)
        if opts.objective != "jana":
            raise EdkitError(f"a joint refinement needs objective='jana', not {opts.objective!r}")
        self.names = [
            str(n) for n in (names or [d.attrs.get("source_file", f"dataset {k + 1}")
                                       for k, d in enumerate(datasets)])
        ]  # fmt: skip
        own = {**options, "restraints": ()}  # restraints act once, through the first dataset
        if len(self.names) != len(datasets):
            raise EdkitError(f"{len(self.names)} names for {len(datasets)} datasets")
        self.members = [
            Refinement(crystal, d, progress=progress, **(options if k == 0 else own))
            for k, d in enumerate(datasets)
        ]
        self.options = self.members[0].options
        self.step_count, self.best_loss, self.best_step = 0, math.inf, 0
        self.best_states = [m.state for m in self.members]
        self.messages: list[str] = []
        self.stop_reason = ""
        self._losses: list[float] = []
        self._records: list[dict[str, Any]] = []
        self._labels = core.group_labels(self.members[0].state)
        #: The latest :meth:`uncertainties` with "steps" (``step_count`` then); None before.
        self.last_uncertainties: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------------------ controls
    # What a panel reads and sets (the same names as Refinement's): the structure's settings
    # are those of the first dataset, and a change applies to every dataset.
    @property
    def base_learning_rates(self) -> dict[str, float]:
        """Each group's base learning rate (the same in every dataset)."""
        return self.members[0].base_learning_rates

    @property
    def enabled(self) -> dict[str, bool]:
        """Which groups are refined (the same in every dataset)."""
        return self.members[0].enabled

    @property
    def start_crystal(self) -> Crystal:
        """The starting structure."""
        return self.members[0].start_crystal

    @property
    def mapping(self) -> Any:
        """The structure's free coefficients (the first dataset's ``mapping``)."""
        return self.members[0].mapping

    def set_learning_rate(self, group: str, rate: float) -> None:
        """Change a group's base learning rate in every dataset (next step, no recompile)."""
        for member in self.members:
            member.set_learning_rate(group, rate)

    def set_enabled(self, group: str, enabled: bool) -> None:
        """Switch a parameter group on or off in every dataset (next step, no recompile)."""
        for member in self.members:
            member.set_enabled(group, enabled)

    # ------------------------------------------------------------------------------ steps
    @x64
    def step(self, n: int = 1) -> dict[str, float]:
        """Take ``n`` joint steps; returns the last one's figures (joint loss and per dataset)."""
        record: dict[str, float] = {}
        for _ in range(n):
            record = self._one_step()
        return record

    @x64
    def _one_step(self) -> dict[str, float]:
        start = time.perf_counter()
        sums, cotangents, i_calcs = [], [], []
        for member in self.members:
            core.set_learning_rates(member.opt_state, member._rates())
            train, _, i_calc, cotangent = core.accumulate(member.problem, member.state)
            sums.append(train + core.restraint_value(member.state, member.problem))
            cotangents.append(cotangent)
            i_calcs.append(np.asarray(i_calc))
        denominator = sum(m.problem.train_denominator for m in self.members)
        loss, factor = loss_from_sums(self.options.objective, sum(sums), denominator)
        penalties, grads = [], []
        for member, cotangent in zip(self.members, cotangents, strict=True):
            penalty, grad = core.parameter_gradient(member.state, member.problem, cotangent, factor)
            penalties.append(float(penalty))
            grads.append(grad)
        loss_value = float(loss) + penalties[0]  # one structure: its ADP penalty counts once
        if penalties[0] > 0:  # ... and so does its gradient, which every dataset added
            extra = jax.grad(core.penalty_of)(self.members[0].state, self.members[0].problem)
            grads[0] = jax.tree.map(lambda g, p: g - (len(grads) - 1) * p, grads[0], extra)
        finite = math.isfinite(loss_value) and all(
            bool(np.all(np.isfinite(leaf))) for g in grads for leaf in jax.tree.leaves(g)
        )
        if not finite or (
            math.isfinite(self.best_loss)
            and loss_value > self.options.divergence_factor * self.best_loss
        ):
            return self._diverged(loss_value)
        if loss_value < self.best_loss:
            self.best_loss, self.best_step = loss_value, self.step_count
            self.best_states = [m.state for m in self.members]
        shared = _shared(self._labels, grads)
        for member, grad, i_calc, total in zip(self.members, shared, i_calcs, sums, strict=True):
            member_loss = float(np.sqrt(float(total) / member.problem.train_denominator))
            member._record(member_loss, float("nan"), i_calc)
            member._core_state = _apply(member._core_state, member.problem, grad)
            member.step_count += 1
            member.seconds += (time.perf_counter() - start) / len(self.members)
        self._check_shared()
        self._losses.append(loss_value)
        record: dict[str, Any] = {
            "step": self.step_count,
            "loss": loss_value,
            "validation_loss": float("nan"),
            **results.figures(*self._stacked(i_calcs)),
            "seconds": sum(m.seconds for m in self.members),
        }
        self._records.append(record)
        self.step_count += 1
        for k, member in enumerate(self.members):
            record[f"r_obs_{k}"] = float(member._records[-1]["r_obs"])
        return {k: float(v) for k, v in record.items() if np.ndim(v) == 0}

    def _stacked(
        self, i_calcs: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """:func:`edkit.refine.results.figures`' arguments over every dataset's reflections,
        frames numbered on after each other (and no parameter count)."""
        frames, offset = [], 0
        for member in self.members:
            frames.append(member.setup.refl_frame + offset)
            offset += member.setup.n_frames
        return (
            np.concatenate([m.i_obs for m in self.members]),
            np.concatenate([m.sigma for m in self.members]),
            np.concatenate(i_calcs),
            np.concatenate([m.train_mask for m in self.members]),
            np.concatenate(frames),
            offset,
        )

    @property
    def history(self) -> xr.Dataset:
        """Per-step figures over ``step``: the joint ones (loss and every dataset's reflections
        together), each dataset's own as ``<name>_by_dataset`` over (``dataset``, ``step``), and
        the shared structure's ``fract`` and ``ueq``. Each dataset's full history (thickness
        per frame included) is ``members[k].history``."""
        return results.joint_history_dataset(
            self._records, self.names, [m.history for m in self.members]
        )

    def _check_shared(self) -> None:
        """The datasets' structure copies must agree (same gradients, same Adam)."""
        first = self.members[0].state
        for member in self.members[1:]:
            for label, a, b in zip(jax.tree.leaves(self._labels), jax.tree.leaves(first),
                                   jax.tree.leaves(member.state), strict=True):  # fmt: skip
                if label in STRUCTURE_GROUPS and not np.allclose(a, b, rtol=0, atol=1e-12):
                    raise EdkitError(
                        f"joint refinement: the datasets' {label} parameters parted (an "
                        "internal error: their Adam states differ)"
                    )

    def _diverged(self, loss: float) -> dict[str, float]:
        message = (
            f"step {self.step_count}: the joint refinement diverged (loss {loss:.4g}, best "
            f"{self.best_loss:.4g} at step {self.best_step}); returned to the best state and "
            "halved every learning rate"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.messages.append(message)
        for member, best in zip(self.members, self.best_states, strict=True):
            for group in GROUPS:
                member.base_learning_rates[group] *= 0.5
            member._core_state = core.init(best, member.problem)
            member.step_count += 1
        self.step_count += 1
        return {"loss": loss, "diverged": 1.0}

    @x64
    def run(
        self,
        steps: int,
        callback: Callable[["JointRefinement", dict[str, float]], Any] | None = None,
        *,
        progress: bool = True,
        until_converged: Convergence | bool = False,
        since: int | None = None,
    ) -> "JointRefinement":
        """Up to ``steps`` joint steps, ``callback(self, record)`` after each (``False`` stops);
        stop early when converged, as :meth:`Refinement.run`, judged on the joint losses from
        index ``since`` (default: this call's first step)."""
        rule = Convergence() if until_converged is True else until_converged or None
        since = len(self._losses) if since is None else since
        self.stop_reason = f"{steps} step(s) done"
        bar = tqdm(range(steps), desc="joint", unit="step", disable=not progress, leave=True)
        for _ in bar:
            record = self._one_step()
            bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
            reason = rule.reason(self._losses[since:]) if rule else None
            if reason is not None:
                self.stop_reason = f"step {self.step_count}: {reason}"
                self.messages.append(self.stop_reason)
                break
            if callback is not None and callback(self, record) is False:
                self.stop_reason = f"step {self.step_count}: stopped"
                break
        return self

    def save(self, path: str | Path) -> Path:
        """Save into ``path`` to continue exactly (:mod:`edkit.refine.joint_checkpoint`)."""
        return joint_checkpoint.save_joint(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "JointRefinement":
        """Continue a joint refinement saved with :meth:`save` (the same next step)."""
        return joint_checkpoint.load_joint(cls, Path(path))

    def use_best(self) -> None:
        """Every dataset back to the state of the lowest joint loss."""
        for member, best in zip(self.members, self.best_states, strict=True):
            member.state = best

    # ------------------------------------------------------------------------------ least squares
    def _least_squares(self) -> list[lm.StructureLeastSquares]:
        return [m._structure_least_squares() for m in self.members]

    def _normal_equations(self) -> lm.NormalEquations:
        """Σ_d of the datasets' normal equations over the shared structural coefficients."""
        pairs = zip(self._least_squares(), self.members, strict=True)
        parts = [ls.normal_equations(m.state) for ls, m in pairs]
        return lm.NormalEquations(
            np.sum([p.normal for p in parts], axis=0), np.sum([p.gradient for p in parts], axis=0),
            float(sum(p.cost for p in parts)), int(sum(p.n_residuals for p in parts)),
        )  # fmt: skip

    @x64
    def refine_structure(self, iterations: int = 3) -> list[float]:
        """Gauss–Newton polish of the shared structure on every dataset together (each
        dataset's thickness, orientations and scales held): up to ``iterations`` shifts, each
        kept only if the summed cost falls. Returns the cost after each accepted shift."""
        least_squares = self._least_squares()
        costs: list[float] = []
        cost = float(sum(ls.cost(m.state) for ls, m in zip(least_squares, self.members,
                                                            strict=True)))  # fmt: skip
        damping = 1e-3
        for _ in range(iterations):
            equations = self._normal_equations()
            normal, gradient = equations.normal, equations.gradient
            lhs = normal + damping * np.diag(np.maximum(np.diag(normal), 1e-12))
            shift = -np.linalg.solve(lhs, gradient)
            trials = [ls.shift(m.state, shift) for ls, m in zip(least_squares, self.members,
                                                                 strict=True)]  # fmt: skip
            trial_cost = float(sum(ls.cost(t) for ls, t in zip(least_squares, trials,
                                                                strict=True)))  # fmt: skip
            if not (np.isfinite(trial_cost) and trial_cost < cost):
                break
            for member, trial in zip(self.members, trials, strict=True):
                member.state = trial
                member._core_state = core.init(trial, member.problem)  # fresh Adam moments
            cost = trial_cost
            costs.append(cost)
        self.messages.append(f"joint least squares: {len(costs)} shift(s), cost {cost:.6g}")
        return costs

    @x64
    def uncertainties(self, *, nuisance: bool = True) -> dict[str, np.ndarray]:
        """s.u.'s of the shared structure (Jana's convention, scaled by GoF²): "fract" (n, 3),
        "u_cif" (n, 3, 3) Å², "occupancy" (n,), "gof".

        With ``nuisance`` (the default) from the joint full normal matrix: every dataset's
        thickness, orientations, κ and scales refined too, each dataset's eliminated on its own
        and the structural blocks summed (:func:`edkit.refine.covariance.solve_joint`), the GoF
        over every residual with every parameter counted once. Without: the structure-only
        normal matrix Σ_d J_dᵀJ_d (the matrix of :meth:`refine_structure`). Also kept as
        ``last_uncertainties`` with "steps"."""
        from edkit.crystal import adp_matrix
        from edkit.refine.covariance import solve_joint
        from edkit.refine.least_squares import structural_uncertainties

        if nuisance:
            solvers = [m.full_least_squares() for m in self.members]
            parts = [(s.sums(m.state), s.layout) for s, m in zip(solvers, self.members,
                                                                 strict=True)]  # fmt: skip
            full = solve_joint(parts, sum(s.n_residuals for s in solvers))
            result = structural_uncertainties(self.mapping, full, solvers[0].layout)
        else:
            least_squares = self._least_squares()[0]
            cov, gof = lm.covariance(self._normal_equations(), least_squares.n_free)
            fract_su, u_su = lm.standard_uncertainties(
                self.mapping, least_squares.pos_mask, least_squares.adp_mask, cov
            )
            n_atoms = len(self.crystal.labels)
            result = {"fract": fract_su, "u_cif": adp_matrix(u_su),
                      "occupancy": np.zeros(n_atoms), "gof": np.asarray(gof)}  # fmt: skip
        self.last_uncertainties = {**result, "steps": np.asarray(self.step_count)}
        return result

    def panel(self, run_steps: int = 20) -> Any:
        """The joint refinement's dashboard in Jupyter (``edkit.widgets.JointDashboard``):
        the controls, curves and parameter table over every dataset, each dataset's figures
        and thickness in tabs of their own."""
        from edkit.widgets.joint_dashboard import JointDashboard

        return JointDashboard(self, run_steps=run_steps)

    # ------------------------------------------------------------------------------ results
    @property
    def crystal(self) -> Crystal:
        """The refined structure (the same in every dataset)."""
        return self.members[0].crystal

    @x64
    def report(self) -> dict[str, Any]:
        """Figures of merit over every dataset together, and per dataset under "datasets"
        (each :meth:`Refinement.report` with its "name")."""
        parts = [m.report() for m in self.members]
        stacked = self._stacked([m.predict() for m in self.members])
        total = results.figures(*stacked, self.members[0].n_parameters)
        return {
            **total,
            "n_frames": stacked[-1],
            "steps": self.step_count,
            "datasets": [{"name": n, **p} for n, p in zip(self.names, parts, strict=True)],
        }

    def parameter_counts(self) -> dict[str, int]:
        """Every refined parameter by group: the shared structure's once, each dataset's
        scales, thickness, orientations and κ added over the datasets
        (:meth:`Refinement.parameter_counts` of each)."""
        counts: dict[str, int] = {}
        for k, member in enumerate(self.members):
            for group, n in member.parameter_counts().items():
                if k == 0 or group not in STRUCTURE_GROUPS:
                    counts[group] = counts.get(group, 0) + n
        return counts

    def write_cif(self, path: str | Path, *, with_uncertainties: bool = True) -> None:
        """The refined structure with the joint s.u.'s (:meth:`uncertainties`) and the joint
        figures of merit: R's over every dataset's reflections, every refined parameter
        counted (:meth:`parameter_counts`), the GoF of the joint full normal matrix."""
        from edkit.io.cif import write_cif

        sigmas, gof = None, None
        if with_uncertainties:
            su = self.uncertainties()
            sigmas = {"fract": su["fract"], "u_cif": su["u_cif"], "occupancy": su["occupancy"]}
            gof = round(float(su["gof"]), 4)
        items = results.joint_cif_items(
            self.report(), float(self.members[0].dataset["wavelength"]),
            sum(self.parameter_counts().values()), gof, [Path(n).name for n in self.names],
        )  # fmt: skip
        write_cif(self.crystal, path, sigmas=sigmas, extra=items)
