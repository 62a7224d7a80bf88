"""Least squares on the structure for :class:`~edkit.refine.refinement.Refinement`:
Levenberg–Marquardt, standard uncertainties and the refined CIF that carries them.

A mixin so that the refinement's shell stays one readable file; the numerics are in
:mod:`edkit.refine.lm`.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from edkit.crystal import adp_matrix
from edkit.io.cif import write_cif
from edkit.precision import x64
from edkit.refine import core, covariance, lm, results


class StructureLeastSquaresMixin:
    """Levenberg–Marquardt rounds and s.u.'s over the free positions and ADPs (``self`` is the
    :class:`~edkit.refine.refinement.Refinement`)."""

    _least_squares: lm.StructureLeastSquares | None
    _normal_equations: tuple[Any, lm.NormalEquations | None]
    #: The full normal matrix last computed: (state, enabled groups, matrix, layout).
    _full_normal: tuple[Any, tuple, covariance.FullNormal, covariance.ParameterLayout] | None
    _full_least_squares: tuple[tuple, covariance.FullLeastSquares] | None
    last_uncertainties: dict[str, np.ndarray] | None

    @property
    def n_parameters(self: Any) -> int:
        """Number of refined structural parameters (free position and ADP coefficients)."""
        pos_mask, adp_mask = lm.free_masks(self.mapping, self.enabled)
        return int(pos_mask.sum() + adp_mask.sum())

    @property
    def polish_problem(self: Any) -> Any:
        """The problem of the least squares and s.u.'s: :attr:`problem` with its solves in
        ``memory_plan.polish_precision`` (complex128 under ``precision="auto"`` where the
        steps' solves are complex64 and small: the published numbers come from double)."""
        problem = self.problem
        if self.memory_plan.polish_precision == self.memory_plan.precision:
            return problem
        kept = getattr(self, "_polish_problem", None)
        if kept is None or kept[0] is not problem:
            config = problem.config._replace(solve_dtype=None)  # None: complex128 under x64
            kept = (problem, dataclasses.replace(problem, config=config))
            self._polish_problem = kept
        return kept[1]

    # ------------------------------------------------------------------------------ s.u.'s
    def _structure_least_squares(self: Any) -> lm.StructureLeastSquares:
        polish = self.polish_problem
        if self._least_squares is None or self._least_squares.problem is not polish:
            pos_mask, adp_mask = lm.free_masks(self.mapping, self.enabled)
            self._least_squares = lm.StructureLeastSquares(
                polish, pos_mask, adp_mask, progress=self.progress
            )
        return self._least_squares

    @x64
    def refine_structure(
        self: Any,
        iterations: int = 5,
        *,
        damping: float = 1e-3,
        tolerance: float = 1e-6,
        shift_tolerance: float = lm.SHIFT_TOLERANCE,
    ) -> list[float]:
        """Levenberg–Marquardt on the structural parameters (positions, ADPs), thickness held.

        The crystallographer's least squares on Jana's weighted |F| residuals: each iteration
        solves (JᵀJ + λ diag JᵀJ) δ = −Jᵀr with JᵀJ accumulated chunk by chunk of frames from
        JAX derivatives (no finite differences, never the full Jacobian), accepts the shift if
        wR drops and adapts λ. It stops early when max |shift|/s.u. < ``shift_tolerance`` (as
        Jana and SHELX do), when wR² falls by less than the fraction ``tolerance``, or when no
        shift lowers it; the reason is in :attr:`messages` and :attr:`stop_reason`. Returns the
        wR after each iteration.
        """
        least_squares = self._structure_least_squares()
        start = time.perf_counter()
        denominator = self.problem.train_denominator
        result = lm.levenberg_marquardt(
            least_squares, self.state, iterations, damping=damping, tolerance=tolerance,
            shift_tolerance=shift_tolerance,
        )  # fmt: skip
        # Adam goes on from here with new moments (and its warm-up ramp, below): the old ones
        # point where the parameters were before LM moved them (a step from them diverged).
        self._core_state = core.init(result.params, self.problem)
        self._normal_equations = (result.params, result.equations)
        self.seconds += time.perf_counter() - start
        wr_history = [float(np.sqrt(c / denominator)) for c in result.costs]
        record = self._record(
            float(np.sqrt(result.cost / denominator)), float("nan"), self.predict()
        )
        self.best_loss, self.best_state, self.best_step = (
            record["loss"],
            result.params,
            self.step_count,
        )
        self.step_count += 1
        self.warmup_step = self.step_count
        self.stop_reason = f"least squares: {result.reason}"
        self.messages.append(
            f"step {record['step']}: Levenberg–Marquardt, {len(wr_history)} iteration(s), "
            f"wR {wr_history[-1] if wr_history else float('nan'):.5f}, max shift/s.u. "
            f"{result.max_shift_su:.3g}; stopped: {result.reason}"
        )
        return wr_history

    # ------------------------------------------------------------------------------ full matrix
    def parameter_layout(self: Any, *, nuisance: bool = True) -> covariance.ParameterLayout:
        """Which parameters are refined and how they enter the full normal matrix
        (:class:`~edkit.refine.covariance.ParameterLayout`); ``nuisance=False``: the structure
        only."""
        return covariance.parameter_layout(
            self.state, self.mapping, self.enabled, self.options.thickness,
            self.options.absorption is not None, self.problem, nuisance=nuisance,
        )  # fmt: skip

    def parameter_counts(self: Any) -> dict[str, int]:
        """Every refined parameter, by group (the count of ``_refine_ls_number_parameters``).

        positions, adp, occupancy: the free coefficients after site symmetry and riding
        constraints; scales: one per frame with a training reflection (solved in closed form,
        still parameters); thickness: the model's own parameters for "constant" (1), "platelet"
        (2) and "wedge" (3), one per fitted frame for "per-frame" and for the networks
        ("profile-net", "map-net": their weights reach the fit only through each frame's
        thickness, so their effective count is that of a free per-frame thickness); orientation:
        three angles per fitted frame; absorption: κ, 1 when refined. Groups not refined count 0.
        """
        return self.parameter_layout().counts()

    @x64
    def full_normal_matrix(
        self: Any,
    ) -> tuple[covariance.FullNormal, covariance.ParameterLayout]:
        """The full normal matrix at the current state over every refined parameter, the local
        ones eliminated (:mod:`edkit.refine.covariance`); kept while the state and the enabled
        groups stay the same."""
        enabled = tuple(sorted(self.enabled.items()))
        cached = self._full_normal
        if cached is not None and cached[0] is self.state and cached[1] == enabled:
            return cached[2], cached[3]
        solver = self.full_least_squares()
        layout = solver.layout
        full = solver.normal(self.state)
        self._full_normal = (self.state, enabled, full, layout)
        undetermined = int(np.sum(~full.determined[: layout.n_structural]))
        if undetermined:
            self.messages.append(
                f"step {self.step_count}: {undetermined} of {layout.n_structural} structural "
                "parameters are not determined once the thickness, orientations and scales are "
                f"refined too ({full.n_residuals} reflections for {full.n_parameters} "
                "parameters): their s.u.'s are unbounded (written without s.u.)"
            )
        return full, layout

    def full_least_squares(self: Any) -> covariance.FullLeastSquares:
        """The full normal matrix's builder for the enabled groups (kept while they and the
        problem stay the same)."""
        enabled = tuple(sorted(self.enabled.items()))
        solver = self._full_least_squares
        polish = self.polish_problem
        if solver is None or solver[0] != enabled or solver[1].problem is not polish:
            layout = self.parameter_layout()
            solver = (enabled, covariance.FullLeastSquares(polish, layout, self.progress))
            self._full_least_squares = solver
        return solver[1]

    def shift_over_su(self: Any) -> tuple[float, float]:
        """(max, mean) |shift|/s.u. over the free positions, ADPs and occupancies, the shift
        being the Gauss–Newton step from the current state over every refined parameter (the
        shift one more full least-squares cycle would apply; Adam's last step or a state chosen
        as the best has no least-squares shift of its own) and the s.u.'s those of
        :meth:`uncertainties`. ``_refine_ls_shift/su_max`` and ``_mean`` of the refined CIF."""
        return covariance.shift_over_su(*self.full_normal_matrix())

    def _restraint_count(self: Any) -> int:
        """Restraints of the refinement: its ``n_restraints``, else the residuals of the
        problem's restraint tables where it has them, else 0 (none yet)."""
        if hasattr(self, "n_restraints"):
            return int(self.n_restraints)
        tables = getattr(self.problem, "restraints", None)
        return 0 if tables is None else int(tables.n_residuals)

    # ------------------------------------------------------------------------------ s.u.'s
    @x64
    def uncertainties(self: Any, *, nuisance: bool = True) -> dict[str, np.ndarray]:
        """Standard uncertainties of fractional coordinates, U^cif and occupancies from the
        Gauss–Newton matrix JᵀWJ at the current state (Jana convention: scaled by the GoF²),
        accumulated chunk by chunk of frames.

        With ``nuisance`` (the default) the matrix spans every refined parameter: structure,
        thickness, orientations, κ, and the per-frame scales (eliminated in closed form), and
        the s.u.'s are the structural block of its inverse, the GoF counting every parameter
        (:mod:`edkit.refine.covariance`). Without it, the structure's own block (positions and
        ADPs, the rest held fixed: smaller s.u.'s, the matrix of the Levenberg–Marquardt rounds).

        Returns:
          {"fract": (n, 3), "u_cif": (n, 3, 3) Å², "occupancy": (n,), "gof": ()}; zero where a
          parameter is fixed, inf where the data leave it undetermined (with ``nuisance``: too
          few reflections per frame for its scale, thickness and angles; see :attr:`messages`).
          Also kept as ``last_uncertainties`` with "steps" (``step_count`` when computed).
        """
        if nuisance:
            result = structural_uncertainties(self.mapping, *self.full_normal_matrix())
        else:
            least_squares = self._structure_least_squares()
            at, equations = self._normal_equations
            if equations is None or at is not self.state:  # none computed at this state yet
                equations = least_squares.normal_equations(self.state)
                self._normal_equations = (self.state, equations)
            cov, gof = lm.covariance(equations, least_squares.n_free)
            pos_mask, adp_mask = least_squares.pos_mask, least_squares.adp_mask
            n_pa = int(pos_mask.sum() + adp_mask.sum())
            fract_su, u_su = lm.standard_uncertainties(
                self.mapping, pos_mask, adp_mask, cov[:n_pa, :n_pa]
            )
            result = {
                "fract": fract_su,
                "u_cif": adp_matrix(u_su),
                "occupancy": np.zeros(self.mapping.fract0.shape[0]),
                "gof": np.asarray(gof),
            }
        self.last_uncertainties = {**result, "steps": np.asarray(self.step_count)}
        return result

    @x64
    def write_cif(
        self: Any,
        path: str | Path,
        *,
        with_uncertainties: bool = True,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Write the refined structure with its s.u.'s and the refinement's CIF items (plus
        ``extra`` items, tag → value, e.g. ``_chemical_absolute_configuration``; they take
        precedence over the refinement's own).

        The items (:func:`edkit.refine.results.cif_items`): radiation (electron, wavelength,
        voltage), reflection counts, the weighting scheme, ``_refine_ls_number_parameters``
        counting every refined parameter (:meth:`parameter_counts`; the breakdown as the
        ``_edkit_refine_ls_parameters`` loop), restraints, shift/s.u. max and mean
        (:meth:`shift_over_su`), R_gt, R_all, wR_gt, wR_ref, GoF and the thickness model. The
        s.u.'s come from the full normal matrix (:meth:`uncertainties`). Without
        ``with_uncertainties`` no s.u. and no shift/s.u. is computed ("?" in the CIF).
        """
        sigmas, shift, undetermined = None, (float("nan"), float("nan")), 0
        if with_uncertainties and self.n_parameters > 0:
            su = self.uncertainties()
            sigmas = {"fract": su["fract"], "u_cif": su["u_cif"], "occupancy": su["occupancy"]}
            shift = self.shift_over_su()
            full, layout = self.full_normal_matrix()
            undetermined = int(np.sum(~full.determined[: layout.n_structural]))
        data = self.dataset
        scored = self.train_mask | self.validation_mask
        reflections = {
            "measured": int(data["I_obs"].size),
            "total": int(scored.sum()),
            "gt": int(np.sum(scored & (self.i_obs > 3.0 * self.sigma))),
        }
        items = results.cif_items(
            self.report(),
            wavelength=float(data["wavelength"]),
            voltage=float(data["voltage"]),
            reflections=reflections,
            shift_su=shift,
            thickness_model=self.options.thickness,
            restraints=self._restraint_count(),
            with_uncertainties=sigmas is not None,
            undetermined=undetermined,
        )
        write_cif(self.crystal, path, sigmas=sigmas, extra={**items, **(extra or {})})


def structural_uncertainties(
    mapping: Any, full: covariance.FullNormal, layout: covariance.ParameterLayout
) -> dict[str, np.ndarray]:
    """s.u.'s of the fractional coordinates (n, 3), U^cif (n, 3, 3) Å² and occupancies (n,)
    from the structural block of a full normal matrix's inverse, with its "gof"; inf where an
    undetermined coefficient reaches a parameter, zero where it is fixed."""
    occupancy = np.zeros(mapping.fract0.shape[0])
    pos_mask, adp_mask = layout.masks["positions"][0], layout.masks["adp"][0]
    variances = covariance.structural_variances(full, layout)
    occupancy[layout.masks["occupancy"][0]] = np.sqrt(variances[layout.slice("occupancy")])
    undetermined = ~full.determined
    n_pa = int(pos_mask.sum() + adp_mask.sum())
    fract_su, u_su = lm.standard_uncertainties(
        mapping, pos_mask, adp_mask, full.covariance[:n_pa, :n_pa]
    )
    if undetermined[:n_pa].any():
        # every coordinate and U_ij an undetermined coefficient reaches: unbounded s.u.
        reach = np.diag(undetermined[:n_pa].astype(np.float64))
        reach_fract, reach_u = lm.standard_uncertainties(mapping, pos_mask, adp_mask, reach)
        fract_su[reach_fract > 1e-9] = np.inf
        u_su[reach_u > 1e-9] = np.inf
    return {
        "fract": fract_su,
        "u_cif": adp_matrix(u_su),
        "occupancy": occupancy,
        "gof": np.asarray(full.gof),
    }
