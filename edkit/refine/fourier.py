"""Difference potential maps after a dynamical refinement: merged, dynamically corrected
amplitudes, Fourier syntheses with gemmi's FFT, a peak list, CCP4 maps and the reflection file.

**Dynamical correction.** Measured intensities are not |F|², so a Fourier synthesis of them
would show dynamical artefacts. Each measurement (reflection h on frame f) is corrected by the
refined model's own ratio of kinematic to dynamical amplitude::

    F_obs,corr(h, f) = |F_kin,calc(h)| · sqrt(I_obs(h, f) / (k_f · I_dyn,calc(h, f)))
                     = sqrt(I_obs / k_f) · |F_kin,calc| / |F_dyn,calc|

with k_f the frame's scale (``I_calc_scaled = k_f I_calc``) and I_obs < 0 taken as 0. Where the
model reproduces a measurement exactly the corrected amplitude is |F_kin,calc|, so what the
model lacks shows up in F_obs,corr − |F_kin,calc|. The measurements of one unique reflection
(symmetry equivalents and Friedel mates, all frames; scored reflections only) are averaged with
weights 1/σ_F², σ_F = c σ_I / (2 sqrt(max(I_obs, σ_I))), c = |F_kin,calc| / sqrt(k_f I_calc).

**Maps.** Phased with the model (φ_calc of F_kin,calc), the syntheses
Δ = Σ_h (F_obs,corr − |F_calc|) e^{iφ} e^{−2πi h·x} and 2Fo−Fc = Σ_h (2F_obs,corr − |F_calc|)
e^{iφ} e^{−2πi h·x} are computed with gemmi over the unit cell (every symmetry equivalent and
Friedel mate filled in) and given as electrostatic potential in volts: with F in Å⁻²
(science.md §3), V(x) = h²/(2π m₀ e) · Σ_h F(h) e^{−2πi h·x}, h²/(2π m₀ e) = 47.88 V Å².
The difference map's F(000) is 0, so its mean is 0; its σ is its RMS over the cell.
"""

from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np
import xarray as xr

from edkit.constants import ELECTRON_MASS, ELEMENTARY_CHARGE, PLANCK_H
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.io.atomic import write_atomically
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables
from edkit.precision import x64

__all__ = [
    "VOLT_ANGSTROM2_PER_DENSITY", "DifferenceMaps", "MergedReflections", "difference_maps",
    "find_peaks", "merge_corrected", "write_fcf",
]  # fmt: skip

#: h²/(2π m₀ e) in V Å²: the potential of a scattering density of 1 Å⁻² (F in Å⁻²).
VOLT_ANGSTROM2_PER_DENSITY = PLANCK_H**2 / (2.0 * np.pi * ELECTRON_MASS * ELEMENTARY_CHARGE) * 1e20


@dataclass(frozen=True)
class MergedReflections:
    """Unique reflections with dynamically corrected amplitudes (see the module docstring).

    Attributes:
      hkl: int (n, 3), gemmi's reciprocal asymmetric-unit representatives.
      f_obs: corrected F_obs (n,), Å⁻².
      sigma: its s.u. (n,), Å⁻².
      f_calc: the model's kinematic F (complex, n), Å⁻².
      measurements: measurements merged into each (n,).
    """

    hkl: np.ndarray
    f_obs: np.ndarray
    sigma: np.ndarray
    f_calc: np.ndarray
    measurements: np.ndarray

    def as_dataset(self) -> xr.Dataset:
        """As an xarray Dataset over ``refl`` (CF units)."""
        unit = {"units": "1/angstrom^2"}
        return xr.Dataset(
            {
                "h": ("refl", self.hkl[:, 0]),
                "k": ("refl", self.hkl[:, 1]),
                "l": ("refl", self.hkl[:, 2]),
                "F_obs_corrected": ("refl", self.f_obs, {**unit, "long_name": "F_obs,corr"}),
                "sigma_F": ("refl", self.sigma, {**unit, "long_name": "s.u. of F_obs,corr"}),
                "F_calc": ("refl", np.abs(self.f_calc), {**unit, "long_name": "|F_kin,calc|"}),
                "phase_calc": (
                    "refl",
                    np.degrees(np.angle(self.f_calc)),
                    {"units": "degree", "long_name": "φ_calc"},
                ),
                "measurements": ("refl", self.measurements, {"long_name": "merged measurements"}),
            }
        )


@x64
def merge_corrected(simulated: xr.Dataset, crystal: Crystal) -> MergedReflections:
    """Correct every scored measurement dynamically and merge to unique reflections.

    Args:
      simulated: ``refinement.simulated()`` (``h``, ``k``, ``l``, ``I_obs``, ``sigma``,
        ``I_calc``, ``I_calc_scaled``, ``scored``).
      crystal: the refined model (phases and |F_kin,calc|).

    Raises:
      EdkitError: no scored measurement with a positive calculated intensity.
    """
    scored = np.asarray(simulated["scored"].values, dtype=bool)
    i_calc = np.asarray(simulated["I_calc"].values, dtype=float)
    usable = scored & np.isfinite(i_calc) & (i_calc > 0)
    if not usable.any():
        raise EdkitError("difference map: no scored reflection with a positive I_calc")
    hkl = np.stack([np.asarray(simulated[n].values, dtype=int) for n in "hkl"], axis=1)[usable]
    i_obs = np.asarray(simulated["I_obs"].values, dtype=float)[usable]
    sigma_i = np.asarray(simulated["sigma"].values, dtype=float)[usable]
    scaled = np.asarray(simulated["I_calc_scaled"].values, dtype=float)[usable]

    spacegroup = gemmi.SpaceGroup(crystal.space_group)
    asu, ops = gemmi.ReciprocalAsu(spacegroup), spacegroup.operations()
    unique_of = np.array([asu.to_asu([int(i) for i in h], ops)[0] for h in hkl], dtype=int)
    unique, inverse = np.unique(unique_of, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    f_calc = np.asarray(
        structure_factors_of(structure_params(crystal), structure_tables(crystal), unique)
    )
    amplitude = np.abs(f_calc)[inverse]
    ratio = amplitude / np.sqrt(scaled)  # |F_kin| / sqrt(k_f I_dyn)
    f_corr = ratio * np.sqrt(np.clip(i_obs, 0.0, None))
    sigma_f = ratio * sigma_i / (2.0 * np.sqrt(np.maximum(i_obs, np.maximum(sigma_i, 1e-300))))
    weight = 1.0 / np.maximum(sigma_f, 1e-12 * np.maximum(amplitude, 1e-30)) ** 2
    total = np.bincount(inverse, weights=weight)
    return MergedReflections(
        hkl=unique,
        f_obs=np.bincount(inverse, weights=weight * f_corr) / total,
        sigma=1.0 / np.sqrt(total),
        f_calc=f_calc,
        measurements=np.bincount(inverse),
    )


@dataclass(frozen=True)
class DifferenceMaps:
    """The difference and 2Fo−Fc potential maps of a refined model, and the difference peaks.

    Attributes:
      difference, two_fo_fc: gemmi.FloatGrid over the unit cell, volts.
      sigma: RMS of the difference map over the cell, V.
      peaks: the difference map's largest peaks and holes (:func:`find_peaks`).
      merged: the merged, corrected reflections the maps come from.
    """

    difference: gemmi.FloatGrid
    two_fo_fc: gemmi.FloatGrid
    sigma: float
    peaks: xr.Dataset
    merged: MergedReflections

    def write_ccp4(self, folder: str | Path) -> list[Path]:
        """``difference.ccp4`` and ``2fo-fc.ccp4`` (CCP4/MRC maps of the whole cell) in
        ``folder``, each written whole or not at all. Returns the paths."""
        paths = []
        for name, grid in (("difference.ccp4", self.difference), ("2fo-fc.ccp4", self.two_fo_fc)):
            ccp4 = gemmi.Ccp4Map()
            ccp4.grid = grid
            ccp4.update_ccp4_header()

            def write(path: Path, ccp4: gemmi.Ccp4Map = ccp4) -> None:
                ccp4.write_ccp4_map(str(path))

            paths.append(write_atomically(Path(folder) / name, write))
        return paths

    def peak_table(self, count: int = 10) -> str:
        """The first ``count`` peaks as a text table (height in V and σ, x y z, nearest atom)."""
        lines = [f"{'#':>3} {'V':>7} {'σ':>6}   {'x':>7} {'y':>7} {'z':>7}   nearest (Å)"]
        p = self.peaks
        for i in range(min(count, p.sizes["peak"])):
            x, y, z = (float(v) for v in p["fract"].values[i])
            lines.append(
                f"{i + 1:>3} {float(p['height'][i]):>7.3f} {float(p['height_sigma'][i]):>6.1f}"
                f"   {x:>7.4f} {y:>7.4f} {z:>7.4f}   {p['nearest_atom'].values[i]!s} "
                f"{float(p['distance'][i]):.2f}"
            )
        return "\n".join(lines)


def _synthesis(
    crystal: Crystal, merged: MergedReflections, amplitude: np.ndarray, sample_rate: float
) -> gemmi.FloatGrid:
    """Σ_h amplitude·e^{iφ_calc} e^{−2πi h·x} over the cell in volts (gemmi divides by the
    volume, so F in Å⁻² goes in times the volume)."""
    phase = np.exp(1j * np.angle(merged.f_calc))
    values = (amplitude * phase * crystal.volume * VOLT_ANGSTROM2_PER_DENSITY).astype(np.complex64)
    data = gemmi.ComplexAsuData(
        gemmi.UnitCell(*crystal.cell),
        gemmi.SpaceGroup(crystal.space_group),
        merged.hkl.astype(np.int32),
        values,
    )
    return data.transform_f_phi_to_map(sample_rate=sample_rate)


def difference_maps(
    simulated: xr.Dataset,
    crystal: Crystal,
    *,
    sample_rate: float = 3.0,
    peaks: int = 20,
    d_min: float | None = None,
) -> DifferenceMaps:
    """The difference (Fo−Fc) and 2Fo−Fc potential maps of ``crystal`` (see the module
    docstring), and the difference map's peaks.

    Args:
      simulated: ``refinement.simulated()`` of the refined state.
      crystal: the refined model (``refinement.crystal``).
      sample_rate: grid points per d_min (gemmi's sampling; 3 gives ≈ d_min/3 spacing).
      peaks: how many peaks and holes to list.
      d_min: resolution limit of the syntheses (Å), None for every reflection. Hydrogen
        atoms scatter mostly at low resolution: a limit near 0.8 Å keeps their signal and
        drops the high-resolution misfit of the heavier atoms.

    Raises:
      EdkitError: no reflection left (no scored measurement, or ``d_min`` above them all).
    """
    merged = merge_corrected(simulated, crystal)
    keep = np.any(merged.hkl != 0, axis=1)  # F(000) is not measured
    if d_min is not None:
        cell = gemmi.UnitCell(*crystal.cell)
        spacing = np.array([cell.calculate_d([int(i) for i in h]) if k else 0.0
                            for h, k in zip(merged.hkl, keep, strict=True)])  # fmt: skip
        keep &= spacing >= float(d_min)
        if not keep.any():
            raise EdkitError(f"difference map: no reflection with d ≥ d_min = {d_min} Å")
    merged = MergedReflections(*(a[keep] for a in _fields(merged)))
    f_calc = np.abs(merged.f_calc)
    difference = _synthesis(crystal, merged, merged.f_obs - f_calc, sample_rate)
    two_fo_fc = _synthesis(crystal, merged, 2.0 * merged.f_obs - f_calc, sample_rate)
    values = np.array(difference, copy=False)
    sigma = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
    table = find_peaks(difference, crystal, count=peaks, sigma=sigma)
    return DifferenceMaps(difference, two_fo_fc, sigma, table, merged)


def _fields(merged: MergedReflections) -> tuple[np.ndarray, ...]:
    return (merged.hkl, merged.f_obs, merged.sigma, merged.f_calc, merged.measurements)


def _local_extrema(values: np.ndarray) -> np.ndarray:
    """Grid points (periodic) strictly above, or strictly below, all 26 neighbours: int (m, 3)."""
    maximum = np.ones(values.shape, dtype=bool)
    minimum = np.ones(values.shape, dtype=bool)
    for shift in np.ndindex(3, 3, 3):
        if shift == (1, 1, 1):
            continue
        neighbour = np.roll(values, tuple(s - 1 for s in shift), axis=(0, 1, 2))
        maximum &= values > neighbour
        minimum &= values < neighbour
    return np.argwhere(maximum | minimum)


def _subgrid(values: np.ndarray, point: np.ndarray) -> np.ndarray:
    """The extremum's fractional position from a parabola through it and its two neighbours
    along each axis (periodic), so a peak is placed to better than a grid step."""
    shape = np.array(values.shape)
    offset = np.zeros(3)
    centre = values[tuple(point)]
    for axis in range(3):
        step = np.zeros(3, dtype=int)
        step[axis] = 1
        below = values[tuple((point - step) % shape)]
        above = values[tuple((point + step) % shape)]
        curvature = below - 2.0 * centre + above
        if curvature != 0:
            offset[axis] = np.clip(0.5 * (below - above) / curvature, -0.5, 0.5)
    return (point + offset) / shape


def find_peaks(
    grid: gemmi.FloatGrid, crystal: Crystal, *, count: int = 20, sigma: float | None = None
) -> xr.Dataset:
    """The largest local maxima and minima of a map (by |height|), one per symmetry-equivalent
    set, each with its nearest atom of ``crystal`` (any symmetry image, any lattice shift).

    Returns a Dataset over ``peak``: ``height`` (map units), ``height_sigma`` (height / σ),
    ``fract`` (peak, 3), ``nearest_atom`` (label) and ``distance`` (Å) to it.
    """
    values = np.array(grid, copy=False).astype(np.float64)
    sigma = float(np.sqrt(np.mean(values**2))) if sigma is None else float(sigma)
    points = _local_extrema(values)
    heights = values[tuple(points.T)]
    order = np.argsort(-np.abs(heights), kind="stable")
    basis = crystal.real_basis
    shifts = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)
    images = np.einsum("kij,nj->nki", crystal.rotations, crystal.fract) + crystal.translations
    spacing = float(np.max(np.array([grid.unit_cell.a, grid.unit_cell.b, grid.unit_cell.c])
                           / np.array(values.shape)))  # fmt: skip
    found: list[tuple[float, np.ndarray, int, float]] = []
    for index in order:
        if len(found) >= count:
            break
        fract = _subgrid(values, points[index])
        # Symmetry copies of a peak already listed are the same peak.
        copies = np.einsum("kij,j->ki", crystal.rotations, fract) + crystal.translations
        if any(_shortest(copies - kept, basis, shifts) < 0.5 * spacing for _, kept, _, _ in found):
            continue
        d = images - fract  # (n_asu, n_ops, 3)
        d = d - np.round(d)
        distance = np.linalg.norm((d[..., None, :] + shifts) @ basis, axis=-1)
        atom = int(np.unravel_index(np.argmin(distance), distance.shape)[0])
        found.append((float(heights[index]), fract % 1.0, atom, float(distance.min())))
    return xr.Dataset(
        {
            "height": ("peak", np.array([f[0] for f in found]), {"units": "V"}),
            "height_sigma": (
                "peak",
                np.array([f[0] / sigma for f in found]),
                {"units": "1", "long_name": "height / RMS of the map"},
            ),
            "fract": (("peak", "xyz"), np.array([f[1] for f in found]).reshape(-1, 3)),
            "nearest_atom": ("peak", np.array([crystal.labels[f[2]] for f in found], dtype=str)),
            "distance": ("peak", np.array([f[3] for f in found]), {"units": "angstrom"}),
        },
        attrs={"sigma": sigma},
    )


def _shortest(d: np.ndarray, basis: np.ndarray, shifts: np.ndarray) -> float:
    """The shortest length (Å) among fractional differences ``d`` (m, 3) over lattice shifts."""
    d = d - np.round(d)
    return float(np.min(np.linalg.norm((d[:, None, :] + shifts) @ basis, axis=-1)))


def write_fcf(simulated: xr.Dataset, path: str | Path) -> Path:
    """The reflection file of a refinement, one row per measurement (CIF loop, SHELX-fcf-like):
    ``_refln_index_h/k/l``, ``_refln_F_squared_meas`` (I_obs), ``_refln_F_squared_sigma``,
    ``_refln_F_squared_calc`` (I_calc on the frame's scale), ``_refln_observed_status``
    (o: scored and I > 3σ; < : scored and weaker; x: not scored), and the dynamical-refinement
    columns ``_refln_edkit_frame`` (PETS frame id) and ``_refln_edkit_scale`` (the frame's
    scale k_f). Written whole or not at all; returns the path."""
    document = gemmi.cif.Document()
    block = document.add_new_block("edkit_reflections")
    block.set_pair("_shelx_refln_list_code", "4")
    block.set_pair("_computing_structure_refinement", gemmi.cif.quote("edkit"))
    frame_scale = dict(
        zip(simulated["frame"].values.tolist(), simulated["scale"].values, strict=True)
    )
    columns = [
        "index_h", "index_k", "index_l", "F_squared_meas", "F_squared_sigma", "F_squared_calc",
        "observed_status", "edkit_frame", "edkit_scale",
    ]  # fmt: skip
    loop = block.init_loop("_refln_", columns)
    i_obs = np.asarray(simulated["I_obs"].values, dtype=float)
    sigma = np.asarray(simulated["sigma"].values, dtype=float)
    i_calc = np.nan_to_num(np.asarray(simulated["I_calc_scaled"].values, dtype=float))
    scored = np.asarray(simulated["scored"].values, dtype=bool)
    frames = np.asarray(simulated["frame_id"].values, dtype=int)
    h, k, l_ = (np.asarray(simulated[n].values, dtype=int) for n in "hkl")
    for i in range(i_obs.size):
        status = "x" if not scored[i] else ("o" if i_obs[i] > 3.0 * sigma[i] else "<")
        loop.add_row(
            [str(h[i]), str(k[i]), str(l_[i]), f"{i_obs[i]:.4f}", f"{sigma[i]:.4f}",
             f"{i_calc[i]:.4f}", status, str(frames[i]), f"{frame_scale[int(frames[i])]:.6g}"]
        )  # fmt: skip

    def write(temporary: Path) -> None:
        document.write_file(str(temporary))

    return write_atomically(Path(path), write)
