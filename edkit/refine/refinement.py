"""``edkit.Refinement``: joint gradient refinement of structure, orientations and thickness.

A thin Python shell (history, best state, divergence handling, checkpoints, uncertainties) around
one compiled, pure step ``(state, opt_state) -> (state, opt_state, loss, i_calc)``. Parameter
groups share one optax optimiser (``optax.multi_transform``); each group's learning rate lives in
the optimiser state (``optax.inject_hyperparams``), so changing it never recompiles.
"""

import json
import math
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import xarray as xr
from flax import nnx
from tqdm.auto import tqdm

from edkit import metrics
from edkit.crystal import Crystal, adp_matrix
from edkit.errors import EdkitError
from edkit.io.cif import read_cif, write_cif
from edkit.io.pets import frame_orientations
from edkit.models.hybrid import ForwardContext, HybridModel
from edkit.models.parameters import structure_mapping
from edkit.models.thickness import (
    FrameFeatures,
    check_finite,
    fit_to_thickness,
    frame_features,
    make_thickness_model,
)
from edkit.physics.rocking import LAB_BEAM
from edkit.physics.structure import structure_tables
from edkit.precision import x64
from edkit.simulate.frames import (
    DEFAULT_G_MAX,
    FrameSetup,
    build_frame_setup,
    frame_comparison,
    thickness_search,
)

if TYPE_CHECKING:
    from edkit.widgets.refinement_panel import RefinementPanel

CHECKPOINT_VERSION = 1
GROUPS = ("positions", "adp", "occupancy", "orientation", "absorption", "thickness")
#: Adam step sizes in each group's own units: Å, Å², 1, radians, 1 (κ), network units.
DEFAULT_LEARNING_RATES = {
    "positions": 3e-3,
    "adp": 3e-4,
    "occupancy": 3e-3,
    "orientation": 2e-4,
    "absorption": 3e-3,
    "thickness": 5e-3,
}
#: Refinement beam defaults: beams within 0.005 Å⁻¹ of the Ewald sphere solved exactly, those up
#: to 0.03 Å⁻¹ as Bethe potentials. On real quartz this matches the exact solve of every beam to
#: 0.03 Å⁻¹ (mean per-frame R within 0.01 %, tests/test_bethe.py) with a third fewer beams.
REFINE_SG_MAX = 0.005  # Å⁻¹
REFINE_SG_WEAK = 0.03  # Å⁻¹
#: Chebyshev terms of the Bethe correction shared by a frame's sub-orientations: 12 keep the
#: quartz intensities to 4e-7 of the per-orientation correction (tests/test_bethe.py).
REFINE_BETHE_TERMS = 12
THICKNESS_KINDS = ("constant", "per-frame", "platelet", "wedge", "profile-net", "map-net")


@dataclass
class RefinementOptions:
    """Choices of a refinement (all JSON-serialisable; saved in checkpoints)."""

    refine: tuple[str, ...] = ("positions", "adp", "thickness", "orientation")
    thickness: str = "profile-net"
    absorption: float | None = None
    g_max: float = DEFAULT_G_MAX
    sg_max: float = REFINE_SG_MAX
    sg_weak: float | None = REFINE_SG_WEAK
    bethe_terms: int | None = REFINE_BETHE_TERMS
    n_sub: int | None = None
    objective: str = "jana"
    learning_rates: dict[str, float] = field(default_factory=dict)
    decay_steps: int = 200
    validation_fraction: float = 0.0
    seed: int = 0
    batch_size: int = 8
    thickness_grid: tuple[float, float, float] = (50.0, 2000.0, 25.0)
    riding: bool = True
    divergence_factor: float = 3.0
    precision: str = "double"
    devices: int = 1
    remat: bool | str = False


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
      refine: parameter groups to refine, among "positions", "adp", "occupancy",
        "orientation", "absorption", "thickness".
      thickness: the thickness model: "constant", "per-frame", "platelet", "wedge",
        "profile-net" (the paper's α → (μ, σ) network) or "map-net" (a thickness map).
      absorption: κ of the proportional absorption model U' = κU (None: no absorption).
      g_max, sg_max, n_sub, sg_weak: beam and rocking-curve settings (see
        ``build_frame_setup``; ``sg_weak`` folds beams with sg_max < |S_g| ≤ sg_weak in as
        Bethe potentials). bethe_terms: Chebyshev terms of the Bethe correction shared by a
        frame's sub-orientations (None: built at each one).
      objective: "jana" (wR on |F|, Jana weights) or "wr2" (diffBloch's per-frame intensity wR2).
      learning_rates: per-group Adam step sizes overriding ``DEFAULT_LEARNING_RATES``.
      decay_steps: learning rates decay as 1/(1 + step/decay_steps).
      validation_fraction: fraction of frames held out (every k-th frame); the best state is
        then chosen on their loss.
      seed: initialises the networks.
      devices: shard the frames over this many JAX devices (see ``frame_intensity_stack``).
      precision: "double" (complex128 Bloch solves, default) or "single" (complex64 solves,
        geometry and structure factors still float64; ~1.5× faster, see benchmarks/refine.py).
      remat: gradient memory: False keeps every intermediate (fastest); "eigensystems" keeps
        only the eigendecompositions (large cells: see benchmarks/large.py); True recomputes
        each frame in the backward pass (least memory).
    """

    @x64
    def __init__(self, crystal: Crystal, dataset: xr.Dataset, **options: Any) -> None:
        self.options = _check_options(RefinementOptions(**_tuples(options)))
        self.start_crystal = crystal
        self.dataset = dataset
        opts = self.options
        with jax.enable_x64(True):
            self.setup: FrameSetup = _setup_from(crystal, dataset, opts)
            if not self.setup.scored.any():
                raise EdkitError(
                    f"no reflection of {dataset.attrs.get('source_file', 'the dataset')} is "
                    "scored (Klar selection); check g_max, the orientation matrix and the cell"
                )
            self.mapping = structure_mapping(crystal, riding=opts.riding)
            self.features = _features(dataset, self.setup)
            self.context = ForwardContext(
                mapping=self.mapping,
                tables=structure_tables(crystal),
                setup=self.setup,
                features=self.features,
                batch_size=opts.batch_size,
                solve_dtype=_solve_dtype(opts.precision),
                devices=opts.devices,
                remat=opts.remat,
            )
            self._init_data_arrays()
            self.initial_thickness = self._grid_search_thickness()
            model = self._build_model(self.initial_thickness)
            self.graphdef, self.state = nnx.split(model, nnx.Param)
            self._build_optimizer()
        self.step_count = 0
        self.seconds = 0.0
        self.best_state = self.state
        self.best_step = 0
        self.best_loss = math.inf
        self.messages: list[str] = []
        #: The latest :meth:`uncertainties` with "steps" (``step_count`` then); None before.
        self.last_uncertainties: dict[str, np.ndarray] | None = None
        self._records: list[dict[str, Any]] = []
        self._compiled_step: Callable | None = None
        self._jacobian: Callable | None = None
        self._predict: Callable | None = None

    # ------------------------------------------------------------------------------ set-up
    def _init_data_arrays(self) -> None:
        setup, ds = self.setup, self.dataset
        self.i_obs = np.asarray(ds["I_obs"].values, dtype=np.float64)
        self.sigma = np.asarray(ds["sigma"].values, dtype=np.float64)
        n_frames = setup.n_frames
        validation = np.zeros(n_frames, dtype=bool)
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
        search = thickness_search(self.start_crystal, self.dataset, grid, setup=self.setup)
        self.thickness_search_result = search
        best = search["thickness_best"].values
        if not np.isfinite(best).any():
            raise EdkitError("the thickness grid search found no frame with observed reflections")
        return np.where(np.isfinite(best), best, np.nanmedian(best))

    def _build_model(self, initial: np.ndarray) -> HybridModel:
        opts = self.options
        thickness = make_thickness_model(
            opts.thickness,
            n_frames=self.setup.n_frames,
            features=self.features,
            initial=float(np.median(initial)),
            rngs=nnx.Rngs(opts.seed),
        )
        # Initialise the network near what the grid search found (science.md §6).
        finite = np.isfinite(self.thickness_search_result["thickness_best"].values)
        fit_to_thickness(thickness, self.features, jnp.asarray(initial), jnp.asarray(finite))
        model = HybridModel(
            self.mapping.fract0.shape[0],
            self.setup.n_frames,
            thickness,
            absorption=opts.absorption,
        )
        values, weights = thickness(self.features)
        if not check_finite(values, weights):
            raise EdkitError(f"the {opts.thickness!r} thickness model produced non-finite values")
        return model

    def _labels(self, state):
        return jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key), state)

    def _build_optimizer(self) -> None:
        rates = {**DEFAULT_LEARNING_RATES, **self.options.learning_rates}
        self.base_learning_rates = {g: float(rates[g]) for g in GROUPS}
        self.enabled = {g: g in self.options.refine for g in GROUPS}
        transforms = {
            g: optax.inject_hyperparams(optax.adam)(learning_rate=self._rate(g, 0)) for g in GROUPS
        }
        self.optimizer = optax.multi_transform(transforms, self._labels(self.state))
        self.opt_state = self.optimizer.init(self.state)

    def _rate(self, group: str, step: int) -> float:
        if not self.enabled[group]:
            return 0.0
        return self.base_learning_rates[group] / (1.0 + step / max(self.options.decay_steps, 1))

    def set_learning_rate(self, group: str, rate: float) -> None:
        """Change a group's base learning rate; takes effect at the next step, no recompile."""
        if group not in GROUPS or not (np.isfinite(rate) and rate >= 0):
            raise EdkitError(f"set_learning_rate({group!r}, {rate!r}): unknown group or bad rate")
        self.base_learning_rates[group] = float(rate)

    def set_enabled(self, group: str, enabled: bool) -> None:
        """Switch a parameter group on or off for the next steps."""
        if group not in GROUPS:
            raise EdkitError(f"unknown parameter group {group!r}; expected one of {GROUPS}")
        self.enabled[group] = bool(enabled)
        self._jacobian = None  # its columns are the enabled groups' coefficients: rebuild

    # ------------------------------------------------------------------------------ the step
    def _loss_terms(self, state):
        model = nnx.merge(self.graphdef, state)
        prediction = model(self.context)
        args = (
            jnp.asarray(self.i_obs),
            jnp.asarray(self.sigma),
            prediction.i_calc,
        )
        frames = jnp.asarray(self.setup.refl_frame)
        n_frames = self.setup.n_frames
        if self.options.objective == "wr2":
            train = metrics.intensity_wr2_loss(*args, self.train_mask, frames, n_frames)
            val = metrics.intensity_wr2_loss(*args, self.validation_mask, frames, n_frames)
        else:
            train = metrics.jana_wr_loss(*args, self.train_mask, frames, n_frames)
            val = metrics.jana_wr_loss(*args, self.validation_mask, frames, n_frames)
        penalty = 10.0 * self.mapping.adp_penalty(model.adp[...])
        return train + penalty, (prediction.i_calc, val)

    def _make_step(self) -> Callable:
        def step(state, opt_state):
            (loss, (i_calc, val)), grads = jax.value_and_grad(self._loss_terms, has_aux=True)(state)
            updates, opt_state = self.optimizer.update(grads, opt_state, state)
            return optax.apply_updates(state, updates), opt_state, loss, val, i_calc

        return jax.jit(step)

    def _set_rates(self) -> None:
        for group in GROUPS:
            hyper = self.opt_state.inner_states[group].inner_state.hyperparams
            hyper["learning_rate"] = jnp.asarray(self._rate(group, self.step_count))

    @x64
    def step(self, n: int = 1) -> dict[str, float]:
        """Take ``n`` optimisation steps; returns the last step's figures."""
        record: dict[str, float] = {}
        for _ in range(n):
            record = self._one_step()
        return record

    @x64
    def _one_step(self) -> dict[str, float]:
        if self._compiled_step is None:
            self._compiled_step = self._make_step()
        start = time.perf_counter()
        with jax.enable_x64(True):
            self._set_rates()
            new_state, new_opt, loss, val, i_calc = self._compiled_step(self.state, self.opt_state)
            loss, val = float(loss), float(val)
            i_calc = np.asarray(i_calc)
        self.seconds += time.perf_counter() - start
        selection_loss = val if self.validation_mask.any() else loss
        if not (math.isfinite(loss) and np.all(np.isfinite(i_calc))) or (
            math.isfinite(self.best_loss) and loss > self.options.divergence_factor * self.best_loss
        ):
            return self._diverged(loss)
        record = self._record(loss, val, i_calc)
        if selection_loss < self.best_loss:
            self.best_loss, self.best_state, self.best_step = (
                selection_loss,
                self.state,
                self.step_count,
            )
        self.state, self.opt_state = new_state, new_opt
        self.step_count += 1
        return record

    @x64
    def _diverged(self, loss: float) -> dict[str, float]:
        message = (
            f"step {self.step_count}: the refinement diverged (loss {loss:.4g}, best "
            f"{self.best_loss:.4g} at step {self.best_step}); returned to the best state and "
            "halved every learning rate"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.messages.append(message)
        self.state = self.best_state
        for group in GROUPS:
            self.base_learning_rates[group] *= 0.5
        with jax.enable_x64(True):
            self.opt_state = self.optimizer.init(self.state)
        self.step_count += 1
        return {"loss": loss, "diverged": 1.0}

    @x64
    def _record(self, loss: float, val: float, i_calc: np.ndarray) -> dict[str, float]:
        figures = self._figures(i_calc)
        model = nnx.merge(self.graphdef, self.state)
        with jax.enable_x64(True):
            structure = model.structure(self.context)
            values, weights = model.thickness(self.features)
            u_cif = np.asarray(self.mapping.u_cif(model.adp[...]))
        record = {
            "step": self.step_count,
            "loss": loss,
            "validation_loss": val,
            **figures,
            "fract": np.asarray(structure.fract),
            "ueq": _ueq(u_cif, self.mapping),
            "thickness": np.asarray(jnp.sum(values * weights, axis=1)),
            "seconds": self.seconds,
        }
        self._records.append(record)
        return {k: v for k, v in record.items() if np.ndim(v) == 0}

    @x64
    def _figures(self, i_calc: np.ndarray, n_params: int = 0) -> dict[str, float]:
        mask = self.train_mask
        frames = self.setup.refl_frame
        n_frames = self.setup.n_frames
        weights = np.where(mask, 1.0 / np.maximum(self.sigma, 1e-12), 0.0)
        scale = metrics.scale_per_frame(self.i_obs, i_calc, frames, n_frames, weights)
        jana = metrics.jana_figures(
            self.i_obs[mask], self.sigma[mask], (i_calc * scale[frames])[mask], n_params=n_params
        )
        mean_frame = metrics.mean_frame_r_obs(
            self.i_obs[mask], self.sigma[mask], i_calc[mask], frames[mask], n_frames
        )
        return {
            "r_obs": jana["r_obs"],
            "r_all": jana["r_all"],
            "wr_obs": jana["wr_obs"],
            "wr_all": jana["wr_all"],
            "gof": jana["gof"],
            "r_obs_mean_frame": mean_frame,
            "n_obs": jana["n_obs"],
            "n_all": jana["n_all"],
        }

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

    def panel(self, **options: Any) -> "RefinementPanel":
        """A Jupyter control panel for this refinement (Step/Run/Stop, learning rates, live
        curves, parameter table): :class:`edkit.widgets.RefinementPanel` with ``options``."""
        from edkit.widgets.refinement_panel import RefinementPanel  # widget libraries: lazily

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
        records = self._records
        steps = np.array([r["step"] for r in records], dtype=np.int64)
        scalars = (
            "loss", "validation_loss", "r_obs", "r_all", "wr_obs", "wr_all", "gof",
            "r_obs_mean_frame", "seconds",
        )  # fmt: skip
        data: dict[str, Any] = {
            name: ("step", np.array([r[name] for r in records], dtype=np.float64))
            for name in scalars
        }
        n_atoms = self.mapping.fract0.shape[0]
        empty = (0, n_atoms)
        data["fract"] = (
            ("step", "atom", "xyz"),
            np.array([r["fract"] for r in records]).reshape(-1, n_atoms, 3),
            {"units": "1", "long_name": "fractional coordinates"},
        )
        data["ueq"] = (
            ("step", "atom"),
            np.array([r["ueq"] for r in records]).reshape(empty if not records else (-1, n_atoms)),
            {"units": "angstrom**2", "long_name": "U_eq"},
        )
        data["thickness"] = (
            ("step", "frame"),
            np.array([r["thickness"] for r in records]).reshape(-1, self.setup.n_frames),
            {"units": "angstrom", "long_name": "mean thickness"},
        )
        history = xr.Dataset(
            data,
            coords={
                "step": steps,
                "atom": list(self.mapping.labels),
                "xyz": ["x", "y", "z"],
                "frame": self.setup.frame,
            },
            attrs={
                "objective": self.options.objective,
                "r_convention": "r_obs, wr_*: Jana2020 on |F| over scored reflections; "
                "r_obs_mean_frame: diffBloch mean of per-frame R_obs",
                "best_step": self.best_step,
                "messages": "\n".join(self.messages),
            },
        )
        for name in ("loss", "validation_loss", "r_obs", "r_all", "wr_obs", "wr_all"):
            history[name].attrs["units"] = "1"
        return history

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
        model = self.model
        with jax.enable_x64(True):
            values, weights = model.thickness(self.features)
            values, weights = np.asarray(values), np.asarray(weights)
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
            attrs={
                "units": "angstrom",
                "long_name": "mean thickness",
                "model": self.options.thickness,
            },
        )

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
        """I_calc (unscaled) of every reflection for the current state, (n_refl,)."""
        if self._predict is None:
            self._predict = jax.jit(lambda s: nnx.merge(self.graphdef, s)(self.context).i_calc)
        return np.asarray(self._predict(self.state))

    @x64
    def simulated(self) -> xr.Dataset:
        """Observed vs calculated intensities of the current state (``frame_comparison``)."""
        i_calc = self.predict()
        model = self.model
        with jax.enable_x64(True):
            values, weights = model.thickness(self.features)
        result = frame_comparison(
            self.setup, self.dataset, i_calc, np.asarray(values), np.asarray(weights)
        )
        result["I_obs"] = self.dataset["I_obs"]
        result["sigma"] = self.dataset["sigma"]
        for name in ("h", "k", "l", "frame_id"):
            result[name] = self.dataset[name]
        return result

    @x64
    def report(self) -> dict[str, Any]:
        """Figures of merit of the current state (fractions, not %), with their conventions."""
        # Jana's GoF: sqrt(Σw(ΔF)²/(N_obs − N_par)) with the refined structural parameters.
        figures = self._figures(self.predict(), n_params=self.n_parameters)
        return {
            **figures,
            "n_frames": self.setup.n_frames,
            "n_parameters": self.n_parameters,
            "steps": self.step_count,
            "seconds": round(self.seconds, 3),
            "thickness": [float(t) for t in self.thickness.values],
            "conventions": "r_obs, r_all, wr_obs, wr_all, gof: Jana2020 on |F| (I > 3σ for obs) "
            "over Klar-scored reflections; r_obs_mean_frame: diffBloch mean per-frame R_obs",
        }

    @property
    def n_parameters(self) -> int:
        """Number of refined structural parameters (free position and ADP coefficients)."""
        n = 0
        if self.enabled["positions"]:
            n += int(self.mapping.position_mask.sum())
        if self.enabled["adp"]:
            n += int(self.mapping.adp_mask.sum())
        return n

    # ------------------------------------------------------------------------------ s.u.'s
    def _free_masks(self) -> tuple[np.ndarray, np.ndarray]:
        mapping = self.mapping
        return (
            mapping.position_mask & self.enabled["positions"],
            mapping.adp_mask & self.enabled["adp"],
        )

    def _jacobian_function(self) -> Callable:
        """Compiled ``state -> (r, J)``: Jana-weighted residuals sqrt(w)(F_o − k_f F_c) of the
        training reflections and their Jacobian w.r.t. the free structural coefficients
        (thickness and everything else held), by one linearisation and P tangent passes."""
        pos_mask, adp_mask = self._free_masks()
        n_pos = int(pos_mask.sum())
        n_free = n_pos + int(adp_mask.sum())
        if n_free == 0:
            raise EdkitError("no structural parameter is refined (enable 'positions' or 'adp')")
        mask = self.train_mask
        frames = jnp.asarray(self.setup.refl_frame)
        n_frames = self.setup.n_frames

        def jacobian(state):
            model = nnx.merge(self.graphdef, state)
            base_pos, base_adp = model.positions[...], model.adp[...]

            def residuals(theta):
                positions = base_pos.at[pos_mask].add(theta[:n_pos])
                adp = base_adp.at[adp_mask].add(theta[n_pos:])
                i_calc = model(self.context, positions, adp).i_calc
                return _jana_residuals(self.i_obs, self.sigma, i_calc, mask, frames, n_frames)

            r0, linear = jax.linearize(residuals, jnp.zeros(n_free))
            return r0, jax.vmap(linear, out_axes=1)(jnp.eye(n_free))

        return jax.jit(jacobian)

    def _apply_structure_shift(self, state, theta: np.ndarray):
        pos_mask, adp_mask = self._free_masks()
        n_pos = int(pos_mask.sum())
        model = nnx.merge(self.graphdef, state, copy=True)  # never mutate ``state`` itself
        model.positions[...] = model.positions[...].at[pos_mask].add(theta[:n_pos])
        model.adp[...] = model.adp[...].at[adp_mask].add(theta[n_pos:])
        return nnx.split(model, nnx.Param)[1]

    @x64
    def refine_structure(
        self, iterations: int = 5, *, damping: float = 1e-3, tolerance: float = 1e-6
    ) -> list[float]:
        """Levenberg–Marquardt on the structural parameters (positions, ADPs), thickness held.

        The crystallographer's least squares on Jana's weighted |F| residuals: each iteration
        solves (JᵀJ + λ diag JᵀJ) δ = −Jᵀr with J from JAX (no finite differences), accepts the
        shift if wR drops and adapts λ. Converges in a few iterations near the optimum, where
        Adam only hovers. Returns the wR after each iteration.
        """
        if self._jacobian is None:
            self._jacobian = self._jacobian_function()
        mask = self.train_mask
        wr_history = []
        start = time.perf_counter()
        residuals, jac = self._jacobian(self.state)
        residuals, jac = np.asarray(residuals)[mask], np.asarray(jac)[mask]
        denominator = _jana_denominator(self.i_obs[mask], self.sigma[mask])
        cost = float(residuals @ residuals)
        for _ in range(iterations):
            normal = jac.T @ jac
            gradient = jac.T @ residuals
            accepted = False
            for _attempt in range(8):
                lhs = normal + damping * np.diag(np.maximum(np.diag(normal), 1e-12))
                shift = -np.linalg.solve(lhs, gradient)
                trial_state = self._apply_structure_shift(self.state, shift)
                trial_r, trial_j = self._jacobian(trial_state)
                trial_r = np.asarray(trial_r)[mask]
                trial_cost = float(trial_r @ trial_r)
                if np.isfinite(trial_cost) and trial_cost < cost:
                    accepted = True
                    improvement = (cost - trial_cost) / cost
                    self.state, cost = trial_state, trial_cost
                    residuals, jac = trial_r, np.asarray(trial_j)[mask]
                    damping = max(damping / 10.0, 1e-9)
                    break
                damping *= 10.0
            wr_history.append(float(np.sqrt(cost / denominator)))
            if not accepted or improvement < tolerance:
                break
        self.seconds += time.perf_counter() - start
        i_calc = self.predict()
        record = self._record(float(np.sqrt(cost / denominator)), float("nan"), i_calc)
        self.best_loss, self.best_state, self.best_step = (
            record["loss"],
            self.state,
            self.step_count,
        )
        self.step_count += 1
        self.messages.append(
            f"step {record['step']}: Levenberg–Marquardt, {len(wr_history)} iteration(s), "
            f"wR {wr_history[-1] if wr_history else float('nan'):.5f}"
        )
        return wr_history

    @x64
    def uncertainties(self) -> dict[str, np.ndarray]:
        """Standard uncertainties of fractional coordinates and U^cif from the Gauss–Newton
        matrix JᵀWJ at the current state (Jana convention: scaled by the GoF).

        Returns:
          {"fract": (n, 3), "u_cif": (n, 3, 3), "gof": ()}; zero where a parameter is fixed.
          Also kept as ``last_uncertainties`` with "steps" (``step_count`` when computed).
        """
        if self._jacobian is None:
            self._jacobian = self._jacobian_function()
        mapping = self.mapping
        pos_mask, adp_mask = self._free_masks()
        n_pos, n_free = int(pos_mask.sum()), int(pos_mask.sum() + adp_mask.sum())
        mask = self.train_mask
        residuals, jac = self._jacobian(self.state)
        residuals, jac = np.asarray(residuals)[mask], np.asarray(jac)[mask]
        dof = max(int(mask.sum()) - n_free, 1)
        gof = float(np.sqrt(residuals @ residuals / dof))
        covariance = np.linalg.pinv(jac.T @ jac) * gof**2
        n_atoms = mapping.fract0.shape[0]
        fract_su = np.zeros((n_atoms, 3))
        u_su = np.zeros((n_atoms, 6))
        blocks = (
            (pos_mask, covariance[:n_pos, :n_pos], mapping.position_basis, fract_su),
            (adp_mask, covariance[n_pos:, n_pos:], mapping.adp_basis, u_su),
        )
        for free, cov, basis, out in blocks:
            index = np.argwhere(free)  # (k, 2): atom, coefficient
            for atom in np.unique(index[:, 0]) if len(index) else []:
                rows = np.nonzero(index[:, 0] == atom)[0]
                b = basis[atom][:, index[rows, 1]]
                out[atom] = np.sqrt(np.maximum(np.diag(b @ cov[np.ix_(rows, rows)] @ b.T), 0.0))
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
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_cif(self.start_crystal, folder / "start.cif")
        np.savez(
            folder / "start.npz",
            fract=np.asarray(self.start_crystal.fract),
            u_cif=np.asarray(self.start_crystal.u_cif),
            occupancy=np.asarray(self.start_crystal.occupancy),
        )
        self.dataset.to_netcdf(folder / "data.nc", engine="h5netcdf")
        config = {
            "version": CHECKPOINT_VERSION,
            "options": _jsonable(self.options.__dict__),
            "step_count": self.step_count,
            "seconds": self.seconds,
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "base_learning_rates": self.base_learning_rates,
            "enabled": self.enabled,
            "messages": self.messages,
            "initial_thickness": [float(t) for t in self.initial_thickness],
        }
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        arrays = {}
        for name, tree in (
            ("state", self.state),
            ("opt", self.opt_state),
            ("best", self.best_state),
        ):
            for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
                arrays[f"{name}_{i}"] = np.asarray(leaf)
        np.savez(folder / "state.npz", **arrays)
        if self._records:
            self.history.to_netcdf(folder / "history.nc", engine="h5netcdf")
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "Refinement":
        """Resume a refinement saved with :meth:`save` (same next step, bit-identical on CPU)."""
        folder = Path(path)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise EdkitError(f"{folder}: not an edkit checkpoint ({error})") from None
        if config.get("version") != CHECKPOINT_VERSION:
            raise EdkitError(
                f"{folder / 'config.json'}: checkpoint version {config.get('version')!r}; this "
                f"edkit reads version {CHECKPOINT_VERSION}"
            )
        try:
            crystal = read_cif(folder / "start.cif")
            # The CIF rounds numbers; the exact starting arrays travel beside it.
            with open(folder / "start.npz", "rb") as handle, np.load(handle) as exact:
                crystal = crystal.replace(
                    fract=exact["fract"], u_cif=exact["u_cif"], occupancy=exact["occupancy"]
                )
            dataset = xr.load_dataset(folder / "data.nc", engine="h5netcdf")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise EdkitError(f"{folder}: corrupted checkpoint ({error})") from None
        options = config["options"]
        self = cls.__new__(cls)
        self._restore(crystal, dataset, options, config, folder)
        return self

    def _restore(self, crystal, dataset, options, config, folder) -> None:
        self.options = _check_options(RefinementOptions(**_tuples(options)))
        self.start_crystal, self.dataset = crystal, dataset
        opts = self.options
        with jax.enable_x64(True):
            self.setup = _setup_from(crystal, dataset, opts)
            self.mapping = structure_mapping(crystal, riding=opts.riding)
            self.features = _features(dataset, self.setup)
            self.context = ForwardContext(
                mapping=self.mapping, tables=structure_tables(crystal), setup=self.setup,
                features=self.features, batch_size=opts.batch_size,
                solve_dtype=_solve_dtype(opts.precision), devices=opts.devices,
                remat=opts.remat,
            )  # fmt: skip
            self._init_data_arrays()
            self.initial_thickness = np.asarray(config["initial_thickness"])
            thickness = make_thickness_model(
                opts.thickness, n_frames=self.setup.n_frames, features=self.features,
                initial=float(np.median(self.initial_thickness)), rngs=nnx.Rngs(opts.seed),
            )  # fmt: skip
            model = HybridModel(
                self.mapping.fract0.shape[0], self.setup.n_frames, thickness,
                absorption=opts.absorption,
            )  # fmt: skip
            self.graphdef, self.state = nnx.split(model, nnx.Param)
            self._build_optimizer()
            try:
                with open(folder / "state.npz", "rb") as handle, np.load(handle) as arrays:
                    self.state = _fill(self.state, arrays, "state")
                    self.opt_state = _fill(self.opt_state, arrays, "opt")
                    self.best_state = _fill(self.state, arrays, "best")
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                raise EdkitError(
                    f"{folder / 'state.npz'}: corrupted checkpoint ({error})"
                ) from None
        self.base_learning_rates = {k: float(v) for k, v in config["base_learning_rates"].items()}
        self.enabled = {k: bool(v) for k, v in config["enabled"].items()}
        self.step_count = int(config["step_count"])
        self.seconds = float(config["seconds"])
        self.best_step = int(config["best_step"])
        self.best_loss = float(config["best_loss"])
        self.messages = list(config["messages"])
        self._records = _records_from_history(folder / "history.nc")
        self._compiled_step = None
        self._jacobian = None
        self._predict = None
        self.thickness_search_result = None
        self.last_uncertainties = None


def _fill(template, arrays, prefix: str):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    new = []
    for i, leaf in enumerate(leaves):
        value = arrays[f"{prefix}_{i}"]
        if np.shape(value) != np.shape(leaf):
            raise ValueError(
                f"array {prefix}_{i} has shape {np.shape(value)}, expected {np.shape(leaf)}"
            )
        new.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


def _records_from_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    history = xr.load_dataset(path, engine="h5netcdf")
    records = []
    for i, step in enumerate(history["step"].values):
        record = {"step": int(step)}
        for name in ("loss", "validation_loss", "r_obs", "r_all", "wr_obs", "wr_all", "gof",
                     "r_obs_mean_frame", "seconds"):  # fmt: skip
            record[name] = float(history[name].values[i])
        record["fract"] = history["fract"].values[i]
        record["ueq"] = history["ueq"].values[i]
        record["thickness"] = history["thickness"].values[i]
        records.append(record)
    return records


def _setup_from(crystal: Crystal, dataset: xr.Dataset, opts: RefinementOptions) -> FrameSetup:
    return build_frame_setup(
        crystal, dataset, g_max=opts.g_max, sg_max=opts.sg_max, n_sub=opts.n_sub,
        sg_weak=opts.sg_weak, bethe_terms=opts.bethe_terms,
    )  # fmt: skip


def _jana_residuals(i_obs, sigma, i_calc, mask, frames, n_frames):
    """sqrt(w)(F_o − k_f F_c) with the closed-form per-frame amplitude scale (zero off ``mask``)."""
    sel = jnp.asarray(mask)
    i_o = jnp.where(sel, jnp.asarray(i_obs), 0.0)
    s = jnp.where(sel, jnp.asarray(sigma), 1.0)
    f_o = jnp.sqrt(jnp.maximum(i_o, 0.0))
    f_c = jnp.sqrt(jnp.maximum(jnp.where(sel, i_calc, 1.0), 1e-30))
    w = jnp.where(sel, metrics.jana_weights(i_o, s), 0.0)
    num = jax.ops.segment_sum(w * f_o * f_c, frames, num_segments=n_frames)
    den = jax.ops.segment_sum(w * f_c * f_c, frames, num_segments=n_frames)
    k = num / jnp.where(den > 0, den, 1.0)
    return jnp.sqrt(w) * (f_o - k[frames] * f_c)


def _jana_denominator(i_obs: np.ndarray, sigma: np.ndarray) -> float:
    """Σ w F_o² with Jana's weights (the denominator of wR)."""
    w = metrics._jana_weights_np(i_obs, sigma)  # one definition of the weights
    return float(np.sum(w * np.maximum(i_obs, 0.0)))


def _ueq(u_cif: np.ndarray, mapping) -> np.ndarray:
    m = (mapping.real_basis * mapping.reciprocal_lengths[:, None]).T
    u = adp_matrix(u_cif)
    cart = np.einsum("ij,njk,lk->nil", m, u, m)
    return np.trace(cart, axis1=1, axis2=2) / 3.0


def _features(dataset: xr.Dataset, setup: FrameSetup) -> FrameFeatures:
    rotations = frame_orientations(dataset).values
    beams = np.einsum("fji,j->fi", rotations, LAB_BEAM)  # Oᵀ(−z): electrons' direction, crystal
    return frame_features(jnp.asarray(dataset["alpha"].values), jnp.asarray(beams))


def _tuples(options: dict[str, Any]) -> dict[str, Any]:
    out = dict(options)
    for key in ("refine", "thickness_grid"):
        if key in out and out[key] is not None and not isinstance(out[key], str):
            out[key] = tuple(out[key])
    if isinstance(out.get("refine"), str):
        out["refine"] = (out["refine"],)
    return out


def _check_options(options: RefinementOptions) -> RefinementOptions:
    unknown = [g for g in options.refine if g not in GROUPS]
    if unknown:
        raise EdkitError(
            f"refine = {options.refine!r}: unknown group(s) {unknown}; choose from {GROUPS}"
        )
    if options.thickness not in THICKNESS_KINDS:
        raise EdkitError(f"thickness = {options.thickness!r}: expected one of {THICKNESS_KINDS}")
    if options.objective not in ("jana", "wr2"):
        raise EdkitError(f"objective = {options.objective!r}: expected 'jana' or 'wr2'")
    if options.absorption is not None and not (
        math.isfinite(options.absorption) and options.absorption >= 0
    ):
        raise EdkitError(f"absorption = {options.absorption!r}: expected κ ≥ 0 or None")
    if "absorption" in options.refine and options.absorption is None:
        raise EdkitError("refine includes 'absorption' but absorption is None; give a starting κ")
    if options.precision not in ("double", "single"):
        raise EdkitError(f"precision = {options.precision!r}: expected 'double' or 'single'")
    if options.remat not in (False, True, "eigensystems"):
        raise EdkitError(f"remat = {options.remat!r}: expected False, True or 'eigensystems'")
    if not 0 <= options.validation_fraction < 1:
        raise EdkitError(
            f"validation_fraction = {options.validation_fraction!r}: expected 0 ≤ f < 1"
        )
    bad_rates = {k: v for k, v in options.learning_rates.items() if k not in GROUPS}
    if bad_rates:
        raise EdkitError(
            f"learning_rates: unknown group(s) {sorted(bad_rates)}; choose from {GROUPS}"
        )
    return options


def _solve_dtype(precision: str):
    return jnp.complex64 if precision == "single" else None


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
