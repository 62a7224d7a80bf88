"""``edkit.Refinement``: joint gradient refinement of structure, orientations and thickness.

A thin Python shell over the pure core (``edkit.refine.core``): it plans memory
(``edkit.refine.planner``) before any heavy work, builds the :class:`~edkit.refine.problem.Problem`
once, calls ``core.step`` and keeps what a user needs around it: history, best state, divergence
handling, live learning rates, checkpoints, least squares and standard uncertainties.
"""

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from flax import nnx
from tqdm.auto import tqdm

from edkit.crystal import Crystal, adp_matrix, ueq
from edkit.errors import EdkitError
from edkit.heap import release_freed_heap
from edkit.models.hybrid import HybridModel
from edkit.models.parameters import StructureMapping
from edkit.models.thickness import FrameFeatures
from edkit.precision import x64
from edkit.refine import checkpoint, core, kinematic, lm, research
from edkit.refine.convergence import MAX_STEPS, Convergence
from edkit.refine.kinematic import KinematicStart
from edkit.refine.least_squares import StructureLeastSquaresMixin
from edkit.refine.options import (
    GROUPS,
    STRUCTURE_GROUPS,
    RefinementOptions,
    options_from,
    parse_memory,
)
from edkit.refine.planner import MemoryPlan
from edkit.refine.prepare import (
    check_inputs,
    check_observations,
    check_problem_data,
    prepare,
    spread_messages,
)
from edkit.refine.problem import Problem
from edkit.refine.results import figures
from edkit.refine.views import RefinementViews
from edkit.simulate.frames import FrameSetup


class Refinement(StructureLeastSquaresMixin, RefinementViews):
    """A 3D-ED dynamical refinement with a hybrid physics + network model.

    Example::

        crystal = edkit.read_cif("quartz_kinematical.cif")
        data = edkit.read_pets("quartz_experimental.cif_pets")
        refinement = edkit.Refinement(crystal, data, thickness="profile-net")
        refinement.run(100)
        refinement.write_cif("refined.cif")

    Args:
      crystal: the starting structure; its cell must match the dataset's within 1 %.
      dataset: from :func:`edkit.read_pets`; a list of several gives a
        :class:`~edkit.refine.joint.JointRefinement` of the one structure against them all.
      **options: the fields of :class:`~edkit.refine.options.RefinementOptions` (each documented
        there with units and default): ``refine`` (groups), ``thickness`` (model), ``absorption``
        (κ), beams (``g_max``, ``sg_max``, ``sg_weak``, ``bethe_terms``, ``n_sub``),
        ``objective``, ``learning_rates``, ``decay_steps``, ``validation_fraction``, ``seed``,
        ``precision``, ``devices``, and memory: ``memory_limit`` (bytes or "8G"; default a safe
        fraction of the available memory), ``chunk_frames`` and ``remat`` (default: chosen by
        the memory planner, see :attr:`memory_plan`).

    Raises:
      EdkitError: an unknown or bad option, a structure that does not match the dataset, or a
        problem whose single frame does not fit the memory budget (before any heavy work).
    """

    # Set by :func:`edkit.refine.prepare.prepare` (see :class:`~edkit.refine.prepare.Prepared`).
    setup: FrameSetup
    mapping: StructureMapping
    memory_plan: MemoryPlan
    features: FrameFeatures
    i_obs: np.ndarray
    sigma: np.ndarray
    validation_frames: np.ndarray
    train_mask: np.ndarray
    validation_mask: np.ndarray
    thickness_search_result: xr.Dataset | None
    initial_thickness: np.ndarray
    graphdef: Any
    base_learning_rates: dict[str, float]
    enabled: dict[str, bool]
    problem: Problem
    start_spread_losses: dict[float, float]
    #: Bars for set-up, search and least squares (None: where someone watches; also on load).
    progress: bool | None = None
    #: What the kinematical start did (:mod:`edkit.refine.kinematic`); None without one.
    kinematic_start: KinematicStart | None = None
    #: Each cycle's :meth:`report` when made by :func:`edkit.refine.cycles.refine_in_cycles`.
    cycle_reports: list[dict[str, Any]] | None = None

    def __new__(cls, crystal: Any = None, dataset: Any = None, **options: Any) -> Any:
        # Several datasets (a list or tuple of them): a joint refinement of one structure.
        if isinstance(dataset, list | tuple):
            from edkit.refine.joint import JointRefinement

            return JointRefinement(crystal, dataset, **options)
        return super().__new__(cls)

    @x64
    def __init__(
        self, crystal: Crystal, dataset: xr.Dataset, *, progress: bool | None = None, **options: Any
    ) -> None:
        if isinstance(options.get("memory_limit"), str):
            options["memory_limit"] = parse_memory(options["memory_limit"])
        self.progress = progress
        opts = options_from(**options)
        if opts.kinematic_start is True:
            check_inputs(crystal, dataset)  # before the fit: a clear error, not a bad fit
            check_observations(dataset)
            self.kinematic_start = kinematic.kinematic_start(crystal, dataset, opts, progress)
        start = self.kinematic_start
        far_off = kinematic.FarOffJudge(opts)  # "auto": stops the set-up after a bad search
        if not self._set_up(crystal if start is None else start.crystal, dataset, opts, far_off):
            start = kinematic.kinematic_start(crystal, dataset, opts, progress, far_off.r_obs)
            self.kinematic_start = start
            self._set_up(start.crystal, dataset, opts)
        if self.kinematic_start is not None:
            self.messages.insert(0, self.kinematic_start.describe())

    @x64
    def _set_up(
        self,
        crystal: Crystal,
        dataset: xr.Dataset,
        options: RefinementOptions,
        stop_after_search: Callable[[xr.Dataset], bool] | None = None,
        initial_thickness: np.ndarray | None = None,
    ) -> bool:
        """Everything fixed, in one place for a new refinement and a loaded checkpoint. False
        (nothing set up) where ``stop_after_search`` stopped it (:func:`prepare`)."""
        self.options, self.start_crystal, self.dataset = options, crystal, dataset
        prepared = prepare(
            crystal, dataset, options, initial_thickness, progress=self.progress,
            stop_after_search=stop_after_search,
        )  # fmt: skip
        if prepared is None:
            return False
        params = prepared.params
        for name, value in vars(prepared).items():
            if name != "params":
                setattr(self, name, value)
        self._core_state = core.init(params, self.problem)
        if prepared.start_i_calc is not None:
            self.remember_i_calc(self.state, prepared.start_i_calc)
        self.step_count, self.seconds = 0, 0.0
        self.best_state, self.best_step, self.best_loss = params, 0, math.inf
        #: The step and loss at which the thickness model last started again (research.py):
        #: warm-up and structure delay count from that step, divergence from that loss.
        self.restart_step, self.restart_loss = 0, 0.0
        #: The step after the last Levenberg–Marquardt round: Adam starts again there with new
        #: moments and the warm-up ramp (the old moments belong to parameters LM has moved).
        self.warmup_step = 0
        self.messages: list[str] = []
        self.messages += spread_messages(self.start_spread_losses)
        #: The latest :meth:`uncertainties` with "steps" (``step_count`` then); None before.
        self.last_uncertainties: dict[str, np.ndarray] | None = None
        self._records: list[dict[str, Any]] = []
        self._least_squares: lm.StructureLeastSquares | None = None
        #: The normal equations last computed, with the state they hold at.
        self._normal_equations: tuple[Any, lm.NormalEquations | None] = (None, None)
        #: The full normal matrix (every refined parameter) last computed, and its solver.
        self._full_normal = None
        self._full_least_squares = None
        #: Why the last :meth:`run` or :meth:`refine_structure` stopped, in words.
        self.stop_reason = ""
        return True

    # ------------------------------------------------------------------------------ state
    @property
    def state(self) -> Any:
        """The current parameters (an ``nnx.State`` of :class:`HybridModel`)."""
        return self._core_state.params

    @state.setter
    def state(self, params: Any) -> None:
        self._core_state = self._core_state._replace(params=params)

    @property
    def opt_state(self) -> Any:
        """The optimiser's state (Adam moments, live learning rates, non-finite counts)."""
        return self._core_state.opt_state

    @opt_state.setter
    def opt_state(self, value: Any) -> None:
        self._core_state = self._core_state._replace(opt_state=value)

    def set_learning_rate(self, group: str, rate: float) -> None:
        """Change a group's base learning rate; takes effect at the next step, no recompile."""
        if group not in GROUPS or not (np.isfinite(rate) and rate >= 0):
            raise EdkitError(f"set_learning_rate({group!r}, {rate!r}): unknown group or bad rate")
        self.base_learning_rates[group] = float(rate)

    def set_enabled(self, group: str, enabled: bool) -> None:
        """Switch a parameter group on or off for the next steps (no recompile)."""
        if group not in GROUPS:
            raise EdkitError(f"unknown parameter group {group!r}; expected one of {GROUPS}")
        self.enabled[group] = bool(enabled)
        self._least_squares = None  # its columns are the enabled groups' coefficients
        self._normal_equations = (None, None)

    def _rates(self) -> dict[str, float]:
        """This step's learning rates: enabled groups only, the structure held for the first
        ``structure_delay`` steps, each group ramped over its first ``warmup_steps`` steps."""
        delay, warmup = self.options.structure_delay, self.options.warmup_steps
        rates = {}
        for group in GROUPS:
            begins = delay if group in STRUCTURE_GROUPS else 0
            # this group's steps before the one now taken (since the last restart)
            taken = self.step_count - self.restart_step - begins
            ramped = min(taken, self.step_count - self.warmup_step)
            if not self.enabled[group] or taken < 0:
                rates[group] = 0.0
            else:
                ramp = min(1.0, (ramped + 1) / warmup) if warmup > 0 else 1.0
                rates[group] = self.base_learning_rates[group] * ramp
        return rates

    # ------------------------------------------------------------------------------ the step
    @x64
    def step(self, n: int = 1) -> dict[str, float]:
        """Take ``n`` optimisation steps; returns the last step's figures."""
        record: dict[str, float] = {}
        for _ in range(n):
            record = self._one_step()
        return record

    @x64
    def _one_step(self) -> dict[str, float]:
        start = time.perf_counter()
        state = self._core_state
        core.set_learning_rates(state.opt_state, self._rates())
        new_state, measured = core.step(state, self.problem)
        loss, val = float(measured.loss), float(measured.validation_loss)
        i_calc = np.asarray(measured.i_calc)
        finite = bool(measured.finite)
        self.seconds += time.perf_counter() - start
        selection_loss = val if self.validation_mask.any() else loss
        if not (finite and math.isfinite(loss) and np.all(np.isfinite(i_calc))) or (
            math.isfinite(self.best_loss)
            and loss > self.options.divergence_factor * max(self.best_loss, self.restart_loss)
        ):
            return self._diverged(loss, finite)
        record = self._record(loss, val, i_calc)
        if selection_loss < self.best_loss:
            self.best_loss, self.best_state = selection_loss, self.state
            self.best_step = self.step_count
            # The step's I_calc is that of the state it started from: a run that ends on its
            # best state reports it without another forward pass.
            self.remember_i_calc(self.state, i_calc)
        self._core_state = new_state
        self.step_count += 1
        return record

    def _diverged(self, loss: float, finite: bool) -> dict[str, float]:
        what = "had a non-finite gradient" if not finite and math.isfinite(loss) else "diverged"
        message = (
            f"step {self.step_count}: the refinement {what} (loss {loss:.4g}, best "
            f"{self.best_loss:.4g} at step {self.best_step}); returned to the best state and "
            "halved every learning rate"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.messages.append(message)
        for group in GROUPS:
            self.base_learning_rates[group] *= 0.5
        self._core_state = core.init(self.best_state, self.problem)
        self.step_count += 1
        if not math.isfinite(loss):
            check_problem_data(self.problem, self.dataset)  # a data fault ends the run
        return {"loss": loss, "diverged": 1.0}

    def _record(self, loss: float, val: float, i_calc: np.ndarray) -> dict[str, float]:
        model = self.model
        # Copies (np.array), not views of JAX arrays: a record must not keep a device buffer
        # alive for the rest of the session (RSS grew ~2–5 MB per 300 steps with views).
        with jax.enable_x64(True):
            fract = np.array(model.structure(self.mapping).fract)
            values, weights = model.thickness(self.features)
            u_cif = np.asarray(self.mapping.u_cif(model.adp[...]))
        record: dict[str, Any] = {
            "step": self.step_count,
            "loss": loss,
            "validation_loss": val,
            **self._figures(i_calc),
            "fract": fract,
            "ueq": ueq(adp_matrix(u_cif), self.mapping.real_basis),
            "thickness": np.array(jnp.sum(values * weights, axis=1)),
            "seconds": self.seconds,
        }
        self._records.append(record)
        return {k: v for k, v in record.items() if np.ndim(v) == 0}

    def _figures(self, i_calc: np.ndarray, n_params: int = 0) -> dict[str, float]:
        return figures(
            self.i_obs, self.sigma, i_calc, self.train_mask, self.setup.refl_frame,
            self.setup.n_frames, n_params,
        )  # fmt: skip

    @x64
    def run(
        self,
        steps: int,
        callback: Callable[["Refinement", dict[str, float]], Any] | None = None,
        *,
        progress: bool = True,
        until_converged: Convergence | bool = False,
        since_step: int | None = None,
    ) -> "Refinement":
        """Run up to ``steps`` steps with a progress bar (steps, time left, last loss and Jana
        R_obs); ``callback(self, record)`` after each, returning ``False`` to stop.

        ``until_converged``: stop early once the best loss has stopped falling (True: the
        default :class:`~edkit.refine.convergence.Convergence`), judged on the steps since
        ``since_step`` (default: this call's first step), the warm-up's (before
        :attr:`settled_step`) not compared with. Why it stopped is in
        :attr:`stop_reason` and :attr:`messages`. Returns ``self``.
        """
        rule = Convergence() if until_converged is True else until_converged or None
        since = self.step_count if since_step is None else since_step
        self.stop_reason = f"{steps} step(s) done"
        bar = tqdm(range(steps), desc="refining", unit="step", disable=not progress, leave=True)
        for _ in bar:
            record = self._one_step()
            shown = {"R_obs": f"{record['r_obs']:.4f}"} if "r_obs" in record else {"diverged": 1}
            # Drawn by the bar's next refresh: one line per step, not two.
            bar.set_postfix(loss=f"{record['loss']:.4g}", **shown, refresh=False)
            if callback is not None and callback(self, record) is False:
                self.stop_reason = f"stopped from outside at step {self.step_count}"
                break
            settle = sum(since <= r["step"] < self.settled_step for r in self._records)
            losses, validation = self._selection_losses(since), bool(self.validation_mask.any())
            reason = rule.reason(losses, settle, validation=validation) if rule else None
            if reason is not None:
                self.stop_reason = f"step {self.step_count}: {reason}"
                self.messages.append(self.stop_reason)
                break
        else:
            if rule is not None and steps > 0:
                self.stop_reason = (
                    f"step {self.step_count}: the step limit was reached before the loss "
                    f"converged ({steps} step(s) in this call)"
                )
                self.messages.append(self.stop_reason)
        release_freed_heap()  # the first step's compiler heap, back to the OS
        return self

    @property
    def settled_step(self) -> int:
        """The first step at which every group runs at its full learning rate: after the last
        (new) start's structure delay and the learning-rate ramp (see :meth:`_rates`)."""
        delay, warmup = self.options.structure_delay, self.options.warmup_steps
        return max(self.restart_step + delay, self.warmup_step) + warmup

    def _selection_losses(self, since_step: int) -> list[float]:
        """The recorded losses the best state is chosen on (validation or training) of the
        steps from ``since_step`` on."""
        key = "validation_loss" if self.validation_mask.any() else "loss"
        return [float(r[key]) for r in self._records if r["step"] >= since_step]

    def fit(
        self,
        max_steps: int = MAX_STEPS,
        lm_iterations: int = 10,
        *,
        progress: bool = True,
        convergence: Convergence | None = None,
        searches: int = 3,
    ) -> "Refinement":
        """The default recipe (what ``edkit refine`` runs without flags): Adam steps until
        converged (at most ``max_steps``; the warm-up options apply) and the best state; then up
        to ``searches`` times the thickness search again from the refined structure, and where
        it disagrees with the refined thickness a new start of the thickness model and Adam
        steps until converged again (:mod:`edkit.refine.research`); then one
        Levenberg–Marquardt round of at most ``lm_iterations`` on the structure (none if no
        position or ADP is refined). Why each stage stopped is in :attr:`messages`. Returns
        ``self``."""
        self.run(max_steps, progress=progress, until_converged=convergence or True)
        self.use_best()
        for _ in range(searches):
            if not self.search_thickness_again(progress=progress):
                break
            self.run(max_steps, progress=progress, until_converged=convergence or True)
            self.use_best()
        if lm_iterations > 0 and self.n_parameters > 0:
            self.refine_structure(lm_iterations)
        return self

    @x64
    def search_thickness_again(self, tolerance: float = 0.10, progress: bool = True) -> bool:
        """The thickness search from the refined structure; where more than 5 % of the frames'
        thickness is off by more than ``tolerance``, the thickness model starts again from it.
        True if it did (see :func:`edkit.refine.research.search_again`)."""
        return research.search_again(self, tolerance=tolerance, progress=progress)

    # ------------------------------------------------------------------------------ results
    @property
    def model(self) -> HybridModel:
        """The current model (a fresh NNX module view of the current state)."""
        return nnx.merge(self.graphdef, self.state)

    def use_best(self) -> None:
        """Make the best state (lowest loss seen, or validation loss) the current one."""
        self.state = self.best_state

    # ------------------------------------------------------------------------------ checkpoints
    @x64
    def save(self, path: str | Path) -> Path:
        """Save everything needed to resume exactly into the folder ``path``."""
        return checkpoint.save(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "Refinement":
        """Resume a refinement saved with :meth:`save` (same next step, bit-identical on CPU)."""
        crystal, dataset, options, config, arrays = checkpoint.read(Path(path))
        self = cls.__new__(cls)
        with jax.enable_x64(True):
            thickness = np.asarray(config["initial_thickness"])
            self._set_up(crystal, dataset, options, initial_thickness=thickness)
            checkpoint.restore(self, config, arrays, Path(path))
        return self
