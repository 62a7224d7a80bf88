"""Simulate one diffraction pattern: ``edkit.simulate_pattern`` and its differentiable core."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit.constants import electron_wavelength, potential_prefactor
from edkit.cores import threaded_lapack
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.physics import bloch
from edkit.physics.beams import (
    DEFAULT_G_MAX,
    centring_translations,
    coupling_indices,
    select_beams,
)
from edkit.physics.structure import (
    StructureParams,
    StructureTables,
    centric_at_origin,
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
    prune_centring: bool = True,
    real_potential: bool | None = None,
) -> PatternModel:
    """Choose the beams for ``zone_axis`` and return the differentiable pattern function.

    Call inside ``jax.enable_x64(True)`` (``simulate_pattern`` does). The absorptive potential is
    the proportional model U'_g = κ U_g with κ = ``absorption`` (U'₀ = κU₀ included).

    ``prune_centring`` drops the beams the lattice centring forbids (exact: they couple to no
    allowed beam, :func:`edkit.physics.beams.centring_allowed`). ``real_potential``: solve with
    real F (real symmetric matrices without absorption, ~3× cheaper ``eigh``); None: when the
    crystal has the inversion through the origin, where F is real for every structure of its
    group (:func:`edkit.physics.structure.centric_at_origin`).
    """
    plan = _plan(
        crystal, zone_axis, voltage, g_max, sg_max, mean_inner_potential_in_k, prune_centring,
        real_potential,
    )  # fmt: skip
    kappa = jnp.asarray(0.0 if absorption is None else absorption)

    def intensities(params: StructureParams, thickness: jax.Array, axis: jax.Array) -> jax.Array:
        return _intensities(
            params, plan.tables, plan.half, plan.index, plan.g_cart, thickness, axis, kappa,
            voltage=voltage, real=plan.real, absorptive=absorption is not None,
            absorption_method=absorption_method,
            mean_inner_potential_in_k=mean_inner_potential_in_k,
        )  # fmt: skip

    return PatternModel(hkl=plan.hkl, intensities=intensities, wave_number=plan.wave_number)


@dataclass(frozen=True)
class _Plan:
    """The static part of a pattern (numpy): beams, coupling indices, |K| of the reference."""

    tables: StructureTables
    hkl: np.ndarray  # (n, 3)
    half: np.ndarray  # ((m + 1)/2, 3): the sorted differences h_j − h_i up to 000 (of m)
    index: np.ndarray  # (n, n)
    g_cart: np.ndarray  # (n, 3), Å⁻¹
    wave_number: float  # Å⁻¹
    real: bool


def _plan(
    crystal: Crystal,
    zone_axis: Any,
    voltage: float,
    g_max: float,
    sg_max: float,
    mean_inner_potential_in_k: bool,
    prune_centring: bool,
    real_potential: bool | None,
) -> _Plan:
    tables = structure_tables(crystal)
    k0 = float(
        _wave_number_jit(structure_params(crystal), tables, voltage, mean_inner_potential_in_k)
    )
    real = centric_at_origin(tables) if real_potential is None else bool(real_potential)
    centring = None
    if prune_centring:
        centring = centring_translations(
            np.asarray(tables.rotations), np.asarray(tables.translations)
        )
    reciprocal = np.asarray(tables.reciprocal_basis)
    k_hat = _beam_direction_np(np.asarray(tables.real_basis), zone_axis)
    hkl = select_beams(reciprocal, k_hat, k0, g_max, sg_max, centring)
    differences, index = coupling_indices(hkl)
    # The differences of a beam set come in ± pairs and sort lexicographically, so the list
    # mirrors about its middle (000): F of the first half gives the rest (F(−h) = F(h)*).
    if not np.array_equal(differences, -differences[::-1]):
        raise EdkitError("internal: the hkl differences are not symmetric about 000")
    half = differences[: (len(differences) + 1) // 2]
    return _Plan(tables, hkl, half, index, hkl @ reciprocal, k0, real)


def _beam_direction_np(real_basis: np.ndarray, zone_axis: Any) -> np.ndarray:
    """:func:`beam_direction` in numpy, for the static beam choice (no JAX dispatch), (3,)."""
    direction = np.asarray(zone_axis, dtype=np.float64) @ real_basis
    return -direction / np.linalg.norm(direction)


def _wave_number(
    params: StructureParams,
    tables: StructureTables,
    voltage: float,
    mean_inner_potential_in_k: bool,
) -> jax.Array:
    """|K| in Å⁻¹: sqrt(1/λ² + U₀), or 1/λ without the mean inner potential."""
    wavelength = electron_wavelength(voltage)
    if not mean_inner_potential_in_k:
        return jnp.asarray(1.0 / wavelength)
    return jnp.sqrt(1.0 / wavelength**2 + mean_inner_potential(params, tables, voltage))


def _intensities(
    params: StructureParams,
    tables: StructureTables,
    half: jax.Array | np.ndarray,
    index: jax.Array | np.ndarray,
    g_cart: jax.Array | np.ndarray,
    thickness: jax.Array,
    axis: jax.Array,
    kappa: jax.Array,
    *,
    voltage: float,
    real: bool,
    absorptive: bool,
    absorption_method: bloch.AbsorptionMethod,
    mean_inner_potential_in_k: bool,
) -> jax.Array:
    """Intensities (n_t, n) of the beams ``g_cart`` (Å⁻¹, (n, 3)) for ``params``, Å thicknesses
    ``thickness`` and zone axis ``axis``: the differentiable core of :class:`PatternModel`.

    ``half``: the first (m + 1)/2 of the m sorted hkl differences (int, up to 000); ``index``
    (n, n) points into all m of them (:func:`edkit.physics.beams.coupling_indices`).
    """
    k_mag = _wave_number(params, tables, voltage, mean_inner_potential_in_k)
    k_hat = beam_direction(tables.real_basis, axis)
    f_half = structure_factors_of(params, tables, half)
    f = jnp.concatenate([f_half, jnp.conj(f_half[-2::-1])])  # F(−h) = F(h)*: all m differences
    if real:
        f = jnp.real(f)  # the imaginary parts are rounding (~1e-16 relative) here
    potential = potential_prefactor(voltage) * f[index]
    g_cart = jnp.asarray(g_cart)
    s = bloch.excitation_errors(g_cart, k_hat, k_mag)
    return bloch.bloch_intensities(
        s, g_cart @ k_hat, potential, k_mag, jnp.atleast_1d(thickness),
        kappa * potential if absorptive else None, absorption_method,
    )  # fmt: skip


# Module-level jits, cached by shapes and the static choices: simulate_pattern runs one compiled
# program instead of ~100 eagerly dispatched operations (~30 ms of dispatch at N ≈ 600).
_wave_number_jit = jax.jit(_wave_number, static_argnames=("voltage", "mean_inner_potential_in_k"))
_intensities_jit = jax.jit(
    _intensities,
    static_argnames=(
        "voltage", "real", "absorptive", "absorption_method", "mean_inner_potential_in_k"
    ),
)  # fmt: skip


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
    prune_centring: bool = True,
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
      prune_centring: leave out the beams the lattice centring forbids (I, F, A/B/C, R): they
        couple to no allowed beam, so this changes no intensity, only the cost. False keeps
        them (at exactly zero intensity). Screw and glide absences always stay.

    Returns:
      DataArray of |ψ_g|² (ψ(0) = e₀₀₀), dims ("thickness", "beam"); coords ``h``, ``k``, ``l``,
      ``g`` (|g|, 1/Å) and ``excitation_error`` (1/Å) on ``beam``, ``thickness`` (Å).
    """
    axis, t = _check_pattern_inputs(zone_axis, thickness, voltage, g_max, sg_max, absorption)
    # One orientation, one device: the solve gets every BLAS thread (edkit.cores).
    with jax.enable_x64(True), threaded_lapack():
        plan = _plan(
            crystal, axis, voltage, g_max, sg_max, mean_inner_potential, prune_centring, None
        )
        values = np.asarray(
            _intensities_jit(
                structure_params(crystal), plan.tables, plan.half, plan.index,
                plan.g_cart, t, axis, np.float64(absorption or 0.0), voltage=float(voltage),
                real=plan.real, absorptive=absorption is not None,
                absorption_method=absorption_method,
                mean_inner_potential_in_k=mean_inner_potential,
            )
        )  # fmt: skip
    g_cart = plan.g_cart
    k_hat = _beam_direction_np(np.asarray(crystal.real_basis), axis)
    s = bloch.excitation_errors(g_cart, k_hat, plan.wave_number)
    if not np.all(np.isfinite(values)):
        raise EdkitError("simulate_pattern produced non-finite intensities; check the structure")
    return xr.DataArray(
        values,
        dims=("thickness", "beam"),
        coords={
            "thickness": ("thickness", t, {"units": "angstrom", "long_name": "thickness"}),
            "h": ("beam", plan.hkl[:, 0]),
            "k": ("beam", plan.hkl[:, 1]),
            "l": ("beam", plan.hkl[:, 2]),
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
            "wave_number": plan.wave_number,
            "absorption": "none" if absorption is None else f"proportional kappa={absorption}",
            "absorption_method": absorption_method if absorption is not None else "none",
            "mean_inner_potential": int(mean_inner_potential),
            "prune_centring": int(prune_centring),
        },
    )
