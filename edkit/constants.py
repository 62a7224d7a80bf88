"""Physical constants (CODATA 2018, one edition only) and relativistic electron optics.

Units: lengths in Å, reciprocal lengths in Å⁻¹ without 2π, voltages in V (science.md §2).
"""

import math

# CODATA 2018 exact / recommended values, SI.
PLANCK_H = 6.62607015e-34  # J s
SPEED_OF_LIGHT = 299792458.0  # m / s
ELEMENTARY_CHARGE = 1.602176634e-19  # C
ELECTRON_MASS = 9.1093837015e-31  # kg
ELECTRON_REST_ENERGY_EV = ELECTRON_MASS * SPEED_OF_LIGHT**2 / ELEMENTARY_CHARGE  # ≈ 510998.95 eV
HC_EV_ANGSTROM = PLANCK_H * SPEED_OF_LIGHT / ELEMENTARY_CHARGE * 1e10  # ≈ 12398.42 eV Å

#: A file's wavelength within this relative distance of 200 kV is snapped to 200 kV (PETS rounds λ).
SNAP_RELATIVE_TOLERANCE = 0.005
SNAP_VOLTAGE = 200e3


def electron_wavelength(voltage: float) -> float:
    """Relativistic electron wavelength λ in Å for an accelerating voltage in V.

    λ = hc / sqrt(eE (2 m_e c² + eE)); 200 kV gives 0.0250793 Å.
    """
    energy = float(voltage)
    return HC_EV_ANGSTROM / math.sqrt(energy * (2.0 * ELECTRON_REST_ENERGY_EV + energy))


def voltage_from_wavelength(wavelength: float, *, snap: bool = True) -> float:
    """Accelerating voltage in V from a wavelength in Å (inverse of :func:`electron_wavelength`).

    With ``snap`` a wavelength within 0.5 % of the 200 kV value returns exactly 200 kV, since PETS
    writes λ rounded to a few digits (0.02510 Å). Other voltages are returned as computed (a
    0.0335 Å dataset is a genuine ≈120 kV one).
    """
    photon = HC_EV_ANGSTROM / float(wavelength)
    energy = math.sqrt(ELECTRON_REST_ENERGY_EV**2 + photon**2) - ELECTRON_REST_ENERGY_EV
    if snap and abs(energy - SNAP_VOLTAGE) <= SNAP_RELATIVE_TOLERANCE * SNAP_VOLTAGE:
        return SNAP_VOLTAGE
    return energy


def lorentz_factor(voltage: float) -> float:
    """γ = 1 + eE / (m_e c²), dimensionless; 200 kV gives 1.391390."""
    return 1.0 + float(voltage) / ELECTRON_REST_ENERGY_EV


def interaction_constant(voltage: float) -> float:
    """σ = 2π γ m_e e λ / h² in V⁻¹ Å⁻¹; 200 kV gives 7.288401e-4."""
    wavelength_m = electron_wavelength(voltage) * 1e-10
    sigma_si = (
        2.0
        * math.pi
        * lorentz_factor(voltage)
        * ELECTRON_MASS
        * ELEMENTARY_CHARGE
        * wavelength_m
        / PLANCK_H**2
    )  # V⁻¹ m⁻¹
    return sigma_si * 1e-10


def potential_prefactor(voltage: float) -> float:
    """γ/π, the factor turning structure factors F (Å⁻²) into U_g = (γ/π) F_g (Å⁻²)."""
    return lorentz_factor(voltage) / math.pi
