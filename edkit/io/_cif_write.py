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
    raise EdkitError(
        f"extra[{key!r}] = {value!r} is not a number, a (value, su) pair, a string or a loop "
        "(a mapping column → values)"
    )


def _check_tag(tag: str, taken: set[str]) -> None:
    """Raise unless ``tag`` is a CIF tag that write_cif (and no earlier extra item) writes."""
    if not re.match(r"^_[^\s]+$", tag):
        raise EdkitError(f"extra key {tag!r} is not a CIF tag (expected e.g. '_refine_…')")
    if tag.lower() in taken or tag.lower().startswith("_atom_site_"):
        raise EdkitError(f"extra key {tag!r} clashes with an item write_cif writes itself")
    taken.add(tag.lower())


def _add_extra(block: gemmi.cif.Block, extra: Mapping[str, object]) -> None:
    """The ``extra`` items of :func:`write_cif` into ``block``: pairs, and loops for mappings."""
    taken = set(_WRITTEN_TAGS)
    for key, value in extra.items():
        if isinstance(value, Mapping):
            columns = [str(c) for c in value]
            rows = [list(v) for v in value.values()]
            if not columns or len({len(r) for r in rows}) != 1:
                raise EdkitError(
                    f"extra[{key!r}] is a loop whose columns differ in length (or it has none)"
                )
            for column in columns:
                _check_tag(f"{key}_{column}", taken)
            loop = block.init_loop(f"{key}_", columns)
            for row in zip(*rows, strict=True):
                loop.add_row([_extra_value(key, v) for v in row])
        else:
            _check_tag(key, taken)
            block.set_pair(key, _extra_value(key, value))


#: gemmi's layout of the written file: pair values in column 33, loop columns aligned.
_WRITE_OPTIONS = gemmi.cif.WriteOptions()
_WRITE_OPTIONS.align_pairs = 32
_WRITE_OPTIONS.align_loops = 30


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
    the anisotropic atoms. An isotropic atom is written with its Ueq. The file is built as a
    gemmi CIF document (every value quoted by gemmi where CIF needs it) and written whole or
    not at all.

    Args:
      crystal: the structure.
      path: output file.
      sigmas: optional s.u.s, keys among "fract" (n_asu, 3), "u_cif" (n_asu, 3, 3, Å²),
        "occupancy" (n_asu,), "cell" (6,, Å and °); a zero s.u. marks a fixed parameter and is
        omitted. The Uiso s.u. of an isotropic atom is ``sigmas["u_cif"][i, 0, 0]`` (U^cif_11 =
        Uiso); Ueq of anisotropic atoms is written without s.u. (it needs the covariances).
      extra: optional further items, tag → value: a number, a (value, su) pair or a string,
        e.g. {"_refine_ls_R_factor_obs": 0.0412}; or a loop, tag prefix → {column: values}
        (equal lengths), e.g. {"_edkit_parameters": {"group": ["adp"], "number": [9]}} writes
        ``_edkit_parameters_group`` and ``_edkit_parameters_number``. Non-finite numbers are
        written "?" (unknown).

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

    document = gemmi.cif.Document()
    block = document.add_new_block(name)
    block.set_pair("_audit_creation_method", gemmi.cif.quote(f"edkit {__version__}"))
    for k, tag in enumerate(CELL_TAGS):
        block.set_pair(tag, format_with_su(crystal.cell[k], s_cell[k]))
    block.set_pair("_cell_volume", f"{crystal.volume:.4f}")
    sg = gemmi.cif.quote(crystal.space_group)
    block.set_pair("_space_group_name_H-M_alt", sg)
    block.set_pair("_symmetry_space_group_name_H-M", sg)
    symops = block.init_loop("_space_group_symop_", ["id", "operation_xyz"])
    for k in range(crystal.n_ops):
        triplet = _triplet(crystal.rotations[k], crystal.translations[k])
        symops.add_row([str(k + 1), gemmi.cif.quote(triplet)])

    multiplicity = np.bincount(crystal.site_atom, minlength=n)
    ueq = crystal.u_iso_equivalent
    columns = ["label", "type_symbol", "fract_x", "fract_y", "fract_z", "U_iso_or_equiv",
               "adp_type", "occupancy", "site_symmetry_multiplicity"]  # fmt: skip
    sites = block.init_loop("_atom_site_", columns)
    labels = [gemmi.cif.quote(s) for s in crystal.labels]
    for i in range(n):
        xyz = [format_with_su(crystal.fract[i, k], s_fract[i, k]) for k in range(3)]
        u_su = None if crystal.anisotropic[i] else s_u[i, 0, 0]
        sites.add_row([
            labels[i], crystal.elements[i], *xyz, format_with_su(ueq[i], u_su),
            "Uani" if crystal.anisotropic[i] else "Uiso",
            format_with_su(crystal.occupancy[i], s_occ[i]), str(multiplicity[i]),
        ])  # fmt: skip

    aniso = np.flatnonzero(crystal.anisotropic)
    if aniso.size:
        u_tags = [f"U_{i + 1}{j + 1}" for i, j in ADP_INDICES]
        loop = block.init_loop("_atom_site_aniso_", ["label", "type_symbol", *u_tags])
        for a in aniso:
            us = [format_with_su(crystal.u_cif[a, i, j], s_u[a, i, j]) for i, j in ADP_INDICES]
            loop.add_row([labels[a], crystal.elements[a], *us])

    if extra:
        _add_extra(block, extra)
    text = document.as_string(_WRITE_OPTIONS)
    write_atomically(path_str, lambda p: p.write_text(text, encoding="utf-8"))
