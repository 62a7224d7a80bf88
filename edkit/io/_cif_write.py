"""Writing a :class:`~edkit.crystal.Crystal` as a CIF, values with standard uncertainties."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import gemmi
import numpy as np

from edkit.crystal import ADP_INDICES, Crystal
from edkit.errors import EdkitError
from edkit.io._cif_source import CELL_TAGS
from edkit.io.atomic import write_atomically
from edkit.version import __version__


def _bare(value: float) -> str:
    """A number with no s.u.: the shortest form that reads back, at most 10 decimals ('0.5')."""
    if not math.isfinite(value):
        return "?"
    s = np.format_float_positional(float(value), precision=10, unique=True, trim="-")
    return "0" if s in ("-0", "-0.") else s


def format_with_su(value: float, su: float | None = None) -> str:
    """``value`` in crystallographers' notation value(su), e.g. 0.12345(6), 1.2345(13).

    The s.u. is shown with two digits when they read 10–19, else with one digit, and the value
    is rounded to the same last decimal (half up). An s.u. of None, ≤ 0 or non-finite (a fixed
    parameter), or at rounding level (≤ 1e-12 relative), writes the bare value (shortest form
    that reads back, at most 10 decimals).
    An s.u. reaching the units place is written in units: 12345 ± 230 → "12300(200)". A
    non-finite value writes "?" (CIF's unknown).

    Examples: (0.12345, 0.00006) → "0.12345(6)"; (1.2345, 0.0013) → "1.2345(13)";
    (12.3, 1.5) → "12.3(15)"; (0.5, 0) → "0.5"; (0.0962, 0.096) → "0.10(10)".
    """
    value = float(value)
    if not math.isfinite(value):
        return "?"
    # An s.u. at rounding level (e.g. 1e-20 on a coordinate tied by site symmetry) is a fixed one.
    if su is None or not math.isfinite(float(su)) or float(su) <= 1e-12 * max(1.0, abs(value)):
        return _bare(value)
    su_d = Decimal(repr(abs(float(su))))

    def rounded(x: Decimal, digits: int) -> Decimal:
        # Round to `digits` significant figures, half up.
        return x.quantize(Decimal(1).scaleb(x.adjusted() - digits + 1), rounding=ROUND_HALF_UP)

    two = rounded(su_d, 2)  # e.g. 0.000126 → 0.00013; 0.0996 → 0.10 (adjusted grows)
    exponent = two.adjusted()
    if two.scaleb(-exponent) < 2:  # leading digits 10–19: keep two
        last = exponent - 1
        shown = two
    else:
        shown = rounded(su_d, 1)
        last = shown.adjusted()
        if shown.scaleb(-last) < 2:  # 0.096 → 0.1: a leading 1 takes the second digit
            last -= 1
    quantum = Decimal(1).scaleb(last)
    with localcontext() as ctx:
        ctx.prec = 80  # quantize needs every digit of the rounded value (1e30 ± 1e-5)
        v = Decimal(repr(value)).quantize(quantum, rounding=ROUND_HALF_UP)
    if v == 0:
        v = abs(v)  # no "-0.000"
    text = f"{v:f}" if last < 0 else f"{int(v)}"
    # The s.u. counts units of the value's last decimal; from the units place up it is the
    # s.u. itself ("12300(200)").
    su_digits = int(shown.scaleb(-last)) if last < 0 else int(shown)
    return f"{text}({su_digits})"


_WRITTEN_TAGS = {
    t.lower()
    for t in (
        *CELL_TAGS,
        "_cell_volume",
        "_audit_creation_method",
        "_space_group_name_H-M_alt",
        "_symmetry_space_group_name_H-M",
        "_space_group_symop_id",
        "_space_group_symop_operation_xyz",
    )
}


def _triplet(rot: np.ndarray, tran: np.ndarray) -> str:
    op = gemmi.Op()
    den = gemmi.Op.DEN
    r = np.rint(rot * den)
    t = np.rint(tran * den)
    if not (np.allclose(r, rot * den, atol=1e-6) and np.allclose(t, tran * den, atol=1e-6)):
        raise EdkitError(
            f"operator R = {rot.tolist()}, t = {tran.tolist()} is not expressible as a CIF symop "
            f"(expected multiples of 1/{den})"
        )
    op.rot = r.astype(int).tolist()
    op.tran = t.astype(int).tolist()
    return op.wrap().triplet()


def _check_sigmas(crystal: Crystal, sigmas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    shapes = {
        "fract": (crystal.n_asu, 3),
        "u_cif": (crystal.n_asu, 3, 3),
        "occupancy": (crystal.n_asu,),
        "cell": (6,),
    }
    out = {}
    for key, value in sigmas.items():
        if key not in shapes:
            raise EdkitError(f"sigmas key {key!r} is not one of {sorted(shapes)}")
        a = np.asarray(value, dtype=np.float64)
        if a.shape != shapes[key]:
            raise EdkitError(f"sigmas[{key!r}] has shape {a.shape}; expected {shapes[key]}")
        out[key] = a
    return out


def _extra_value(key: str, value: object) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return format_with_su(float(value[0]), None if value[1] is None else float(value[1]))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float | np.integer | np.floating):
        return _bare(float(value))
    if isinstance(value, str):
        return gemmi.cif.quote(value)
    raise EdkitError(f"extra[{key!r}] = {value!r} is not a number, a (value, su) pair or a string")


def write_cif(
    crystal: Crystal,
    path: str | os.PathLike[str],
    *,
    sigmas: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, object] | None = None,
) -> None:
    """Write ``crystal`` as a CIF, with standard uncertainties where given.

    Writes the cell, the H-M symbol and symop loop, the atom_site loop (label, type, x, y, z,
    Uiso or Ueq, adp_type Uiso/Uani, occupancy, multiplicity) and the aniso loop (U_ij) for
    the anisotropic atoms. An isotropic atom is written with its Ueq.

    Args:
      crystal: the structure.
      path: output file.
      sigmas: optional s.u.s, keys among "fract" (n_asu, 3), "u_cif" (n_asu, 3, 3, Å²),
        "occupancy" (n_asu,), "cell" (6,, Å and °); a zero s.u. marks a fixed parameter and is
        omitted. The Uiso s.u. of an isotropic atom is ``sigmas["u_cif"][i, 0, 0]`` (U^cif_11 =
        Uiso); Ueq of anisotropic atoms is written without s.u. (it needs the covariances).
      extra: optional further items, tag → value: a number, a (value, su) pair or a string,
        e.g. {"_refine_ls_R_factor_obs": 0.0412}.

    Raises:
      EdkitError: bad ``sigmas`` keys or shapes, bad or clashing ``extra`` tags.
    """
    sig = _check_sigmas(crystal, sigmas or {})
    n = crystal.n_asu
    s_fract = sig.get("fract", np.zeros((n, 3)))
    s_u = sig.get("u_cif", np.zeros((n, 3, 3)))
    s_occ = sig.get("occupancy", np.zeros(n))
    s_cell = sig.get("cell", np.zeros(6))

    path_str = os.fspath(path)
    stem = Path(crystal.source or path_str).stem
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem) or "edkit"

    out = [f"data_{name}", f"_audit_creation_method 'edkit {__version__}'", ""]
    for k, tag in enumerate(CELL_TAGS):
        out.append(f"{tag:<32} {format_with_su(crystal.cell[k], s_cell[k])}")
    out.append(f"{'_cell_volume':<32} {crystal.volume:.4f}")
    out.append("")
    sg = gemmi.cif.quote(crystal.space_group)
    out.append(f"{'_space_group_name_H-M_alt':<32} {sg}")
    out.append(f"{'_symmetry_space_group_name_H-M':<32} {sg}")
    out += ["", "loop_", "_space_group_symop_id", "_space_group_symop_operation_xyz"]
    for k in range(crystal.n_ops):
        out.append(f"{k + 1} {_triplet(crystal.rotations[k], crystal.translations[k])}")

    multiplicity = np.bincount(crystal.site_atom, minlength=n)
    ueq = crystal.u_iso_equivalent
    out += ["", "loop_"]
    out += [
        f"_atom_site_{t}"
        for t in (
            "label",
            "type_symbol",
            "fract_x",
            "fract_y",
            "fract_z",
            "U_iso_or_equiv",
            "adp_type",
            "occupancy",
            "site_symmetry_multiplicity",
        )
    ]
    labels = [gemmi.cif.quote(s) for s in crystal.labels]
    width = max(len(s) for s in labels) if labels else 1
    for i in range(n):
        xyz = " ".join(format_with_su(crystal.fract[i, k], s_fract[i, k]) for k in range(3))
        if crystal.anisotropic[i]:
            u = format_with_su(ueq[i], None)
        else:
            u = format_with_su(ueq[i], s_u[i, 0, 0])
        adp = "Uani" if crystal.anisotropic[i] else "Uiso"
        occ = format_with_su(crystal.occupancy[i], s_occ[i])
        out.append(
            f"{labels[i]:<{width}} {crystal.elements[i]:<2} {xyz} {u} {adp} {occ} {multiplicity[i]}"
        )

    aniso = np.flatnonzero(crystal.anisotropic)
    if aniso.size:
        out += ["", "loop_", "_atom_site_aniso_label", "_atom_site_aniso_type_symbol"]
        out += [f"_atom_site_aniso_U_{i + 1}{j + 1}" for i, j in ADP_INDICES]
        for a in aniso:
            us = " ".join(
                format_with_su(crystal.u_cif[a, i, j], s_u[a, i, j]) for i, j in ADP_INDICES
            )
            out.append(f"{labels[a]:<{width}} {crystal.elements[a]:<2} {us}")

    if extra:
        out.append("")
        taken = set(_WRITTEN_TAGS)
        for key, value in extra.items():
            if not re.match(r"^_[^\s]+$", key):
                raise EdkitError(f"extra key {key!r} is not a CIF tag (expected e.g. '_refine_…')")
            if key.lower() in taken or key.lower().startswith("_atom_site_"):
                raise EdkitError(f"extra key {key!r} clashes with an item write_cif writes itself")
            taken.add(key.lower())
            text = _extra_value(key, value)
            if text.startswith(";"):  # a text field must open at the start of its own line
                out += [key, text]
            else:
                out.append(f"{key:<32} {text}")
    out.append("")
    write_atomically(path_str, lambda p: p.write_text("\n".join(out), encoding="utf-8"))
