"""``report.html``: one self-contained page per refinement (no network, no script).

What a reader of a refinement wants on one page: the figures of merit in per cent with their
conventions, how each stage ended, the settings, the timings, the refined parameters with
their standard uncertainties in crystallographers' notation, and the figures, embedded as PNG
data URIs so that the file can be mailed or archived alone. Written by ``edkit refine`` and
``edkit demo`` beside ``report.json``; :func:`write_html_report` builds it from the same report
dictionary, the refined crystal and the s.u.'s, so a notebook can write one too.
"""

import base64
import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edkit.crystal import Crystal
from edkit.io.atomic import write_atomically
from edkit.io.cif import format_with_su
from edkit.version import __version__

#: Figures of merit shown in per cent (the report keeps fractions), with their meaning.
PERCENT_FIGURES = (
    ("r_obs_mean_frame", "mean per-frame R_obs", "diffBloch's: mean over frames of Σ|ΔI|/ΣI_o"),
    ("r_obs", "R_obs", "Jana2020 on |F|, I > 3σ"),
    ("wr_obs", "wR_obs", "Jana2020 on |F|, I > 3σ, weights 1/σ(F)²"),
    ("r_all", "R_all", "Jana2020 on |F|, every scored reflection"),
    ("wr_all", "wR_all", "Jana2020 on |F|, every scored reflection"),
)  # fmt: skip

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 0.9em; } figure { margin: 1em 0; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _cell(text: object, numeric: bool = False) -> str:
    return (
        f'<td class="n">{html.escape(str(text))}</td>'
        if numeric
        else f"<td>{html.escape(str(text))}</td>"
    )


def _table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = (1,)
) -> str:
    """An HTML table; the columns ``numeric`` are right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(v, i in numeric) for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _percent(value: Any) -> str:
    if value is None or not math.isfinite(float(value)):
        return "undefined"
    return f"{100.0 * float(value):.2f} %"


def _figures_of_merit(report: Mapping[str, Any]) -> str:
    rows = [(label, _percent(report.get(key)), meaning) for key, label, meaning in PERCENT_FIGURES]
    gof = report.get("gof")
    shown = "undefined" if gof is None or not math.isfinite(float(gof)) else f"{float(gof):.3f}"
    rows.append(("GoF", shown, "Jana2020"))
    rows.append(("observed / scored", f"{report.get('n_obs')} / {report.get('n_all')}", ""))
    rows.append(("frames", str(report.get("n_frames")), ""))
    rows.append(("least-squares parameters", str(report.get("n_parameters")), ""))
    return _table(("figure", "value", "convention"), rows)


def _parameters(crystal: Crystal, uncertainties: Mapping[str, np.ndarray] | None) -> str:
    """x, y, z and U11, U22, U33 (Å²) with s.u.'s, and Ueq, per asymmetric-unit atom."""
    fract_su = None if uncertainties is None else np.asarray(uncertainties["fract"])
    u_su = None if uncertainties is None else np.asarray(uncertainties["u_cif"])
    rows = []
    for i, label in enumerate(crystal.labels):
        row: list[Any] = [label, crystal.elements[i]]
        for axis in range(3):
            su = None if fract_su is None else float(fract_su[i, axis])
            row.append(format_with_su(float(crystal.fract[i, axis]), su))
        for axis in range(3):
            su = None if u_su is None else float(u_su[i, axis, axis])
            row.append(format_with_su(float(crystal.u_cif[i, axis, axis]), su))
        row.append(f"{float(crystal.u_iso_equivalent[i]):.5f}")
        rows.append(row)
    header = ("atom", "element", "x", "y", "z", "U11 Å²", "U22 Å²", "U33 Å²", "Ueq Å²")
    return _table(header, rows, numeric=range(2, len(header)))


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem.replace("_", " "))
    return (
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
        f"<figcaption class=note>{name}</figcaption></figure>"
    )


def render_html_report(
    report: Mapping[str, Any],
    crystal: Crystal,
    *,
    uncertainties: Mapping[str, np.ndarray] | None = None,
    options: Mapping[str, Any] | None = None,
    figures: Sequence[str | Path] = (),
    title: str = "edkit refinement",
) -> str:
    """The page as a string (see :func:`write_html_report`)."""
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=note>edkit {html.escape(__version__)}, written "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; structure "
        f"{html.escape(str(report.get('structure') or crystal.source or '—'))}, data "
        f"{html.escape(str(report.get('data') or '—'))}; {html.escape(crystal.space_group)}, "
        f"cell {', '.join(f'{c:.4f}' for c in crystal.cell)}</p>",
        "<h2>Figures of merit</h2>",
        _figures_of_merit(report),
    ]
    stages = list(report.get("stages") or [])
    timing = [("steps", report.get("steps")), ("seconds of work", report.get("seconds"))]
    parts += [
        "<h2>How it ran</h2>",
        _table(("", "value"), [(k, "—" if v is None else v) for k, v in timing]),
        "<ul>" + "".join(f"<li>{html.escape(str(s))}</li>" for s in stages) + "</ul>",
        f"<p class=note>{html.escape(str(report.get('memory_plan', '')))}</p>",
        "<h2>Refined parameters</h2>",
        _parameters(crystal, uncertainties),
        "<p class=note>s.u.'s from the Gauss–Newton matrix at the final state, scaled by the "
        "GoF (Jana's convention); none where a parameter is fixed.</p>"
        if uncertainties is not None
        else "<p class=note>no standard uncertainties were computed.</p>",
    ]
    parts += _datasets(report.get("datasets"))
    parts += _difference_map(report.get("difference_map"))
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_image(Path(p)) for p in figures]
    if options:
        rows = [(name, _setting_text(value)) for name, value in sorted(options.items())]
        parts += ["<h2>Settings</h2>", _table(("option", "value"), rows, numeric=())]
    parts.append(f"<p class=note>{html.escape(str(report.get('conventions', '')))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _datasets(datasets: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Each dataset's own figures (``report["datasets"]`` of a joint refinement)."""
    if not datasets:
        return []
    rows = [
        (
            Path(str(d.get("name"))).name, d.get("n_frames"),
            f"{d.get('n_obs')} / {d.get('n_all')}",
            _percent(d.get("r_obs")), _percent(d.get("wr_all")),
            _percent(d.get("r_obs_mean_frame")),
            f"{float(np.mean(d['thickness'])):.0f}" if d.get("thickness") else "—",
        )
        for d in datasets
    ]  # fmt: skip
    header = ("dataset", "frames", "observed / scored", "R_obs", "wR_all", "R_obs (mean per "
              "frame)", "mean thickness (Å)")  # fmt: skip
    return ["<h2>Datasets</h2>", _table(header, rows, numeric=(1, 2, 3, 4, 5, 6))]


def _difference_map(summary: Mapping[str, Any] | None) -> list[str]:
    """The difference map's peak list (``report["difference_map"]`` of ``edkit refine``)."""
    if not summary:
        return []
    rows = [
        (
            i + 1,
            f"{p['height_volt']:+.3f}",
            f"{p['height_sigma']:+.1f}",
            " ".join(f"{v:.4f}" for v in p["fract"]),
            p["nearest_atom"],
            f"{p['distance']:.2f}",
        )
        for i, p in enumerate(summary.get("peaks", []))
    ]
    header = ("#", "height V", "height σ", "x y z", "nearest atom", "distance Å")
    return [
        "<h2>Difference potential map</h2>",
        f"<p class=note>Fo−Fc from dynamically corrected amplitudes of "
        f"{summary.get('unique_reflections')} unique reflections, phased with the model; "
        f"σ = {float(summary.get('sigma_volt', float('nan'))):.3f} V (RMS over the cell). "
        f"Maps: {html.escape(', '.join(summary.get('files', [])))}.</p>",
        _table(header, rows, numeric=(0, 1, 2, 5)),
    ]


def _setting_text(value: Any) -> str:
    """A setting as text: tuples as comma lists, None as "none"."""
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def write_html_report(
    path: str | Path,
    report: Mapping[str, Any],
    crystal: Crystal,
    *,
    uncertainties: Mapping[str, np.ndarray] | None = None,
    options: Mapping[str, Any] | None = None,
    figures: Sequence[str | Path] = (),
    title: str = "edkit refinement",
) -> Path:
    """Write ``report.html``: self-contained (figures as data URIs, inline style, no script).

    Args:
      path: the file to write (whole or not at all).
      report: :meth:`edkit.Refinement.report` (fractions; shown in %), optionally with
        "stages", "structure", "data" and "seconds" as ``edkit refine`` adds them.
      crystal: the refined structure.
      uncertainties: :meth:`edkit.Refinement.uncertainties` ("fract" (n, 3), "u_cif"
        (n, 3, 3)), or None.
      options: the refinement's settings (``edkit.refine.options.options_json``), or None.
      figures: PNG files to embed (e.g. those of :func:`edkit.plot.write_figures`).
      title: the page's heading.
    """
    text = render_html_report(
        report, crystal, uncertainties=uncertainties, options=options, figures=figures,
        title=title,
    )  # fmt: skip
    return write_atomically(Path(path), lambda target: target.write_text(text, encoding="utf-8"))
