"""What a :class:`~edkit.refine.refinement.Refinement` shows of its current state: the
history, the refined crystal, the thickness (per frame and as a map), the predicted intensities,
observed against calculated, the figures of merit, and the dashboard (:meth:`~RefinementViews.
panel`). Read-only views; nothing here steps."""

import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import xarray as xr

from edkit.crystal import Crystal
from edkit.io.atomic import write_atomically
from edkit.precision import x64
from edkit.refine import core, fourier, results
from edkit.refine.results import history_dataset
from edkit.simulate.frames import frame_comparison


class RefinementViews:
    """Mixed into ``Refinement``: its views of the current state (see the module docstring)."""

    @property
    def history(self: Any) -> xr.Dataset:
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
    def crystal(self: Any) -> Crystal:
        """The refined crystal (current state)."""
        model = self.model
        with jax.enable_x64(True):
            return self.mapping.crystal(
                self.start_crystal, model.positions[...], model.adp[...], model.occupancy[...]
            )

    @property
    @x64
    def thickness(self: Any) -> xr.DataArray:
        """Mean thickness per frame (Å), with the spread and the grid-search values as coords."""
        with jax.enable_x64(True):
            values, weights = map(np.asarray, self.model.thickness(self.features))
        return results.thickness_array(
            values, weights, self.setup.frame, np.asarray(self.features.alpha),
            self.initial_thickness, self.options.thickness,
        )  # fmt: skip

    @x64
    def thickness_map(self: Any, resolution: int = 32) -> xr.DataArray | None:
        """The learned thickness map h(x, y) (Å) for the "map-net" model, else None."""
        thickness = self.model.thickness
        if not hasattr(thickness, "thickness_map"):
            return None
        with jax.enable_x64(True):
            x, y, h = thickness.thickness_map(resolution)
        return results.thickness_map_array(x, y, h)

    @x64
    def predict(self: Any) -> np.ndarray:
        """I_calc (unscaled) of every reflection for the current state, (n_refl,); streamed.

        One forward pass per state: the last one computed is kept (with the step's own I_calc
        of the best state and the start's, :meth:`remember_i_calc`), so that the report, the
        CIF and the simulated frames of one state cost one pass, not three (each is minutes on
        a CsPbBr₃-sized dataset)."""
        params, problem = self.state, self.problem
        kept = getattr(self, "_i_calc_kept", None)
        if kept is not None and kept[0] is params and kept[1] is problem:
            return kept[2].copy()
        i_calc = np.asarray(core.predict(params, problem))
        self.remember_i_calc(params, i_calc)
        return i_calc.copy()

    def remember_i_calc(self: Any, params: Any, i_calc: np.ndarray) -> None:
        """Keep ``i_calc`` as :meth:`predict`'s result for ``params`` (compared by identity;
        the parameter states are never changed in place) with the current problem."""
        self._i_calc_kept = (params, self.problem, np.array(i_calc))

    @x64
    def simulated(self: Any) -> xr.Dataset:
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

    def write_results(self: Any, path: str | Path, simulated: xr.Dataset | None = None) -> Path:
        """:attr:`history` and :meth:`simulated` into one netCDF file (groups "history" and
        "simulated"; what ``edkit refine`` writes as ``refinement.nc``), whole or not at all.
        ``simulated``: an already computed :meth:`simulated` of the current state, reused."""
        history = self.history
        simulated = self.simulated() if simulated is None else simulated

        def write(temporary: Path) -> None:
            history.to_netcdf(temporary, engine="h5netcdf", group="history")
            simulated.to_netcdf(temporary, engine="h5netcdf", group="simulated", mode="a")

        return write_atomically(path, write)

    def difference_maps(
        self: Any,
        *,
        sample_rate: float = 3.0,
        peaks: int = 20,
        d_min: float | None = None,
        simulated: xr.Dataset | None = None,
    ) -> fourier.DifferenceMaps:
        """The difference (Fo−Fc) and 2Fo−Fc potential maps of the current state, in volts,
        from dynamically corrected, merged amplitudes (formula: :mod:`edkit.refine.fourier`),
        with the difference map's ``peaks`` largest peaks and holes and their nearest atoms.
        ``sample_rate``: grid points per d_min; ``d_min``: resolution limit of the maps (Å;
        None: all); ``simulated``: a :meth:`simulated` to reuse."""
        simulated = self.simulated() if simulated is None else simulated
        return fourier.difference_maps(
            simulated, self.crystal, sample_rate=sample_rate, peaks=peaks, d_min=d_min
        )

    def write_fcf(self: Any, path: str | Path, simulated: xr.Dataset | None = None) -> Path:
        """The reflection file (h, k, l, I_obs, σ, I_calc on the frame's scale, status, frame,
        scale; one row per measurement; :func:`edkit.refine.fourier.write_fcf`)."""
        return fourier.write_fcf(self.simulated() if simulated is None else simulated, path)

    @x64
    def report(self: Any) -> dict[str, Any]:
        """Figures of merit of the current state (fractions, not %), with their conventions.

        "gof" is Jana's GoF(obs) with N_par the structural parameters ("n_parameters", those of
        the least squares); "parameters" counts every refined parameter by group
        (:meth:`parameter_counts`), "n_parameters_all" is their sum and "gof_ref" the GoF over
        every scored reflection with that N_par (the CIF's ``_refine_ls_goodness_of_fit_ref``),
        counting each restraint residual as an observation: sqrt((Σ w ΔF² + Σ r²)/(N_ref +
        n_restraints − N_par)). "restraint_sum" is the restraints' Σ r² (Δ/σ)².
        """
        i_calc = self.predict()
        counts = self.parameter_counts()
        n_all_parameters = sum(counts.values())
        gof_ref = results.goodness_of_fit_ref(
            self.i_obs, self.sigma, i_calc, self.train_mask, self.setup.refl_frame,
            self.setup.n_frames, n_all_parameters,
        )  # fmt: skip
        figures = self._figures(i_calc, n_params=self.n_parameters)
        restraints = self.problem.restraints
        n_restraints = 0 if restraints is None else restraints.n_residuals
        restraint_sum = float(core.restraint_value(self.state, self.problem))
        if n_restraints and np.isfinite(gof_ref):
            # Each restraint residual is one more observation in the GoF (SHELX, Jana).
            dof = figures["n_all"] - n_all_parameters
            gof_ref = float(np.sqrt((gof_ref**2 * dof + restraint_sum) / (dof + n_restraints)))
        # Jana's GoF: sqrt(Σw(ΔF)²/(N_obs − N_par)) with the refined structural parameters.
        return {
            **figures,
            "n_restraints": n_restraints,
            "restraint_sum": restraint_sum,
            "n_frames": self.setup.n_frames,
            "n_parameters": self.n_parameters,
            "parameters": counts,
            "n_parameters_all": n_all_parameters,
            "gof_ref": gof_ref,
            "steps": self.step_count,
            "seconds": round(self.seconds, 3),
            "thickness": [float(t) for t in self.thickness.values],
            "memory_plan": self.memory_plan.describe(),
            "conventions": "r_obs, r_all, wr_obs, wr_all, gof: Jana2020 on |F| (I > 3σ for obs) "
            "over Klar-scored reflections; r_obs_mean_frame: diffBloch mean per-frame R_obs; "
            "gof_ref: over every scored reflection, N_par = n_parameters_all",
        }

    def panel(self: Any, run_steps: int = 20, **legacy: Any) -> Any:
        """The dashboard of this refinement in Jupyter: ``edkit.widgets.Dashboard(self)``.

        Tabs *Refine* (Step/Run/Stop, learning rates, live curves, the parameter table with
        s.u.'s), *Thickness* (updated after every step) and *Frames* (measured against
        simulated spots). The panel's ``step()``, ``run()``, ``stop()``, ``wait()`` are the
        dashboard's. ``run_steps``: the Run button's number of steps. Needs the ``jupyter``
        extra. (The one import from this layer upward, lazily: see pyproject's import-linter.)
        """
        if "thickness_view" in legacy:
            legacy.pop("thickness_view")
            warnings.warn(
                "Refinement.panel(thickness_view=...) is ignored: the dashboard always shows "
                "the thickness in its own tab",
                DeprecationWarning,
                stacklevel=2,
            )
        if legacy:
            raise TypeError(f"Refinement.panel() got unexpected options {sorted(legacy)}")
        from edkit.widgets.dashboard import Dashboard  # lazily: the jupyter extra is optional

        return Dashboard(self, run_steps=run_steps)
