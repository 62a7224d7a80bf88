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
from edkit.io.cif import write_cif
from edkit.models.hybrid import HybridModel
from edkit.models.parameters import structure_mapping
from edkit.models.thickness import (
    FrameFeatures,
    check_finite,
    fit_to_thickness,
    frame_features,
    make_thickness_model,
)
from edkit.physics.geometry import frame_orientations
from edkit.physics.rocking import LAB_BEAM
from edkit.physics.structure import structure_tables
from edkit.precision import x64
from edkit.refine import checkpoint, core, lm
from edkit.refine.options import (
    DEFAULT_LEARNING_RATES,
    GROUPS,
    RefinementOptions,
    options_from,
    parse_memory,
)
from edkit.refine.planner import MemoryPlan, plan_memory
from edkit.refine.problem import build_problem
from edkit.refine.results import figures, history_dataset
from edkit.simulate.frames import FrameSetup, build_frame_setup, frame_comparison, thickness_search
from edkit.simulate.stack import stack_config


class Refinement:
    """A 3D-ED dynamical refinement with a hybrid physics + network model.

    Example::

        crystal = edkit.read_cif("quartz_kinematical.cif")
        data = edkit.read_pets("quartz_experimental.cif_pets")
        refinement = edkit.Refinement(crystal, data, thickness="profile-net")
        refinement.run(100)
        refinement.write_cif("refined.cif")

    Args:
      crystal: the starting structure; its cell must match the dataset's within 1 %.
      dataset: from :func:`edkit.read_pets`.
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

    @x64
    def __init__(self, crystal: Crystal, dataset: xr.Dataset, **options: Any) -> None:
        if isinstance(options.get("memory_limit"), str):
            options["memory_limit"] = parse_memory(options["memory_limit"])
        self._set_up(crystal, dataset, options_from(**options), None)

    @x64
    def _set_up(
        self,
        crystal: Crystal,
        dataset: xr.Dataset,
        options: RefinementOptions,
        initial_thickness: np.ndarray | None,
    ) -> None:
        """Everything fixed, in one place for a new refinement and a loaded checkpoint."""
        self.options, self.start_crystal, self.dataset = options, crystal, dataset
        opts = options
        self.setup: FrameSetup = build_frame_setup(
            crystal, dataset, g_max=opts.g_max, sg_max=opts.sg_max, n_sub=opts.n_sub,
            sg_weak=opts.sg_weak, bethe_terms=opts.bethe_terms,
        )  # fmt: skip
        if not self.setup.scored.any():
            raise EdkitError(
                f"no reflection of {dataset.attrs.get('source_file', 'the dataset')} is "
                "scored (Klar selection); check g_max, the orientation matrix and the cell"
            )
        self.mapping = structure_mapping(crystal, riding=opts.riding)
        self.memory_plan: MemoryPlan = plan_memory(
            self.setup, n_t=2, precision=opts.precision, remat=opts.remat,
            chunk_frames=opts.chunk_frames, batch_size=opts.batch_size,
            memory_limit=opts.memory_limit,
            n_parameters=int(self.mapping.position_mask.sum() + self.mapping.adp_mask.sum()),
            devices=opts.devices,
        )  # fmt: skip
        self.features = _features(dataset, self.setup)
        self._init_data_arrays()
        self.thickness_search_result: xr.Dataset | None = None
        if initial_thickness is None:
            initial_thickness = self._grid_search_thickness()
        self.initial_thickness = np.asarray(initial_thickness, dtype=np.float64)
        model = self._build_model(self.initial_thickness)
        self.graphdef, params = nnx.split(model, nnx.Param)
        rates = {**DEFAULT_LEARNING_RATES, **opts.learning_rates}
        self.base_learning_rates = {g: float(rates[g]) for g in GROUPS}
        self.enabled = {g: g in opts.refine for g in GROUPS}
        plan = self.memory_plan
        self.problem = build_problem(
            self.setup, self.i_obs, self.sigma, self.train_mask, self.validation_mask,
            tables=structure_tables(crystal), features=self.features, mapping=self.mapping,
            graphdef=self.graphdef,
            optimizer=core.make_optimizer(params, GROUPS, self.base_learning_rates,
                                          opts.decay_steps),
            config=stack_config(
                self.setup, opts.absorption is not None, "eig",
                jnp.complex64 if opts.precision == "single" else None, opts.batch_size,
                plan.remat, opts.devices,
            ),
            objective=opts.objective, chunk_frames=plan.chunk_frames,
        )  # fmt: skip
        self._core_state = core.init(params, self.problem)
        self.step_count = 0
        self.seconds = 0.0
        self.best_state = params
        self.best_step = 0
        self.best_loss = math.inf
        self.messages: list[str] = []
        #: The latest :meth:`uncertainties` with "steps" (``step_count`` then); None before.
        self.last_uncertainties: dict[str, np.ndarray] | None = None
        self._records: list[dict[str, Any]] = []
        self._least_squares: lm.StructureLeastSquares | None = None

    # ------------------------------------------------------------------------------ set-up
    def _init_data_arrays(self) -> None:
        setup, ds = self.setup, self.dataset
        self.i_obs = np.asarray(ds["I_obs"].values, dtype=np.float64)
        self.sigma = np.asarray(ds["sigma"].values, dtype=np.float64)
        validation = np.zeros(setup.n_frames, dtype=bool)
        if self.options.validation_fraction > 0:
            every = max(2, round(1.0 / self.options.validation_fraction))
            validation[every // 2 :: every] = True
        self.validation_frames = validation
        scored = setup.scored & (self.sigma > 0)
        self.train_mask = scored & ~validation[setup.refl_frame]
        self.validation_mask = scored & validation[setup.refl_frame]

    def _grid_search_thickness(self) -> np.ndarray:
        start, stop, step = self.options.thickness_grid
        grid = np.arange(start, stop + 0.5 * step, step)
        search = thickness_search(
            self.start_crystal, self.dataset, grid, setup=self.setup,
            chunk_frames=self.memory_plan.chunk_frames,
        )  # fmt: skip
        self.thickness_search_result = search
        best = search["thickness_best"].values
        if not np.isfinite(best).any():
            raise EdkitError("the thickness grid search found no frame with observed reflections")
        return np.where(np.isfinite(best), best, np.nanmedian(best))

    def _build_model(self, initial: np.ndarray) -> HybridModel:
        opts = self.options
        thickness = make_thickness_model(
            opts.thickness, n_frames=self.setup.n_frames, features=self.features,
            initial=float(np.median(initial)), rngs=nnx.Rngs(opts.seed),
        )  # fmt: skip
        if self.thickness_search_result is not None:
            # Initialise the network near what the grid search found (science.md §6).
            finite = np.isfinite(self.thickness_search_result["thickness_best"].values)
            fit_to_thickness(thickness, self.features, jnp.asarray(initial), jnp.asarray(finite))
        model = HybridModel(
            self.mapping.fract0.shape[0], self.setup.n_frames, thickness,
            absorption=opts.absorption,
        )  # fmt: skip
        values, weights = thickness(self.features)
        if not check_finite(values, weights):
            raise EdkitError(f"the {opts.thickness!r} thickness model produced non-finite values")
        return model

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

    def _rates(self) -> dict[str, float]:
        return {g: self.base_learning_rates[g] if self.enabled[g] else 0.0 for g in GROUPS}

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
            math.isfinite(self.best_loss) and loss > self.options.divergence_factor * self.best_loss
        ):
            return self._diverged(loss, finite)
        record = self._record(loss, val, i_calc)
        if selection_loss < self.best_loss:
            self.best_loss, self.best_state, self.best_step = (
                selection_loss,
                self.state,
                self.step_count,
            )
        self._core_state = new_state
        self.step_count += 1
        return record

    def _diverged(self, loss: float, finite: bool) -> dict[str, float]:
        what = "a non-finite gradient" if finite is False and math.isfinite(loss) else "diverged"
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
        return {"loss": loss, "diverged": 1.0}

    def _record(self, loss: float, val: float, i_calc: np.ndarray) -> dict[str, float]:
        model = self.model
        with jax.enable_x64(True):
            fract = np.asarray(model.structure(self.mapping).fract)
            values, weights = model.thickness(self.features)
            u_cif = np.asarray(self.mapping.u_cif(model.adp[...]))
        record: dict[str, Any] = {
            "step": self.step_count,
            "loss": loss,
            "validation_loss": val,
            **self._figures(i_calc),
            "fract": fract,
            "ueq": ueq(adp_matrix(u_cif), self.mapping.real_basis),
            "thickness": np.asarray(jnp.sum(values * weights, axis=1)),
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
    ) -> "Refinement":
        """Run ``steps`` steps with a progress bar; ``callback(self, record)`` after each.

        A callback returning ``False`` stops the run. Returns ``self``.
        """
        bar = tqdm(range(steps), desc="refining", disable=not progress, leave=True)
        for _ in bar:
            record = self._one_step()
            if "r_obs" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", R_obs=f"{record['r_obs']:.4f}")
            if callback is not None and callback(self, record) is False:
                break
        return self

    def panel(self, **options: Any) -> Any:
        """Deprecated: use ``edkit.widgets.RefinementPanel(refinement, **options)``.

        (The refinement layer does not import the widgets above it; this shim stays for
        existing notebooks and will be removed in a later release.)
        """
        warnings.warn(
            "Refinement.panel() is deprecated; use edkit.widgets.RefinementPanel(refinement)",
            DeprecationWarning,
            stacklevel=2,
        )
        from edkit.widgets.refinement_panel import RefinementPanel  # deprecated shim, lazily

        return RefinementPanel(self, **options)

    # ------------------------------------------------------------------------------ results
    @property
    def model(self) -> HybridModel:
        """The current model (a fresh NNX module view of the current state)."""
        return nnx.merge(self.graphdef, self.state)

    def use_best(self) -> None:
        """Make the best state (lowest loss seen, or validation loss) the current one."""
        self.state = self.best_state

    @property
    def history(self) -> xr.Dataset:
        """Per-step figures and parameters as an xarray Dataset over ``step``."""
        return history_dataset(
            self._records,
            tuple(self.mapping.labels),
            self.setup.frame,
            {
                "objective": self.options.objective,
                "r_convention": "r_obs, wr_*: Jana2020 on |F| over scored reflections; "
                "r_obs_mean_frame: diffBloch mean of per-frame R_obs",
                "best_step": self.best_step,
                "messages": "\n".join(self.messages),
            },
        )

    @property
    @x64
    def crystal(self) -> Crystal:
        """The refined crystal (current state)."""
        model = self.model
        with jax.enable_x64(True):
            return self.mapping.crystal(
                self.start_crystal, model.positions[...], model.adp[...], model.occupancy[...]
            )

    @property
    @x64
    def thickness(self) -> xr.DataArray:
        """Mean thickness per frame (Å), with the spread and the grid-search values as coords."""
        with jax.enable_x64(True):
            values, weights = map(np.asarray, self.model.thickness(self.features))
        mean = np.sum(values * weights, axis=1)
        spread = np.sqrt(np.maximum(np.sum(weights * (values - mean[:, None]) ** 2, axis=1), 0))
        return xr.DataArray(
            mean,
            dims=("frame",),
            coords={
                "frame": self.setup.frame,
                "alpha": ("frame", np.asarray(self.features.alpha), {"units": "degree"}),
                "spread": ("frame", spread, {"units": "angstrom"}),
                "grid_search": ("frame", self.initial_thickness, {"units": "angstrom"}),
            },
            name="thickness",
            attrs={"units": "angstrom", "long_name": "mean thickness",
                   "model": self.options.thickness},
        )  # fmt: skip

    @x64
    def thickness_map(self, resolution: int = 32) -> xr.DataArray | None:
        """The learned thickness map h(x, y) (Å) for the "map-net" model, else None."""
        thickness = self.model.thickness
        if not hasattr(thickness, "thickness_map"):
            return None
        with jax.enable_x64(True):
            x, y, h = thickness.thickness_map(resolution)
        return xr.DataArray(
            np.asarray(h),
            dims=("y", "x"),
            coords={"x": np.asarray(x)[0] if np.ndim(x) == 2 else np.asarray(x),
                    "y": np.asarray(y)[:, 0] if np.ndim(y) == 2 else np.asarray(y)},
            name="thickness_map",
            attrs={"units": "angstrom", "long_name": "thickness along the platelet normal"},
        )  # fmt: skip

    @x64
    def predict(self) -> np.ndarray:
        """I_calc (unscaled) of every reflection for the current state, (n_refl,); streamed."""
        return core.predict(self.state, self.problem)

    @x64
    def simulated(self) -> xr.Dataset:
        """Observed vs calculated intensities of the current state (``frame_comparison``)."""
        i_calc = self.predict()
        with jax.enable_x64(True):
            values, weights = self.model.thickness(self.features)
        result = frame_comparison(
            self.setup, self.dataset, i_calc, np.asarray(values), np.asarray(weights)
        )
        for name in ("I_obs", "sigma", "h", "k", "l", "frame_id"):
            result[name] = self.dataset[name]
        return result

    @x64
    def report(self) -> dict[str, Any]:
        """Figures of merit of the current state (fractions, not %), with their conventions."""
        # Jana's GoF: sqrt(Σw(ΔF)²/(N_obs − N_par)) with the refined structural parameters.
        return {
            **self._figures(self.predict(), n_params=self.n_parameters),
            "n_frames": self.setup.n_frames,
            "n_parameters": self.n_parameters,
            "steps": self.step_count,
            "seconds": round(self.seconds, 3),
            "thickness": [float(t) for t in self.thickness.values],
            "memory_plan": self.memory_plan.describe(),
            "conventions": "r_obs, r_all, wr_obs, wr_all, gof: Jana2020 on |F| (I > 3σ for obs) "
            "over Klar-scored reflections; r_obs_mean_frame: diffBloch mean per-frame R_obs",
        }

    @property
    def n_parameters(self) -> int:
        """Number of refined structural parameters (free position and ADP coefficients)."""
        pos_mask, adp_mask = lm.free_masks(self.mapping, self.enabled)
        return int(pos_mask.sum() + adp_mask.sum())

    # ------------------------------------------------------------------------------ s.u.'s
    def _structure_least_squares(self) -> lm.StructureLeastSquares:
        if self._least_squares is None:
            pos_mask, adp_mask = lm.free_masks(self.mapping, self.enabled)
            self._least_squares = lm.StructureLeastSquares(self.problem, pos_mask, adp_mask)
        return self._least_squares

    @x64
    def refine_structure(
        self, iterations: int = 5, *, damping: float = 1e-3, tolerance: float = 1e-6
    ) -> list[float]:
        """Levenberg–Marquardt on the structural parameters (positions, ADPs), thickness held.

        The crystallographer's least squares on Jana's weighted |F| residuals: each iteration
        solves (JᵀJ + λ diag JᵀJ) δ = −Jᵀr with JᵀJ accumulated chunk by chunk of frames from
        JAX derivatives (no finite differences, never the full Jacobian), accepts the shift if
        wR drops and adapts λ. Returns the wR after each iteration.
        """
        least_squares = self._structure_least_squares()
        start = time.perf_counter()
        denominator = self.problem.train_denominator
        params, costs, cost = lm.levenberg_marquardt(
            least_squares, self.state, iterations, damping=damping, tolerance=tolerance
        )
        self.state = params
        self.seconds += time.perf_counter() - start
        wr_history = [float(np.sqrt(c / denominator)) for c in costs]
        record = self._record(float(np.sqrt(cost / denominator)), float("nan"), self.predict())
        self.best_loss, self.best_state, self.best_step = record["loss"], params, self.step_count
        self.step_count += 1
        self.messages.append(
            f"step {record['step']}: Levenberg–Marquardt, {len(wr_history)} iteration(s), "
            f"wR {wr_history[-1] if wr_history else float('nan'):.5f}"
        )
        return wr_history

    @x64
    def uncertainties(self) -> dict[str, np.ndarray]:
        """Standard uncertainties of fractional coordinates and U^cif from the Gauss–Newton
        matrix JᵀWJ at the current state (Jana convention: scaled by the GoF), accumulated
        chunk by chunk of frames.

        Returns:
          {"fract": (n, 3), "u_cif": (n, 3, 3), "gof": ()}; zero where a parameter is fixed.
          Also kept as ``last_uncertainties`` with "steps" (``step_count`` when computed).
        """
        least_squares = self._structure_least_squares()
        cov, gof = lm.covariance(least_squares.normal_equations(self.state), least_squares.n_free)
        pos_mask, adp_mask = least_squares.pos_mask, least_squares.adp_mask
        n_pos = int(pos_mask.sum())
        n_atoms = self.mapping.fract0.shape[0]
        fract_su, u_su = np.zeros((n_atoms, 3)), np.zeros((n_atoms, 6))
        blocks = (
            (pos_mask, cov[:n_pos, :n_pos], self.mapping.position_basis, fract_su),
            (adp_mask, cov[n_pos:, n_pos:], self.mapping.adp_basis, u_su),
        )
        for free, block, basis, out in blocks:
            index = np.argwhere(free)  # (k, 2): atom, coefficient
            for atom in np.unique(index[:, 0]) if len(index) else []:
                rows = np.nonzero(index[:, 0] == atom)[0]
                b = basis[atom][:, index[rows, 1]]
                out[atom] = np.sqrt(np.maximum(np.diag(b @ block[np.ix_(rows, rows)] @ b.T), 0))
        result = {"fract": fract_su, "u_cif": adp_matrix(u_su), "gof": np.asarray(gof)}
        self.last_uncertainties = {**result, "steps": np.asarray(self.step_count)}
        return result

    @x64
    def write_cif(self, path: str | Path, *, with_uncertainties: bool = True) -> None:
        """Write the refined structure with s.u.'s and the figures of merit."""
        sigmas = None
        if with_uncertainties and self.n_parameters > 0:
            su = self.uncertainties()
            sigmas = {"fract": su["fract"], "u_cif": su["u_cif"]}
        report = self.report()
        extra = {
            "_refine_ls_R_factor_gt": round(report["r_obs"], 5),
            "_refine_ls_R_factor_all": round(report["r_all"], 5),
            "_refine_ls_wR_factor_gt": round(report["wr_obs"], 5),
            "_refine_ls_wR_factor_ref": round(report["wr_all"], 5),
            "_refine_ls_goodness_of_fit_ref": round(report["gof"], 4),
            "_refine_ls_number_reflns": report["n_all"],
            "_refine_ls_number_parameters": report["n_parameters"],
            "_refine_special_details": "edkit hybrid Bloch-wave refinement; "
            f"mean per-frame R_obs (diffBloch) {report['r_obs_mean_frame']:.4f}",
        }
        write_cif(self.crystal, path, sigmas=sigmas, extra=extra)

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
            self._set_up(crystal, dataset, options, np.asarray(config["initial_thickness"]))
            checkpoint.restore(self, config, arrays, Path(path))
        return self


def _features(dataset: xr.Dataset, setup: FrameSetup) -> FrameFeatures:
    rotations = frame_orientations(dataset).values
    beams = np.einsum("fji,j->fi", rotations, LAB_BEAM)  # Oᵀ(−z): electrons' direction, crystal
    return frame_features(jnp.asarray(dataset["alpha"].values), jnp.asarray(beams))
