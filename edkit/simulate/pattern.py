"""Simulate one diffraction pattern: ``edkit.simulate_pattern`` and its differentiable core."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit.constants import electron_wavelength, potential_prefactor
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.physics import bloch
from edkit.physics.beams import DEFAULT_G_MAX, coupling_indices, select_beams
from edkit.physics.structure import (
    StructureParams,
    StructureTables,
    structure_factors_of,
    structure_params,
    structure_tables,
)

DEFAULT_SG_MAX = 0.02  # Å⁻¹


def beam_direction(real_basis: np.ndarray | jax.Array, zone_axis: Any) -> jax.Array:
    """Unit vector of the electrons' travel, crystal-Cartesian, for a PETS-style zone axis.

    The zone axis [u, v, w] is the real-space direction u a + v b + w c pointing from the crystal
    toward the source, so the electrons travel along −[uvw]. Shape (3,).
    """
    direction = jnp.asarray(zone_axis, dtype=jnp.float64) @ jnp.asarray(real_basis)
    return -direction / jnp.linalg.norm(direction)


def mean_inner_potential(params: StructureParams, tables: StructureTables, voltage: float):
    """U₀ = (γ/π)|F(000)| in Å⁻² (science.md §2)."""
    f000 = structure_factors_of(params, tables, jnp.zeros((1, 3)))[0]
    return potential_prefactor(voltage) * jnp.abs(f000)


@dataclass(frozen=True)
class PatternModel:
    """A differentiable pattern for a fixed beam set.

    Attributes:
      hkl: beams' Miller indices, int, (n, 3), 000 first.
      intensities: ``f(params, thickness, zone_axis) -> (n_t, n)`` intensities, differentiable in
        the structure parameters, the thicknesses (Å, (n_t,)) and the zone-axis direction (3,).
      wave_number: |K| at the reference structure, Å⁻¹.
    """

    hkl: np.ndarray
    intensities: Callable[[StructureParams, jax.Array, jax.Array], jax.Array]
    wave_number: float


def make_pattern_model(
    crystal: Crystal,
    zone_axis: Any,
    *,
    voltage: float = 200e3,
    g_max: float = DEFAULT_G_MAX,
    sg_max: float = DEFAULT_SG_MAX,
    absorption: float | None = None,
    absorption_method: bloch.AbsorptionMethod = "eig",
    mean_inner_potential_in_k: bool = True,
) -> PatternModel:
    """Choose the beams for ``zone_axis`` and return the differentiable pattern function.

    Call inside ``jax.enable_x64(True)`` (``simulate_pattern`` does). The absorptive potential is
    the proportional model U'_g = κ U_g with κ = ``absorption`` (U'₀ = κU₀ included).
    """
    tables = structure_tables(crystal)
    params0 = structure_params(crystal)
    wavelength = electron_wavelength(voltage)
    prefactor = potential_prefactor(voltage)

    def wave_number(params):
        if not mean_inner_potential_in_k:
            return jnp.asarray(1.0 / wavelength)
        return jnp.sqrt(1.0 / wavelength**2 + mean_inner_potential(params, tables, voltage))

    k0 = float(wave_number(params0))
    hkl = select_beams(
        np.asarray(tables.reciprocal_basis),
        np.asarray(beam_direction(tables.real_basis, zone_axis)), k0, g_max, sg_max,
    )  # fmt: skip
    differences, index = coupling_indices(hkl)
    g_cart = jnp.asarray(hkl @ tables.reciprocal_basis)

    def intensities(params: StructureParams, thickness: jax.Array, axis: jax.Array) -> jax.Array:
        k_mag = wave_number(params)
        k_hat = beam_direction(tables.real_basis, axis)
        potential = prefactor * structure_factors_of(params, tables, differences)[index]
        s = bloch.excitation_errors(g_cart, k_hat, k_mag)
        g_normal = g_cart @ k_hat
        absorptive = None if absorption is None else absorption * potential
        return bloch.bloch_intensities(
            s, g_normal, potential, k_mag, jnp.atleast_1d(thickness), absorptive, absorption_method
        )

    return PatternModel(hkl=hkl, intensities=intensities, wave_number=k0)


def _check_pattern_inputs(zone_axis, thickness, voltage, g_max, sg_max, absorption):
    axis = np.asarray(zone_axis, dtype=float)
    if axis.shape != (3,) or not np.all(np.isfinite(axis)) or not np.any(axis):
        raise EdkitError(
            f"zone_axis = {zone_axis!r}: expected three finite numbers [u, v, w], not all 0"
        )
    t = np.atleast_1d(np.asarray(thickness, dtype=float))
    if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)) or np.any(t < 0):
        raise EdkitError(
            f"thickness = {thickness!r}: expected a scalar or 1-D array of finite Å ≥ 0"
        )
    for name, value in (("voltage", voltage), ("g_max", g_max), ("sg_max", sg_max)):
        if not (np.isfinite(value) and value > 0):
            raise EdkitError(f"{name} = {value!r}: expected a positive number")
    if absorption is not None and not (np.isfinite(absorption) and absorption >= 0):
        raise EdkitError(f"absorption = {absorption!r}: expected κ ≥ 0 (U' = κU) or None")
    return axis, t


def simulate_pattern(
    crystal: Crystal,
    zone_axis: Any,
    thickness: Any,
    *,
    voltage: float = 200e3,
    g_max: float = DEFAULT_G_MAX,
    sg_max: float = DEFAULT_SG_MAX,
    absorption: float | None = None,
    absorption_method: bloch.AbsorptionMethod = "eig",
    mean_inner_potential: bool = True,
) -> xr.DataArray:
    """Bloch-wave intensities of one orientation, for one or more thicknesses.

    Args:
      crystal: the structure (``edkit.read_cif``).
      zone_axis: real-space direction [u, v, w] from the crystal toward the electron source
        (PETS convention; electrons travel along −[uvw]); non-integer values tilt the beam.
      thickness: Å, scalar or 1-D array.
      voltage: accelerating voltage, V.
      g_max: largest |g| of a beam, Å⁻¹ (without 2π).
      sg_max: largest |S_g| of a beam, Å⁻¹.
      absorption: κ of the proportional absorption model U' = κU, or None.
      absorption_method: "eig" (exact, default), "expm" (reference) or "perturbative".
      mean_inner_potential: include U₀ in K = sqrt(1/λ² + U₀); False uses K = 1/λ (as abTEM).

    Returns:
      DataArray of |ψ_g|² (ψ(0) = e₀₀₀), dims ("thickness", "beam"); coords ``h``, ``k``, ``l``,
      ``g`` (|g|, 1/Å) and ``excitation_error`` (1/Å) on ``beam``, ``thickness`` (Å).
    """
    axis, t = _check_pattern_inputs(zone_axis, thickness, voltage, g_max, sg_max, absorption)
    with jax.enable_x64(True):
        model = make_pattern_model(
            crystal,
            axis,
            voltage=voltage,
            g_max=g_max,
            sg_max=sg_max,
            absorption=absorption,
            absorption_method=absorption_method,
            mean_inner_potential_in_k=mean_inner_potential,
        )
        params = structure_params(crystal)
        values = np.asarray(model.intensities(params, jnp.asarray(t), jnp.asarray(axis)))
        g_cart = model.hkl @ np.asarray(crystal.reciprocal_basis)
        k_hat = np.asarray(beam_direction(crystal.real_basis, axis))
        s = np.asarray(bloch.excitation_errors(g_cart, k_hat, model.wave_number))
    if not np.all(np.isfinite(values)):
        raise EdkitError("simulate_pattern produced non-finite intensities; check the structure")
    return xr.DataArray(
        values,
        dims=("thickness", "beam"),
        coords={
            "thickness": ("thickness", t, {"units": "angstrom", "long_name": "thickness"}),
            "h": ("beam", model.hkl[:, 0]),
            "k": ("beam", model.hkl[:, 1]),
            "l": ("beam", model.hkl[:, 2]),
            "g": ("beam", np.linalg.norm(g_cart, axis=1), {"units": "1/angstrom"}),
            "excitation_error": ("beam", s, {"units": "1/angstrom", "long_name": "S_g"}),
        },
        name="intensity",
        attrs={
            "units": "1",
            "long_name": "beam intensity |ψ_g|² (incident beam = 1)",
            "zone_axis": [float(x) for x in axis],
            "voltage": float(voltage),
            "voltage_units": "V",
            "g_max": float(g_max),
            "sg_max": float(sg_max),
            "wave_number": model.wave_number,
            "absorption": "none" if absorption is None else f"proportional kappa={absorption}",
            "absorption_method": absorption_method if absorption is not None else "none",
            "mean_inner_potential": int(mean_inner_potential),
        },
    )
