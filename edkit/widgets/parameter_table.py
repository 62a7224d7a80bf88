"""The refined parameters as an HTML table: value, shift from the start, s.u., shift/s.u."""

import html

import numpy as np

from edkit.refine.joint import JointRefinement
from edkit.refine.refinement import Refinement

_U_NAMES = ("U11", "U22", "U33", "U12", "U13", "U23")
_U_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def parameter_table(refinement: Refinement | JointRefinement) -> str:
    """HTML table of the structural parameters: value, shift from the start, s.u., shift/s.u.

    Rows: x, y, z (fractional) and U11 … U23 (U^cif, Å²) of every atom, and the occupancy when
    that group is refined. s.u.'s come from ``refinement.last_uncertainties`` when they were
    computed at the current step, else the column is blank. Rows fixed by symmetry (or a group
    switched off) carry the class ``edkit-fixed``; riding atoms ``edkit-riding``.
    """
    r = refinement
    crystal, start, mapping = r.crystal, r.start_crystal, r.mapping
    su = r.last_uncertainties
    current = su is not None and int(su["steps"]) == r.step_count
    # (atom, component, coefficient) bases; below 1e-9 per Å (Å²) is round-off of the symmetry
    position_free = np.any(np.abs(mapping.position_basis) > 1e-9, axis=2) & r.enabled["positions"]
    adp_free = np.any(np.abs(mapping.adp_basis) > 1e-9, axis=2) & r.enabled["adp"]
    rows = []

    def row(label: str, name: str, value: float, start_value: float, sigma: float | None, free):
        shift = value - start_value
        kind = "riding" if free == "riding" else ("free" if free else "fixed")
        cells = [html.escape(label), name, f"{value:.6f}", f"{shift:+.6f}"]
        if sigma is not None and current and sigma > 0:
            cells += [f"{sigma:.6f}", f"{shift / sigma:+.2f}"]
        else:
            cells += ["", ""]
        tds = "".join(f"<td>{c}</td>" for c in cells)
        rows.append(f"<tr class='edkit-{kind}'>{tds}</tr>")

    for i, label in enumerate(crystal.labels):
        riding = bool(mapping.riding_parent[i] >= 0)
        for k, axis in enumerate("xyz"):
            sigma = None if su is None else float(su["fract"][i, k])
            free = "riding" if riding else bool(position_free[i, k])
            row(label, axis, crystal.fract[i, k], start.fract[i, k], sigma, free)
        for j, (name, (a, b)) in enumerate(zip(_U_NAMES, _U_INDEX, strict=True)):
            sigma = None if su is None else float(su["u_cif"][i, a, b])
            value, start_value = crystal.u_cif[i, a, b], start.u_cif[i, a, b]
            row(label, name, value, start_value, sigma, bool(adp_free[i, j]))
        if r.enabled["occupancy"]:
            row(label, "occ", crystal.occupancy[i], start.occupancy[i], None, True)
    if su is None:
        note = "s.u.'s: not computed (press “s.u.'s” or call refinement.uncertainties())"
    elif current:
        note = f"s.u.'s at step {r.step_count}, GoF {float(su['gof']):.3f}"
    else:
        note = (
            f"s.u.'s computed at step {int(su['steps'])} are out of date (now step "
            f"{r.step_count}); press “s.u.'s” to recompute"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("atom", "parameter", "value", "shift", "s.u.", "shift/s.u.")
    )
    # The note is a paragraph of its own (as a caption it wrapped to the table's narrow width).
    return (
        f"<p class='edkit-su-note' style='margin:0 0 4px 0'>{html.escape(note)}; shifts from "
        "the start structure; fractional coordinates and U^cif (Å²)</p>"
        "<table class='edkit-param-table' style='font-family:monospace;text-align:right'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
