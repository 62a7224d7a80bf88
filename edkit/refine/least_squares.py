"""Least squares on the structure for :class:`~edkit.refine.refinement.Refinement`:
Levenberg–Marquardt, standard uncertainties and the refined CIF that carries them.

A mixin so that the refinement's shell stays one readable file; the numerics are in
:mod:`edkit.refine.lm`.
"""

import time
from pathlib import Path
from typing import Any

import numpy as np

from edkit.crystal import adp_matrix
from edkit.io.cif import write_cif
from edkit.precision import x64
from edkit.refine import core, lm, results


class StructureLeastSquaresMixin:
    """Levenberg–Marquardt rounds and s.u.'s over the free positions and ADPs (``self`` is the
    :class:`~edkit.refine.refinement.Refinement`)."""

    _least_squares: lm.StructureLeastSquares | None
    _normal_equations: tuple[Any, lm.NormalEquations | None]
    last_uncertainties: dict[str, np.ndarray] | None

    @property
    def n_parameters(self: Any) -> int:
        """Number of refined structural parameters (free position and ADP coefficients)."""
        pos_mask, adp_mask = lm.free_masks(self.mapping, self.enabled)
        return int(pos_mask.sum() + adp_mask.sum())

    # ------------------------------------------------------------------------------ s.u.'s
    def _structure_least_squares(self: Any) -> lm.StructureLeastSquares:
        if self._least_squares is None:
            pos_mask, adp_mask = lm.free_masks(self.mapping, self.enabled)
            self._least_squares = lm.StructureLeastSquares(
                self.problem, pos_mask, adp_mask, progress=self.progress
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

    @x64
    def uncertainties(self: Any) -> dict[str, np.ndarray]:
        """Standard uncertainties of fractional coordinates and U^cif from the Gauss–Newton
        matrix JᵀWJ at the current state (Jana convention: scaled by the GoF), accumulated
        chunk by chunk of frames.

        Returns:
          {"fract": (n, 3), "u_cif": (n, 3, 3), "gof": ()}; zero where a parameter is fixed.
          Also kept as ``last_uncertainties`` with "steps" (``step_count`` when computed).
        """
        least_squares = self._structure_least_squares()
        at, equations = self._normal_equations
        if equations is None or at is not self.state:  # none computed at this state yet
            equations = least_squares.normal_equations(self.state)
            self._normal_equations = (self.state, equations)
        cov, gof = lm.covariance(equations, least_squares.n_free)
        fract_su, u_su = lm.standard_uncertainties(
            self.mapping, least_squares.pos_mask, least_squares.adp_mask, cov
        )
        result = {"fract": fract_su, "u_cif": adp_matrix(u_su), "gof": np.asarray(gof)}
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
        """Write the refined structure with s.u.'s and the figures of merit (plus ``extra``
        CIF items, tag → value, e.g. ``_chemical_absolute_configuration``)."""
        sigmas = None
        if with_uncertainties and self.n_parameters > 0:
            su = self.uncertainties()
            sigmas = {"fract": su["fract"], "u_cif": su["u_cif"]}
        items = {**results.cif_figures(self.report()), **(extra or {})}
        write_cif(self.crystal, path, sigmas=sigmas, extra=items)
