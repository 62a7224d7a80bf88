"""Property-based tests (hypothesis) of the public simulation path on random small crystals:
random space groups of every crystal system, random cells of that system, 1–3 random atoms in
general positions (expanded by gemmi through ``read_cif``), random orientations and
thicknesses. For every such crystal ``simulate_pattern`` must

- conserve the flux Σ_g (1 + g_n/K) I_g = 1 without absorption (science.md §4's metric;
  the plain sum is not conserved off normal incidence), and lose intensity monotonically with
  thickness with absorption (U' = κU);
- give the incident beam alone at t = 0;
- agree between its eigen route and the matrix exponential (with absorption);
- give equal intensities to reflections related by a symmetry operation that fixes the beam
  direction (a zone axis along a rotation axis or in a mirror plane: the experiment maps onto
  itself, so h and hR are equivalent);
- obey Friedel's law I(h) = I(−h) at a zone axis with zero-layer beams when the crystal is
  centrosymmetric, and break it (beyond 1 %) when it is not (P1, three atoms): dynamical
  diffraction sees the absence of an inversion centre, which is what makes absolute structure
  determinable from electrons;
- have structure gradients (d Σ w I / d fractional coordinates) equal to central differences.

Derandomised like test_kernel_properties.py; EDKIT_FUZZ_EXAMPLES and EDKIT_FUZZ_RANDOM=1 explore
further.
"""

import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from edkit import EdkitError
from edkit.crystal import Crystal
from edkit.io.cif import read_cif
from edkit.physics.structure import structure_params
from edkit.simulate.pattern import beam_direction, make_pattern_model, simulate_pattern

FUZZ = settings(
    max_examples=int(os.environ.get("EDKIT_FUZZ_EXAMPLES", "12")),
    derandomize=os.environ.get("EDKIT_FUZZ_RANDOM") != "1",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: each example compiles
)
#: Space groups by crystal system (H-M symbols gemmi reads; monoclinic with unique axis b).
GROUPS = {
    "triclinic": ["P 1", "P -1"],
    "monoclinic": ["P 1 2/m 1", "P 1 21/c 1", "C 1 2/c 1"],
    "orthorhombic": ["P m m m", "P n m a", "P 21 21 21"],
    "tetragonal": ["P 4/m m m", "I 4/m", "P -4 21 m"],
    "hexagonal": ["P 6/m m m", "P 63 m c", "P 32 2 1", "P -3 m 1"],
    "cubic": ["F m -3 m", "P 21 3"],
}
ELEMENTS = ["C", "O", "Mg", "Si", "Fe"]
#: Zone axes tried for a symmetric orientation (short repeats: few higher-layer beams).
AXES = [(0, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 0), (1, -1, 0), (1, 1, 1), (1, 0, 1), (0, 1, 1)]


def _cell(draw, system: str) -> tuple[float, ...]:
    length = st.floats(4.0, 7.0)
    a, b, c = draw(length), draw(length), draw(length)
    if system == "triclinic":
        return a, b, c, draw(st.floats(80, 100)), draw(st.floats(80, 100)), draw(st.floats(80, 100))
    if system == "monoclinic":
        return a, b, c, 90.0, draw(st.floats(95, 115)), 90.0
    if system == "orthorhombic":
        return a, b, c, 90.0, 90.0, 90.0
    if system == "tetragonal":
        return a, a, c, 90.0, 90.0, 90.0
    if system == "hexagonal":
        return a, a, c, 90.0, 90.0, 120.0
    return a, a, a, 90.0, 90.0, 90.0


def _cif_text(group: str, cell: tuple[float, ...], atoms: list[tuple]) -> str:
    names = ("a", "b", "c", "alpha", "beta", "gamma")
    lines = ["data_random"]
    lines += [f"_cell_{'length' if i < 3 else 'angle'}_{n} {v:.5f}" for i, (n, v) in
              enumerate(zip(names, cell, strict=True))]  # fmt: skip
    lines += [f"_symmetry_space_group_name_H-M '{group}'", "loop_"]
    lines += [f"_atom_site_{n}" for n in ("label", "type_symbol", "fract_x", "fract_y",
                                          "fract_z", "U_iso_or_equiv")]  # fmt: skip
    for i, (element, x, y, z, u) in enumerate(atoms):
        lines.append(f"{element}{i + 1} {element} {x:.5f} {y:.5f} {z:.5f} {u:.4f}")
    return "\n".join(lines) + "\n"


def _read(text: str) -> Crystal:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.cif"
        path.write_text(text)
        try:
            return read_cif(path)
        except EdkitError:
            assume(False)  # e.g. an atom too near a special position: not this test's subject
            raise


@st.composite
def crystals(draw, groups: list[str] | None = None, n_atoms=(1, 3)) -> Crystal:
    """A random crystal of a random space group (or one of ``groups``)."""
    if groups is None:
        system = draw(st.sampled_from(sorted(GROUPS)))
        group = draw(st.sampled_from(GROUPS[system]))
    else:
        group = draw(st.sampled_from(groups))
        system = next(s for s, names in GROUPS.items() if group in names)
    cell = _cell(draw, system)
    coordinate = st.floats(0.03, 0.97)
    atoms = [
        (draw(st.sampled_from(ELEMENTS)), draw(coordinate), draw(coordinate), draw(coordinate),
         draw(st.floats(0.004, 0.02)))
        for _ in range(draw(st.integers(*n_atoms)))
    ]  # fmt: skip
    return _read(_cif_text(group, cell, atoms))


def _by_hkl(pattern) -> dict[tuple[int, int, int], np.ndarray]:
    hkl = np.stack([pattern[c].values for c in ("h", "k", "l")], axis=1)
    return {tuple(int(i) for i in row): pattern.values[:, j] for j, row in enumerate(hkl)}


def _fixing_operations(crystal: Crystal, axis: tuple[int, int, int]) -> list[np.ndarray]:
    """The point operations (fractional R, integer) that fix the direct-space direction axis."""
    v = np.asarray(axis, dtype=float)
    # Distinct rotations: a centred cell repeats each one with every centring translation.
    rotations = np.unique(np.rint(np.asarray(crystal.rotations)).astype(int), axis=0)
    return [r for r in rotations if np.allclose(r @ v, v)]


def _zero_layer_sg(crystal: Crystal, axis: tuple[int, int, int]) -> float:
    """An S_g bound that keeps the higher Laue layers out at the zone axis ``axis``: a third of
    the layer spacing 1/|axis| (Å⁻¹)."""
    return float(0.3 / np.linalg.norm(np.asarray(axis, dtype=float) @ crystal.real_basis))


ORIENTATION = st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(0.2, 1)).filter(
    lambda v: np.linalg.norm(v) > 0.3
)


@pytest.mark.slow  # 31 s: three solves per example, each a new shape to compile
@FUZZ
@given(crystal=crystals(), axis=ORIENTATION, t=st.floats(50.0, 1500.0))
def test_intensity_is_conserved_and_absorbed(crystal, axis, t) -> None:
    thickness = [0.0, 0.5 * t, t]
    pattern = simulate_pattern(crystal, list(axis), thickness, g_max=1.2, sg_max=0.04)
    k_hat = beam_direction(crystal.real_basis, list(axis))
    wave_number = make_pattern_model(crystal, list(axis), g_max=1.2, sg_max=0.04).wave_number
    hkl = np.stack([pattern[c].values for c in ("h", "k", "l")], axis=1)
    g_normal = (hkl @ crystal.reciprocal_basis) @ np.asarray(k_hat)
    flux = pattern.values @ (1.0 + g_normal / float(wave_number))
    np.testing.assert_allclose(flux, 1.0, rtol=1e-9)
    start = _by_hkl(pattern)
    assert abs(start.pop((0, 0, 0))[0] - 1.0) < 1e-12
    assert all(abs(v[0]) < 1e-12 for v in start.values())
    absorbed = simulate_pattern(
        crystal, list(axis), thickness, g_max=1.2, sg_max=0.04, absorption=0.05
    )
    lost = absorbed.values.sum(axis=1)
    assert abs(lost[0] - 1.0) < 1e-12 and lost[1] < 1.0 and lost[2] < lost[1]
    reference = simulate_pattern(
        crystal, list(axis), thickness, g_max=1.2, sg_max=0.04, absorption=0.05,
        absorption_method="expm",
    )  # fmt: skip
    np.testing.assert_allclose(absorbed.values, reference.values, atol=1e-9)


@FUZZ
@given(crystal=crystals(), data=st.data())
def test_symmetry_equivalent_reflections_are_equal(crystal, data) -> None:
    candidates = [a for a in AXES if len(_fixing_operations(crystal, a)) > 1]
    assume(candidates)  # a triclinic crystal has no operation that fixes a direction
    axis = data.draw(st.sampled_from(candidates))
    operations = _fixing_operations(crystal, axis)
    pattern = _by_hkl(simulate_pattern(crystal, list(axis), [200.0, 700.0], g_max=1.0, sg_max=0.03))
    compared = 0
    for hkl, values in pattern.items():
        for rotation in operations:
            partner = tuple(int(i) for i in np.asarray(hkl) @ rotation)
            if partner in pattern:
                np.testing.assert_allclose(pattern[partner], values, atol=1e-10, err_msg=str(hkl))
                compared += partner != hkl
    assert compared > 0


CENTROSYMMETRIC = ["P -1", "P 1 2/m 1", "P 1 21/c 1", "P m m m", "P n m a", "P 4/m m m",
                   "P -3 m 1"]  # fmt: skip


@FUZZ
@given(crystal=crystals(CENTROSYMMETRIC), axis=st.sampled_from(AXES[:5]))
def test_friedel_law_holds_for_centrosymmetric_crystals(crystal, axis) -> None:
    pattern = simulate_pattern(
        crystal, list(axis), [300.0, 900.0], g_max=1.0, sg_max=_zero_layer_sg(crystal, axis)
    )
    intensities = _by_hkl(pattern)
    assume(all(np.dot(hkl, axis) == 0 for hkl in intensities))  # zero layer only
    for (h, k, l), values in intensities.items():
        np.testing.assert_allclose(intensities[(-h, -k, -l)], values, atol=1e-10)


@FUZZ
@given(crystal=crystals(["P 1"], n_atoms=(3, 3)))
def test_friedel_law_breaks_without_an_inversion_centre(crystal) -> None:
    """Three atoms in P1 (at least one heavier than O: couplings strong enough at 1200 Å)."""
    assume(any(e in ("Mg", "Si", "Fe") for e in crystal.elements))
    axis = (0, 0, 1)
    pattern = simulate_pattern(
        crystal, list(axis), [1200.0], g_max=1.2, sg_max=_zero_layer_sg(crystal, axis)
    )
    intensities = {hkl: v[0] for hkl, v in _by_hkl(pattern).items()}
    assume(all(l == 0 for _, _, l in intensities))
    gaps = [
        abs(v - intensities[(-h, -k, -l)]) / (v + intensities[(-h, -k, -l)])
        for (h, k, l), v in intensities.items()
        if (h, k, l) != (0, 0, 0) and v > 1e-3 and (-h, -k, -l) in intensities
    ]
    assert gaps and max(gaps) > 0.01


@pytest.mark.slow  # 38 s: a gradient and central differences per coordinate
@settings(FUZZ, max_examples=max(3, FUZZ.max_examples // 3))
@given(crystal=crystals(n_atoms=(1, 2)), axis=ORIENTATION)
def test_structure_gradient_matches_central_differences(crystal, axis) -> None:
    model = make_pattern_model(crystal, list(axis), g_max=0.9, sg_max=0.03)
    params = structure_params(crystal)
    weights = jnp.linspace(1.0, 2.0, len(model.hkl))
    thickness = jnp.array([250.0, 600.0])
    zone = jnp.asarray(axis, dtype=float)

    def loss(fract):
        intensities = model.intensities(params._replace(fract=fract), thickness, zone)
        return jnp.sum(intensities * weights[None, :])

    with jax.enable_x64(True):
        fract = jnp.asarray(params.fract, dtype=jnp.float64)
        gradient = np.asarray(jax.grad(loss)(fract)).ravel()
        step = 1e-6
        for index in range(fract.size):
            shift = np.zeros(fract.size)
            shift[index] = step
            shift = jnp.asarray(shift.reshape(fract.shape))
            central = (loss(fract + shift) - loss(fract - shift)) / (2 * step)
            np.testing.assert_allclose(gradient[index], central, rtol=1e-5, atol=1e-8)
