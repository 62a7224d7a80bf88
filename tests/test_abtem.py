"""Cross-check of edkit's Bloch-wave intensities against abTEM's ``abtem.bloch.BlochWaves``.

abTEM is GPL-3.0: it is imported here only, never from ``edkit/`` (the ``abtem`` extra).

Case: silicon (Fd-3m, a = 5.431 Å, Si on 8a, U = 0), 200 kV, a general (non-zone-axis) beam
direction close to [110]: zone axis [1, 0.93, 0.04] (edkit's convention: the direction toward
the source; electrons travel along d = −[uvw]/|[uvw]|), g_max = 1.5 Å⁻¹, sg_max = 0.02 Å⁻¹.

How the two codes are made to compute the same thing (read from abTEM 1.0.11's ``bloch``):

- Geometry. ``BlochWaves(orientation_matrix=R)`` rotates the cell (each cell vector r → R r) and
  sends the electrons along +z of the rotated frame: its S_g = −g_z − λ|g|²/2 and its metric
  M_i = 1/sqrt(1 + g_z/K) use g_z = (R g)_z. So R's last row must be d (written in edkit's
  crystal-Cartesian frame, which for ase's cubic cell is the same frame); the in-plane part of R is
  irrelevant. Checked by comparing S_g of every hkl (≈1.5e-10 Å⁻¹ apart, from the CODATA edition).
- K = 1/λ (abTEM has no mean inner potential in K): edkit's ``mean_inner_potential=False``.
- Structure matrix: abTEM builds M(2K diag(S) + U)M with U = σ/(κλπ) F = (γ/π) F and
  propagates C' exp(iπ t v/K) with C = M C', i.e. ψ(t) = M exp(iπtA/K) M⁻¹ e₀: the same as edkit,
  M factors included. F(h) = (1/Ω) Σ f_j exp(+2πi h·x_j) on both sides; Lobato f(g) from g² in
  Å⁻¹ without 2π, f in Å, on both sides ("lobato"); no Debye–Waller (thermal_sigma = 0, Uiso = 0).
- abTEM tapers the scattering factors near its StructureFactor's g_max by default
  (cutoff="taper": 1/(1 + exp((g/g_max − 0.95)/0.005))); with the structure-factor g_max =
  2 × the beam g_max that would damp the longest couplings h_j − h_i, so ``cutoff="hard"`` is used
  (every |h_j − h_i| ≤ 2 g_max is then kept unmodified, as in edkit).
- abTEM drops beams forbidden by the lattice centering (auto-detected "F" for silicon); edkit
  keeps every hkl (those have F = 0 and are uncoupled). ``centering="P"`` makes the beam sets
  identical; the test also checks that the mixed-parity beams carry no intensity in edkit.
- abTEM computes in float32 by default; ``abtem.config.set({"precision": "float64"})`` is needed
  for a comparison beyond ≈2e-6.

Measured (float64): max relative intensity difference ≈4e-7 on beams brighter than 1e-3 through
``simulate_pattern``; it comes from the physical constants (abTEM uses ase's CODATA 2014 values,
edkit CODATA 2018: λ differs by 5e-9 relative, γ/π by 2e-9). Feeding abTEM's λ and σ/(κλπ) into
edkit's Bloch kernel brings it to ≈2e-12. Silicon is centrosymmetric, so this case does not test
the sign convention of F (quartz tests in test_pattern.py / test_bloch.py do).
"""

import numpy as np
import pytest

pytestmark = [pytest.mark.abtem]

abtem = pytest.importorskip("abtem")
abtem_bloch = pytest.importorskip("abtem.bloch")
abtem_energy = pytest.importorskip("abtem.core.energy")
abtem_constants = pytest.importorskip("abtem.core.constants")
ase_build = pytest.importorskip("ase.build")

import jax.numpy as jnp  # noqa: E402

from edkit.io.cif import read_cif  # noqa: E402
from edkit.physics import bloch  # noqa: E402
from edkit.physics.beams import coupling_indices  # noqa: E402
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables  # noqa: E402
from edkit.simulate.pattern import simulate_pattern  # noqa: E402

A_SI = 5.431  # Å
VOLTAGE = 200e3  # V
ZONE_AXIS = np.array([1.0, 0.93, 0.04])  # toward the source; a general direction near [110]
G_MAX = 1.5  # Å⁻¹
SG_MAX = 0.02  # Å⁻¹
THICKNESSES = np.array([50.0, 200.0, 500.0])  # Å
BRIGHT = 1e-3

SILICON_CIF = f"""data_silicon
_cell_length_a {A_SI}
_cell_length_b {A_SI}
_cell_length_c {A_SI}
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_space_group_name_H-M_alt 'F d -3 m :1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_U_iso_or_equiv
Si1 Si 0 0 0 0
"""


def _electron_direction() -> np.ndarray:
    """d = −[uvw]/|[uvw]| in the crystal-Cartesian frame (cubic: the basis is a·identity)."""
    return -ZONE_AXIS / np.linalg.norm(ZONE_AXIS)


def _orientation_matrix(d: np.ndarray) -> np.ndarray:
    """A rotation R with R d = +z (abTEM's direction of travel): rows e1, e2, d, right-handed."""
    e1 = np.cross(d, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)  # e1 × e2 = d
    return np.stack([e1, e2, d])


@pytest.fixture(scope="module")
def silicon(tmp_path_factory):
    path = tmp_path_factory.mktemp("abtem") / "silicon.cif"
    path.write_text(SILICON_CIF)
    return read_cif(path)


@pytest.fixture(scope="module")
def abtem_result():
    """abTEM's beams (hkl), excitation errors and intensities (n_t, n) in float64."""
    d = _electron_direction()
    rotation = _orientation_matrix(d)
    np.testing.assert_allclose(rotation @ d, [0.0, 0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-15)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    atoms = ase_build.bulk("Si", "diamond", a=A_SI, cubic=True)
    with abtem.config.set({"precision": "float64"}):
        structure_factor = abtem_bloch.StructureFactor(
            atoms,
            g_max=2 * G_MAX,
            parametrization="lobato",
            thermal_sigma=0.0,
            cutoff="hard",
            centering="P",
        )
        waves = abtem_bloch.BlochWaves(
            structure_factor,
            energy=VOLTAGE,
            sg_max=SG_MAX,
            g_max=G_MAX,
            orientation_matrix=rotation,
        )
        patterns = waves.calculate_diffraction_patterns(THICKNESSES, lazy=False)
        intensities = np.asarray(patterns.array)
    assert intensities.dtype == np.float64
    return np.asarray(waves.hkl), np.asarray(waves.excitation_errors()), intensities


@pytest.fixture(scope="module")
def edkit_result(silicon):
    pattern = simulate_pattern(
        silicon,
        ZONE_AXIS,
        THICKNESSES,
        voltage=VOLTAGE,
        g_max=G_MAX,
        sg_max=SG_MAX,
        mean_inner_potential=False,
        prune_centring=False,  # abTEM keeps the F-forbidden beams (centering="P"): same set
    )
    hkl = np.stack([pattern.h.values, pattern.k.values, pattern.l.values], axis=1)
    return hkl, pattern.excitation_error.values, pattern.values


def _order(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Indices into ``other`` of each row of ``reference`` (both sets must be equal)."""
    position = {tuple(int(x) for x in h): i for i, h in enumerate(other)}
    return np.array([position[tuple(int(x) for x in h)] for h in reference])


def test_same_beams_and_excitation_errors(abtem_result, edkit_result):
    hkl_a, s_a, _ = abtem_result
    hkl_e, s_e, _ = edkit_result
    assert len(hkl_e) > 40
    assert {tuple(h) for h in hkl_a.tolist()} == {tuple(h) for h in hkl_e.tolist()}
    assert len(hkl_a) == len(hkl_e)
    order = _order(hkl_e, hkl_a)
    # Same physical beam direction, same K = 1/λ (up to the CODATA edition, ≈1.5e-10 Å⁻¹ here).
    np.testing.assert_allclose(s_a[order], s_e, rtol=0, atol=1e-9)


def test_intensities_match_abtem(abtem_result, edkit_result):
    hkl_a, _, intensity_a = abtem_result
    hkl_e, _, intensity_e = edkit_result
    reference = intensity_a[:, _order(hkl_e, hkl_a)]
    bright = reference > BRIGHT
    assert np.all(bright.sum(axis=1) >= 8)  # a genuinely many-beam case at every thickness
    relative = np.abs(intensity_e - reference)[bright] / reference[bright]
    assert relative.max() < 1e-3, f"max relative difference {relative.max():.3e}"
    np.testing.assert_allclose(intensity_e, reference, rtol=0, atol=1e-6)
    # The mixed-parity beams abTEM's default ("F") centering would drop carry no intensity.
    mixed = np.ptp(hkl_e % 2, axis=1) != 0
    assert mixed.any()
    assert intensity_e[:, mixed].max() < 1e-20


def test_bloch_kernel_with_abtem_constants(silicon, abtem_result, edkit_result):
    """With abTEM's λ and σ/(κλπ) (CODATA 2014 via ase), edkit's kernel matches to ≈1e-12."""
    hkl_a, _, intensity_a = abtem_result
    hkl_e, _, _ = edkit_result
    wavelength = abtem_energy.energy2wavelength(VOLTAGE)
    prefactor = abtem_energy.energy2sigma(VOLTAGE) / (abtem_constants.kappa * wavelength * np.pi)
    k_mag = 1.0 / wavelength
    d = _electron_direction()
    g = hkl_e @ np.asarray(silicon.reciprocal_basis)
    differences, index = coupling_indices(hkl_e)
    f = structure_factors_of(
        structure_params(silicon), structure_tables(silicon), jnp.asarray(differences)
    )
    potential = prefactor * np.asarray(f)[index]
    s = -(g @ d) - np.sum(g * g, axis=1) / (2.0 * k_mag)
    intensity = np.asarray(
        bloch.bloch_intensities(
            jnp.asarray(s),
            jnp.asarray(g @ d),
            jnp.asarray(potential),
            k_mag,
            jnp.asarray(THICKNESSES),
        )
    )
    reference = intensity_a[:, _order(hkl_e, hkl_a)]
    bright = reference > BRIGHT
    relative = np.abs(intensity - reference)[bright] / reference[bright]
    assert relative.max() < 1e-9, f"max relative difference {relative.max():.3e}"
