"""Absolute structure from dynamical diffraction: refine both hands, compare them frame by frame.

Kinematically a structure and its inverse give the same intensities (Friedel's law,
|F(h)| = |F(−h)|); multiple scattering breaks that, so dynamical 3D-ED data can tell the hands
apart (Klar et al. 2023, Nat. Chem. 15, 848, who compare the two hands' R values). Here:

1. The inverse of a structure is x → −x for every atom, with the symmetry operations (R, t)
   becoming (R, −t) — the same group conjugated by the inversion; for the enantiomorphic space
   groups that is the partner group (P3₂21 → P3₁21), named by gemmi where it has a tabulated
   setting. Its structure factors are F(h)* — every |F| is unchanged.
2. Both hands are refined from the same point with the same options (:meth:`Refinement.fit`).
3. **z-score**: per frame f, d_f = R_obs,f(inverted) − R_obs,f(given) (diffBloch's per-frame
   R_obs over the frame's scored reflections, each hand at its own refined state); over the n
   frames with scored reflections, z = mean(d) / (sd(d) / √n) — a paired test treating frames as
   independent measurements of which hand fits better. z > 0 prefers the given hand; |z| ≥ 3 is
   the usual threshold for a confident assignment.
4. **Hamilton's test** on the whole data: ℛ = wR_all(worse)/wR_all(better), with n scored
   reflections and m least-squares parameters; for one extra hypothesis dimension the worse hand
   is rejected at significance α = 1 − F_{1,n−m}((ℛ² − 1)(n − m)) (Hamilton 1965, Acta Cryst.
   18, 502), F the Fisher–Snedecor distribution function.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import gemmi
import numpy as np
import xarray as xr

from edkit.crystal import Crystal
from edkit.refine.refinement import Refinement

#: |z| at or above which a hand counts as determined.
Z_CONFIDENT = 3.0


def inverted_crystal(crystal: Crystal) -> Crystal:
    """The inverse of ``crystal``: fractional coordinates −x, operations (R, −t) (see the
    module docstring); ADPs are unchanged (U is centrosymmetric)."""
    name = crystal.space_group
    group = gemmi.find_spacegroup_by_name(name)
    if group is not None:
        ops = group.operations()
        ops.change_basis_forward(gemmi.Op("-x,-y,-z"))
        partner = gemmi.find_spacegroup_by_ops(ops)
        if partner is not None:
            name = partner.hm
    return crystal.replace(
        fract=np.mod(-np.asarray(crystal.fract), 1.0),
        translations=np.mod(-np.asarray(crystal.translations), 1.0),
        space_group=name,
        source=f"{crystal.source} (inverted)" if crystal.source else "inverted",
    )


def hand_z_score(r_given: np.ndarray, r_inverted: np.ndarray) -> tuple[float, int]:
    """z of the paired per-frame differences R(inverted) − R(given) and the frames used
    (those where both are finite); nan with fewer than two frames or no spread."""
    both = np.isfinite(r_given) & np.isfinite(r_inverted)
    d = np.asarray(r_inverted)[both] - np.asarray(r_given)[both]
    n = int(d.size)
    if n < 2 or not np.std(d, ddof=1) > 0:
        return float("nan"), n
    return float(np.mean(d) / (np.std(d, ddof=1) / math.sqrt(n))), n


def hamilton_significance(wr_better: float, wr_worse: float, n_obs: int, n_params: int) -> float:
    """Hamilton's α for rejecting the worse hand (one hypothesis dimension); nan if undefined."""
    from scipy.stats import f as fisher

    dof = n_obs - n_params
    if dof <= 0 or not (wr_better > 0 and math.isfinite(wr_worse)):
        return float("nan")
    ratio = wr_worse / wr_better
    return float(fisher.sf((ratio**2 - 1.0) * dof, 1, dof))


@dataclass
class AbsoluteStructure:
    """Both hands refined and compared (see the module docstring for the definitions).

    Attributes:
      z_score: paired per-frame z; > 0 prefers the given hand.
      frames: frames in the z-score.
      r_obs_given, r_obs_inverted: Jana R_obs of each refined hand (fractions).
      wr_all_given, wr_all_inverted: Jana wR_all (fractions).
      hamilton_alpha: significance level at which Hamilton's test rejects the worse hand.
      preferred: "given" or "inverted" (the lower wR_all); ``determined``: |z| ≥ 3 agrees.
      given, inverted: the two refinements.
    """

    z_score: float
    frames: int
    r_obs_given: float
    r_obs_inverted: float
    wr_all_given: float
    wr_all_inverted: float
    hamilton_alpha: float
    preferred: str
    given: Refinement = field(repr=False)
    inverted: Refinement = field(repr=False)

    @property
    def determined(self) -> bool:
        """|z| ≥ 3 and its sign agrees with the preferred hand."""
        sign = 1.0 if self.preferred == "given" else -1.0
        return bool(math.isfinite(self.z_score) and sign * self.z_score >= Z_CONFIDENT)

    def as_dict(self) -> dict[str, Any]:
        """What ``report.json`` holds under ``absolute_structure``."""
        return {
            "z_score": self.z_score,
            "frames": self.frames,
            "r_obs_given": self.r_obs_given,
            "r_obs_inverted": self.r_obs_inverted,
            "wr_all_given": self.wr_all_given,
            "wr_all_inverted": self.wr_all_inverted,
            "hamilton_alpha": self.hamilton_alpha,
            "preferred": self.preferred,
            "determined": self.determined,
        }


def absolute_structure(
    crystal: Crystal,
    dataset: xr.Dataset,
    *,
    fit: dict[str, Any] | None = None,
    progress: bool | None = None,
    **options: Any,
) -> AbsoluteStructure:
    """Refine ``crystal`` and its inverse against ``dataset`` and compare the hands.

    Args:
      crystal: the model as given (its hand is "given").
      dataset: the data.
      fit: keywords of :meth:`Refinement.fit` for both (e.g. ``max_steps``); default its own.
      progress: progress bars (see :class:`Refinement`).
      **options: :class:`~edkit.refine.options.RefinementOptions` fields, the same for both.
    """
    refined: list[Refinement] = []
    for hand in ("given", "inverted"):
        # The inverse of the start the given hand had: a kinematical start (made where the
        # model is far off, "auto") is made once, and both hands refine from it.
        start = crystal if hand == "given" else inverted_crystal(refined[0].start_crystal)
        own = options if hand == "given" else {**options, "kinematic_start": False}
        refinement = Refinement(start, dataset, progress=progress, **own)
        refinement.fit(**{"progress": bool(progress), **(fit or {})})
        refined.append(refinement)
    return compare_hands(*refined)


def compare_hands(given: Refinement, inverted: Refinement) -> AbsoluteStructure:
    """Compare two refinements of the same data, one of each hand, at their current states."""
    refined = (given, inverted)
    reports = [r.report() for r in refined]
    per_frame = [r.simulated()["r_obs_frame"].values for r in refined]
    z, frames = hand_z_score(*per_frame)
    wr = [float(report["wr_all"]) for report in reports]
    preferred = "given" if wr[0] <= wr[1] else "inverted"
    alpha = hamilton_significance(min(wr), max(wr), int(reports[0]["n_all"]), given.n_parameters)
    return AbsoluteStructure(
        z_score=z, frames=frames,
        r_obs_given=float(reports[0]["r_obs"]), r_obs_inverted=float(reports[1]["r_obs"]),
        wr_all_given=wr[0], wr_all_inverted=wr[1], hamilton_alpha=alpha, preferred=preferred,
        given=given, inverted=inverted,
    )  # fmt: skip
