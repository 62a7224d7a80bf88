"""Static figures of a refinement (matplotlib), from its xarray outputs.

Every function takes what ``Refinement`` gives (or ``refinement.nc`` holds after
``xr.open_dataset(path, group=...)``): :attr:`~edkit.Refinement.history`,
:meth:`~edkit.Refinement.simulated` and :attr:`~edkit.Refinement.thickness`. Each draws into
``ax`` when one is given, else into a new :class:`matplotlib.figure.Figure` made without pyplot,
so no global figure state is touched (nothing to close, nothing shown twice in a notebook; a
Figure displays itself in Jupyter). Returns the figure; ``fig.savefig("name.png")`` writes it.
R-factors are shown in %.

    from edkit import plot
    plot.convergence(refinement.history).savefig("convergence.png")
    plot.frames(refinement.simulated())
    plot.thickness(refinement.thickness)
    plot.f_obs_vs_f_calc(refinement.simulated())
    plot.frame_spots(refinement.simulated(), frame=12)  # one frame in the detector plane
    plot.rocking_curve(refinement.simulated(), (1, 0, 1))  # one reflection over the frames
    plot.difference_map_slice(refinement.difference_maps(), refinement.crystal)
"""

import io
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.io.atomic import write_atomically
from edkit.refine.fourier import DifferenceMaps

__all__ = [
    "FIGURES", "convergence", "difference_map_slice", "f_obs_vs_f_calc", "frame_spots", "frames",
    "png_bytes", "rocking_curve", "rocking_curves", "thickness", "write_figures",
]  # fmt: skip
#: The PNG files :func:`write_figures` writes.
FIGURES = (
    "convergence.png", "frames.png", "thickness.png", "f_obs_vs_f_calc.png", "rocking_curves.png",
)  # fmt: skip


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes (100 dpi, tight), e.g. for an ipywidgets.Image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _display_in_jupyter() -> None:
    """Let a Figure returned here show itself as a PNG in a notebook cell. IPython draws
    figures only once matplotlib's inline backend is loaded, which this module never does (no
    global figure state); so register the PNG formatter for Figure ourselves (only in an
    IPython session, only where none is registered)."""
    try:
        from IPython import get_ipython
    except ImportError:  # no IPython: nothing displays anything
        return
    shell = get_ipython()
    if shell is None:
        return
    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        formatter.for_type(Figure, png_bytes)


_display_in_jupyter()


def _axes(ax: Axes | None, size: tuple[float, float] = (6.0, 3.6)) -> Axes:
    if ax is not None:
        return ax
    figure = Figure(figsize=size, layout="constrained")
    return figure.add_subplot()


def _figure(ax: Axes) -> Figure:
    figure = ax.get_figure()
    assert isinstance(figure, Figure)
    return figure


def convergence(history: xr.Dataset, ax: Axes | None = None) -> Figure:
    """Loss (left axis) and the R-factors in % (right axis) against the step.

    Args:
      history: ``refinement.history`` (variables ``loss``, ``r_obs``, ``wr_all`` and
        ``r_obs_mean_frame`` over ``step``).
      ax: draw here; None: a new figure.
    """
    ax = _axes(ax)
    steps = history["step"].values
    ax.plot(steps, history["loss"].values, color="black", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({history.attrs.get('objective', 'jana')})")
    right = ax.twinx()
    for name, label in (
        ("r_obs_mean_frame", "mean per-frame R_obs"),
        ("r_obs", "Jana R_obs"),
        ("wr_all", "Jana wR_all"),
    ):
        if name in history:
            right.plot(steps, 100.0 * history[name].values, linestyle="--", label=label)
    right.set_ylabel("R (%)")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper right", fontsize=8)
    ax.set_title("convergence")
    return _figure(ax)


def frames(simulated: xr.Dataset, ax: Axes | None = None) -> Figure:
    """Per-frame R_obs in % (left axis, bars) and the frame scale (right axis) against frame.

    Args:
      simulated: ``refinement.simulated()`` (``r_obs_frame`` and ``scale`` over ``frame``).
      ax: draw here; None: a new figure.
    """
    ax = _axes(ax)
    frame = simulated["frame"].values
    r_frame = 100.0 * simulated["r_obs_frame"].values
    ax.bar(frame, np.nan_to_num(r_frame), color="tab:blue", alpha=0.6, label="R_obs")
    ax.set_xlabel("frame")
    ax.set_ylabel("per-frame R_obs (%)")
    right = ax.twinx()
    right.plot(frame, simulated["scale"].values, "o-", color="tab:red", markersize=3, label="scale")
    right.set_ylabel("frame scale")
    mean = float(np.nanmean(r_frame)) if np.isfinite(r_frame).any() else float("nan")
    ax.set_title(f"frames (mean per-frame R_obs {mean:.2f} %)")
    return _figure(ax)


def thickness(thickness: xr.DataArray, ax: Axes | None = None) -> Figure:
    """Mean thickness against the tilt α, with ±1 spread (σ of the distribution) as a band
    and the grid search's per-frame values as points.

    Args:
      thickness: ``refinement.thickness`` (Å over ``frame``; coords ``alpha`` in degrees,
        ``spread`` and ``grid_search`` in Å).
      ax: draw here; None: a new figure.
    """
    ax = _axes(ax)
    alpha = thickness["alpha"].values
    order = np.argsort(alpha)
    mean = thickness.values[order]
    ax.plot(alpha[order], mean, color="black", label=f"model ({thickness.attrs.get('model')})")
    if "spread" in thickness.coords:
        spread = thickness["spread"].values[order]
        ax.fill_between(alpha[order], mean - spread, mean + spread, alpha=0.25, label="±σ")
    if "grid_search" in thickness.coords:
        search = thickness["grid_search"].values[order]
        ax.plot(alpha[order], search, ".", color="tab:orange", label="grid search")
    ax.set_xlabel("α (°)")
    ax.set_ylabel("thickness (Å)")
    ax.legend(fontsize=8)
    ax.set_title("thickness")
    return _figure(ax)


def f_obs_vs_f_calc(simulated: xr.Dataset, ax: Axes | None = None) -> Figure:
    """F_obs = sqrt(max(I_obs, 0)) against F_calc = sqrt(I_calc scaled) over the scored
    reflections, with the line F_obs = F_calc.

    Args:
      simulated: ``refinement.simulated()`` (``I_obs``, ``I_calc_scaled``, ``scored``).
      ax: draw here; None: a new figure (square).
    """
    ax = _axes(ax, size=(4.2, 4.0))
    scored = np.asarray(simulated["scored"].values, dtype=bool)
    f_obs = np.sqrt(np.maximum(simulated["I_obs"].values[scored], 0.0))
    f_calc = np.sqrt(np.maximum(simulated["I_calc_scaled"].values[scored], 0.0))
    ax.plot(f_calc, f_obs, ".", markersize=3, alpha=0.6)
    top = float(max(f_obs.max(initial=0.0), f_calc.max(initial=0.0))) or 1.0
    ax.plot([0.0, top], [0.0, top], color="black", linewidth=0.8)
    ax.set_xlabel("F_calc (scaled)")
    ax.set_ylabel("F_obs")
    ax.set_aspect("equal")
    ax.set_title(f"{int(scored.sum())} scored reflections")
    return _figure(ax)


def frame_spots(simulated: xr.Dataset, frame: int, ax: Axes | None = None) -> Figure:
    """One frame in the detector plane: measured spots as open circles (area ∝ I_obs) and the
    simulated ones filled (area ∝ I_calc on the frame's scale), at the same places.

    Args:
      simulated: ``refinement.simulated()`` or the "simulated" group of ``refinement.nc``
        (``detector_x``, ``detector_y``, ``I_obs``, ``I_calc_scaled``, ``frame_id``,
        ``r_obs_frame``).
      frame: the PETS frame id.
      ax: draw here; None: a new figure (square).

    Raises:
      EdkitError: no reflection of ``simulated`` lies on ``frame``.
    """
    on_frame = np.asarray(simulated["frame_id"].values) == frame
    if not on_frame.any():
        ids = np.asarray(simulated["frame"].values)
        raise EdkitError(
            f"frame_spots: frame {frame} has no reflection (frames {ids.min()}–{ids.max()})"
        )
    ax = _axes(ax, size=(4.6, 4.4))
    x = np.asarray(simulated["detector_x"].values)[on_frame]
    y = np.asarray(simulated["detector_y"].values)[on_frame]
    i_obs = np.clip(np.asarray(simulated["I_obs"].values, dtype=float)[on_frame], 0.0, None)
    i_calc = np.nan_to_num(
        np.clip(np.asarray(simulated["I_calc_scaled"].values, dtype=float)[on_frame], 0.0, None)
    )
    peak = float(max(i_obs.max(initial=0.0), i_calc.max(initial=0.0))) or 1.0
    scale = 400.0 / peak  # points² of the strongest spot
    ax.scatter(x, y, s=scale * i_calc, color="tab:red", alpha=0.45, label="calculated")
    ax.scatter(x, y, s=scale * i_obs, facecolors="none", edgecolors="black", linewidths=0.8,
               label="observed")  # fmt: skip
    ax.plot([0.0], [0.0], "+", color="grey")
    ax.set_aspect("equal")
    ax.set_xlabel("g_x (Å⁻¹)")
    ax.set_ylabel("g_y (Å⁻¹)")
    position = int(np.flatnonzero(np.asarray(simulated["frame"].values) == frame)[0])
    r_obs = float(simulated["r_obs_frame"].values[position])
    ax.set_title(f"frame {frame}: R_obs {100 * r_obs:.2f} %")
    ax.legend(loc="upper right", fontsize="small", markerscale=0.4)
    return _figure(ax)


def _most_sampled(simulated: xr.Dataset, count: int) -> list[tuple[int, int, int]]:
    """The ``count`` reflections (h, k, l) measured on the most frames (ties: the strongest)."""
    hkl = np.stack([np.asarray(simulated[n].values, dtype=int) for n in "hkl"], axis=1)
    unique, inverse, frames_seen = np.unique(hkl, axis=0, return_inverse=True, return_counts=True)
    summed = np.bincount(inverse.ravel(), weights=np.asarray(simulated["I_obs"].values))
    order = np.lexsort((-summed, -frames_seen))[:count]
    return [(int(a), int(b), int(c)) for a, b, c in unique[order]]


def rocking_curve(
    simulated: xr.Dataset, hkl: tuple[int, int, int] | None = None, ax: Axes | None = None
) -> Figure:
    """One reflection across the frames it was measured on: I_obs ± σ (points) and I_calc on
    each frame's scale (line) against the goniometer angle α (° ; the frame id when the data
    have no α) — the integrated rocking curve of 3D-ED.

    Args:
      simulated: ``refinement.simulated()`` or the "simulated" group of ``refinement.nc``
        (``h``, ``k``, ``l``, ``frame_id``, ``I_obs``, ``sigma``, ``I_calc_scaled``).
      hkl: the reflection; None: the one measured on the most frames.
      ax: draw here; None: a new figure.

    Raises:
      EdkitError: ``hkl`` was not measured.
    """
    if hkl is None:
        hkl = _most_sampled(simulated, 1)[0]
    h, k, l = (int(i) for i in hkl)
    rows = np.ones(simulated.sizes["refl"], dtype=bool)
    for name, index in zip("hkl", (h, k, l), strict=True):
        rows &= np.asarray(simulated[name].values) == index
    if not rows.any():
        raise EdkitError(f"rocking_curve: reflection {h} {k} {l} was not measured on any frame")
    ax = _axes(ax)
    frame_ids = np.asarray(simulated["frame_id"].values)[rows]
    if "alpha" in simulated.coords:
        frames, alphas = simulated["frame"].values.tolist(), simulated["alpha"].values
        alpha_of = dict(zip(frames, alphas, strict=True))
        x = np.array([alpha_of[int(f)] for f in frame_ids], dtype=float)
        ax.set_xlabel("α (°)")
    else:
        x = frame_ids.astype(float)
        ax.set_xlabel("frame")
    order = np.argsort(x, kind="stable")
    x = x[order]
    i_obs = np.asarray(simulated["I_obs"].values, dtype=float)[rows][order]
    sigma = np.asarray(simulated["sigma"].values, dtype=float)[rows][order]
    i_calc = np.asarray(simulated["I_calc_scaled"].values, dtype=float)[rows][order]
    ax.errorbar(x, i_obs, yerr=sigma, fmt="o", markersize=3, color="black", label="observed")
    ax.plot(x, i_calc, "-", color="tab:red", label="calculated")
    ax.set_ylabel("intensity")
    ax.set_title(f"{h} {k} {l}: {int(rows.sum())} frames", fontsize="medium")
    ax.legend(fontsize="small")
    return _figure(ax)


def rocking_curves(simulated: xr.Dataset, count: int = 4) -> Figure:
    """:func:`rocking_curve` of the ``count`` reflections measured on the most frames, in a
    grid (two per row); what ``edkit refine`` writes as ``rocking_curves.png``."""
    chosen = _most_sampled(simulated, count)
    columns = min(2, len(chosen))
    rows = -(-len(chosen) // columns)
    figure = Figure(figsize=(5.0 * columns, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, hkl in zip(axes, chosen, strict=False):
        rocking_curve(simulated, hkl, ax=ax)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    return figure


def difference_map_slice(
    maps: DifferenceMaps,
    crystal: Crystal,
    *,
    peak: int = 0,
    which: str = "difference",
    ax: Axes | None = None,
) -> Figure:
    """A section of a potential map at constant fractional z through one of the difference
    peaks, over the cell's x and y (fractional axes), with the atoms within 0.6 Å of the
    section (labelled) and the listed peaks within 0.3 Å of it (+ peaks, − holes, numbered).

    Args:
      maps: :meth:`edkit.Refinement.difference_maps`.
      crystal: the model the maps were phased with (``refinement.crystal``).
      peak: which peak (0: the largest) the section goes through.
      which: "difference" (Fo−Fc) or "2fo-fc".
      ax: draw here; None: a new figure.

    Raises:
      EdkitError: an unknown ``which`` or ``peak`` out of range.
    """
    grids = {"difference": maps.difference, "2fo-fc": maps.two_fo_fc}
    if which not in grids:
        raise EdkitError(f"difference_map_slice: which={which!r}; expected one of {list(grids)}")
    n_peaks = maps.peaks.sizes["peak"]
    if not 0 <= peak < n_peaks:
        raise EdkitError(f"difference_map_slice: peak {peak} of {n_peaks} listed peaks")
    values = np.array(grids[which], copy=False)
    z = float(maps.peaks["fract"].values[peak][2])
    layer = round(z * values.shape[2]) % values.shape[2]
    z = layer / values.shape[2]
    section = values[:, :, layer].astype(float)
    ax = _axes(ax, size=(5.2, 4.6))
    top = float(np.max(np.abs(section))) or 1.0
    image = ax.imshow(section.T, origin="lower", extent=(0.0, 1.0, 0.0, 1.0), cmap="RdBu_r",
                      vmin=-top, vmax=top, aspect="auto", interpolation="bilinear")  # fmt: skip
    _figure(ax).colorbar(image, ax=ax, label="potential (V)")
    spacing = 1.0 / float(np.sqrt(crystal.reciprocal_metric[2, 2]))  # between z-planes, Å
    for label, site in zip(crystal.labels, crystal.fract, strict=True):
        images = np.einsum("kij,j->ki", crystal.rotations, site) + crystal.translations
        for x, y, w in np.unique(np.round(images % 1.0, 6), axis=0):
            dz = (w - z + 0.5) % 1.0 - 0.5
            if abs(dz) * spacing <= 0.6:
                ax.plot(x, y, "o", color="black", markersize=5)
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize="small")  # fmt: skip
    for i, (fract, height) in enumerate(
        zip(maps.peaks["fract"].values, maps.peaks["height_sigma"].values, strict=True)
    ):
        dz = (fract[2] - z + 0.5) % 1.0 - 0.5
        if abs(dz) * spacing <= 0.3:
            ax.plot(fract[0], fract[1], "+" if height > 0 else "x", color="darkgreen",
                    markersize=10, markeredgewidth=2)  # fmt: skip
            ax.annotate(f"{i + 1}: {height:+.1f}σ", (fract[0], fract[1]),
                        textcoords="offset points", xytext=(5, -10), color="darkgreen",
                        fontsize="small")  # fmt: skip
    ax.set_xlabel("x (fractional)")
    ax.set_ylabel("y (fractional)")
    name = "Fo−Fc" if which == "difference" else "2Fo−Fc"
    ax.set_title(f"{name} at z = {z:.3f} (σ = {maps.sigma:.2f} V)", fontsize="medium")
    return _figure(ax)


def write_figures(
    results: str | Path, thickness_values: xr.DataArray, out: str | Path
) -> list[Path]:
    """The figures of :data:`FIGURES` as PNG files in ``out`` (each written whole or not at
    all), drawn from ``results`` (a ``refinement.nc`` of
    :meth:`~edkit.Refinement.write_results`) and the refinement's ``thickness``; what
    ``edkit refine`` writes beside its report. Returns the paths.
    """
    with (
        xr.open_dataset(results, group="history", engine="h5netcdf") as history,
        xr.open_dataset(results, group="simulated", engine="h5netcdf") as simulated,
    ):
        drawn = (
            convergence(history),
            frames(simulated),
            thickness(thickness_values),
            f_obs_vs_f_calc(simulated),
            rocking_curves(simulated),
        )
        figures = dict(zip(FIGURES, drawn, strict=True))
    paths = []
    for name, figure in figures.items():

        def save(path: Path, figure: Figure = figure) -> None:
            figure.savefig(path, format="png", dpi=120)

        paths.append(write_atomically(Path(out) / name, save))
    return paths
