"""Exact pruning of lattice-centring absences (F, I, C, R): the rule from the operators' centring
translations, F(h) = 0 on what it drops, unchanged intensities of single patterns and frames,
screw/glide absences kept, primitive crystals untouched."""

from pathlib import Path

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edkit.crystal import Crystal
from edkit.io.cif import read_cif
from edkit.physics.beams import centring_allowed, centring_translations, reflections_within
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables
from edkit.simulate.frames import build_frame_setup
from edkit.simulate.pattern import simulate_pattern
from edkit.simulate.stack import frame_intensity_stack
from edkit.simulate.synthetic import rotation_series

_ATOMS = "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n" + (
    "_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_U_iso_or_equiv\n"
)


def _cif(name: str, cell: str, symmetry: str, atoms: str) -> str:
    a, b, c, alpha, beta, gamma = cell.split()
    return (
        f"data_{name}\n_cell_length_a {a}\n_cell_length_b {b}\n_cell_length_c {c}\n"
        f"_cell_angle_alpha {alpha}\n_cell_angle_beta {beta}\n_cell_angle_gamma {gamma}\n"
        f"{symmetry}\n{_ATOMS}{atoms}\n"
    )


# Silicon, F d -3 m origin choice 1 (inversion centre off the origin: complex solve).
SILICON = _cif(
    "si", "5.431 5.431 5.431 90 90 90", "_space_group_name_H-M_alt 'F d -3 m :1'",
    "Si1 Si 0 0 0 0.005",
)  # fmt: skip
# Chalcopyrite CuFeS2, I -4 2 d (non-centrosymmetric; d-glide absences such as 002).
CHALCOPYRITE = _cif(
    "cufes2", "5.289 5.289 10.423 90 90 90", "_space_group_name_H-M_alt 'I -4 2 d'",
    "Cu1 Cu 0 0 0 0.010\nFe1 Fe 0 0 0.5 0.008\nS1 S 0.2574 0.25 0.125 0.008",
)  # fmt: skip
# Low albite NaAlSi3O8 in the non-standard C-1 cell, from an explicit symop loop (approximate
# coordinates of Harlow & Brown 1980, for this test only).
ALBITE = _cif(
    "albite", "8.137 12.785 7.158 94.26 116.60 87.71",
    "loop_\n_space_group_symop_operation_xyz\nx,y,z\n-x,-y,-z\nx+1/2,y+1/2,z\n-x+1/2,-y+1/2,-z",
    "Na Na 0.2684 0.0089 0.1466 0.025\nT1o Al 0.0090 0.1685 0.2089 0.006\n"
    "T1m Si 0.0038 0.8207 0.2374 0.006\nT2o Si 0.6918 0.1104 0.3152 0.006\n"
    "T2m Si 0.6813 0.8818 0.3606 0.006\nOA1 O 0.0048 0.1312 0.9668 0.010\n"
    "OA2 O 0.5922 0.9974 0.2804 0.010\nOBo O 0.8127 0.1096 0.1907 0.012\n"
    "OBm O 0.8199 0.8509 0.2585 0.012\nOCo O 0.0135 0.3027 0.2699 0.012\n"
    "OCm O 0.0237 0.6937 0.2290 0.012\nODo O 0.1968 0.1089 0.3890 0.012\n"
    "ODm O 0.1843 0.8684 0.4363 0.012",
)  # fmt: skip
# Bi2Te3, R -3 m on hexagonal axes (obverse: centring ±(2/3, 1/3, 1/3)).
BI2TE3 = _cif(
    "bi2te3", "4.386 4.386 30.497 90 90 120", "_space_group_name_H-M_alt 'R -3 m'",
    "Bi1 Bi 0 0 0.4001 0.010\nTe1 Te 0 0 0 0.010\nTe2 Te 0 0 0.7906 0.010",
)  # fmt: skip
#: name: (CIF, sublattice fraction, a tilted zone axis, g_max, sg_max)
CENTRED = {
    "silicon": (SILICON, 4, [1.0, 0.93, 0.04], 1.6, 0.03),
    "chalcopyrite": (CHALCOPYRITE, 2, [1.0, 0.21, 0.07], 1.4, 0.03),
    "albite": (ALBITE, 2, [0.13, 1.0, 0.31], 0.9, 0.02),
    "bi2te3": (BI2TE3, 3, [1.0, 0.17, 0.05], 1.2, 0.02),
}


@pytest.fixture(scope="module")
def crystals(tmp_path_factory) -> dict[str, Crystal]:
    folder: Path = tmp_path_factory.mktemp("centring")
    out = {}
    for name, (text, *_) in CENTRED.items():
        (folder / f"{name}.cif").write_text(text)
        out[name] = read_cif(folder / f"{name}.cif")
    return out


def _hkl(pattern) -> np.ndarray:
    return np.stack([pattern[n].values for n in ("h", "k", "l")], axis=1)


@pytest.mark.parametrize(
    ("symbol", "rule"),
    [
        ("P 21/c", lambda h, k, l: np.ones_like(h, dtype=bool)),
        ("C 1 2/c 1", lambda h, k, l: (h + k) % 2 == 0),
        ("A m m 2", lambda h, k, l: (k + l) % 2 == 0),
        ("I 4/m m m", lambda h, k, l: (h + k + l) % 2 == 0),
        ("F m -3 m", lambda h, k, l: ((h - k) % 2 == 0) & ((k - l) % 2 == 0)),
        ("R -3 m", lambda h, k, l: (-h + k + l) % 3 == 0),  # hexagonal axes, obverse
        ("R -3 m:R", lambda h, k, l: np.ones_like(h, dtype=bool)),  # primitive rhombohedral
    ],
)
def test_centring_rule_from_the_operators(symbol, rule) -> None:
    """The textbook conditions follow from the operators' pure translations, no letter table."""
    ops = list(gemmi.find_spacegroup_by_name(symbol).operations())
    rotations = np.array([op.rot for op in ops], dtype=float) / gemmi.Op.DEN
    translations = np.array([op.tran for op in ops], dtype=float) / gemmi.Op.DEN
    centring = centring_translations(rotations, translations)
    np.testing.assert_array_equal(centring[0], [0, 0, 0])
    box = np.stack(np.meshgrid(*[np.arange(-6, 7)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    np.testing.assert_array_equal(centring_allowed(box, centring), rule(*box.T))


def test_operators_without_centring_translations_prune_nothing() -> None:
    """A crystal is pruned by the centring its operators carry, not by its symbol."""
    centring = centring_translations(np.eye(3)[None], np.zeros((1, 3)))
    np.testing.assert_array_equal(centring, np.zeros((1, 3)))
    box = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 3]])
    assert centring_allowed(box, centring).all()


@pytest.mark.parametrize("name", list(CENTRED))
def test_pruning_is_exact(name, crystals) -> None:
    """What the centring drops has F = 0 (about 1/4, 1/2, 1/3 of the sphere for F, C/I, R), and
    a pattern keeps its intensities without those beams; glide absences stay."""
    crystal = crystals[name]
    _, fraction, axis, g_max, sg_max = CENTRED[name]
    reciprocal = np.asarray(crystal.reciprocal_basis)
    centring = centring_translations(crystal.rotations, crystal.translations)
    every = reflections_within(reciprocal, g_max)
    allowed_every = centring_allowed(every, centring)
    np.testing.assert_array_equal(
        reflections_within(reciprocal, g_max, centring), every[allowed_every]
    )  # the same order, filtered
    assert len(every) / allowed_every.sum() == pytest.approx(fraction, rel=0.05)

    options = {"g_max": g_max, "sg_max": sg_max}
    thickness = [80.0, 350.0, 900.0]
    pruned = simulate_pattern(crystal, axis, thickness, **options)
    full = simulate_pattern(crystal, axis, thickness, prune_centring=False, **options)
    assert pruned.attrs["prune_centring"] == 1 and full.attrs["prune_centring"] == 0
    hkl, hkl_full = _hkl(pruned), _hkl(full)
    allowed = centring_allowed(hkl_full, centring)
    np.testing.assert_array_equal(hkl, hkl_full[allowed])
    # The fraction kept depends on the orientation (Si near [110]: 1/2 of its zero layer).
    assert len(hkl_full) / len(hkl) > 1.5 and len(hkl) > 25
    reference = full.values[:, allowed]
    assert (reference[:, 1:] > 1e-3).sum() >= 5  # a many-beam case
    np.testing.assert_allclose(pruned.values, reference, rtol=1e-10, atol=1e-13)
    assert full.values[:, ~allowed].max() < 1e-20

    with jax.enable_x64(True):  # one call for the sphere and the pattern: one set of compiles
        f = np.abs(
            structure_factors_of(
                structure_params(crystal),
                structure_tables(crystal),
                jnp.asarray(np.concatenate([every, hkl])),
            )
        )
    f_every, f_pattern = f[: len(every)], f[len(every) :]
    assert f_every[~allowed_every].max() < 1e-12 * f.max()
    assert np.median(f_every[allowed_every][1:]) > 1e-4 * f.max()
    if name in ("silicon", "chalcopyrite"):
        # Glide absences (F = 0 but allowed by the centring, e.g. Si 200 or 222) stay: double
        # diffraction gives them intensity.
        glide = f_pattern < 1e-12 * f.max()
        assert glide.any() and pruned.values[:, glide].max() > 1e-9  # centring ones: < 1e-20


def test_primitive_crystal_is_unchanged(data_dir) -> None:
    quartz = read_cif(data_dir / "structures" / "quartz.cif")
    options = {"g_max": 1.2, "sg_max": 0.03}
    pruned = simulate_pattern(quartz, [1.0, 0.13, 0.27], [100.0, 400.0], **options)
    full = simulate_pattern(
        quartz, [1.0, 0.13, 0.27], [100.0, 400.0], prune_centring=False, **options
    )
    np.testing.assert_array_equal(_hkl(pruned), _hkl(full))
    np.testing.assert_array_equal(pruned.values, full.values)


@pytest.mark.slow  # ≥ 12 s; runs in CI's test-slow
def test_frame_intensities_unchanged_by_pruning(crystals) -> None:
    """Albite frames (C: half the strong and half the Bethe weak beams): the same intensities.
    (One compiled case, Bethe on, to keep the test fast: the strong beams' solve is the plain
    route's, and the setups without weak beams prune the same way.)"""
    crystal = crystals["albite"]
    geometry = rotation_series(
        cell=crystal.cell, alpha_start=-23.0, alpha_step=31.0, n_frames=2, semiangle=0.5
    )
    options = {"g_max": 1.0, "sg_max": 0.01, "n_sub": 4}
    plain = build_frame_setup(crystal, geometry, **options)
    plain_full = build_frame_setup(crystal, geometry, prune_centring=False, **options)
    # One padded size (pad_to) for both: one bucket each and fewer compiles.
    bethe = {"sg_weak": 0.02, "pad_to": 64, **options}
    pruned = build_frame_setup(crystal, geometry, **bethe)
    full = build_frame_setup(crystal, geometry, prune_centring=False, **bethe)
    assert len(pruned.bucket_sizes) == len(full.bucket_sizes) == 1
    assert pruned.settings["prune_centring"] == 1 and full.settings["prune_centring"] == 0
    np.testing.assert_array_equal(plain.hkl, pruned.hkl[:, : plain.hkl.shape[1]])
    np.testing.assert_array_equal(plain_full.hkl, full.hkl[:, : plain_full.hkl.shape[1]])
    assert full.n_beams.sum() / pruned.n_beams.sum() == pytest.approx(2, rel=0.2)
    assert full.n_weak.sum() / pruned.n_weak.sum() == pytest.approx(2, rel=0.2)
    thickness = np.array([[150.0, 600.0]] * 2)
    with jax.enable_x64(True):
        params, tables = structure_params(crystal), structure_tables(crystal)
        i_pruned, i_full = (
            np.asarray(frame_intensity_stack(params, tables, setup, jnp.asarray(thickness)))
            for setup in (pruned, full)
        )
    centring = centring_translations(crystal.rotations, crystal.translations)
    for f in range(2):
        weak, weak_full = (s.weak_hkl[f][s.weak_valid[f]] for s in (pruned, full))  # type: ignore[index]
        np.testing.assert_array_equal(weak, weak_full[centring_allowed(weak_full, centring)])
        hkl, hkl_full = pruned.hkl[f][pruned.valid[f]], full.hkl[f][full.valid[f]]
        allowed = centring_allowed(hkl_full, centring)
        np.testing.assert_array_equal(hkl, hkl_full[allowed])
        reference = i_full[f][:, full.valid[f]]
        np.testing.assert_allclose(
            i_pruned[f][:, pruned.valid[f]], reference[:, allowed], rtol=1e-10, atol=1e-13
        )
        assert reference[:, ~allowed].max() < 1e-20
        assert (reference[:, allowed][:, 1:] > 1e-4).sum() >= 6
