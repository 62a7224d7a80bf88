"""Absolute structure (edkit.refine.absolute): the inverse of a structure, the hand statistics,
and real quartz telling its hand (slow)."""

import numpy as np
import pytest

import edkit
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables
from edkit.refine import absolute
from edkit.refine.absolute import (
    absolute_structure,
    compare_hands,
    hamilton_significance,
    hand_z_score,
    inverted_crystal,
)


def test_the_inverse_conjugates_every_structure_factor_and_names_the_partner_group() -> None:
    crystal = edkit.read_cif(edkit.example_file("quartz_kinematical.cif"))
    inverse = inverted_crystal(crystal)
    assert crystal.space_group == "P 32 2 1" and inverse.space_group == "P 31 2 1"
    hkl = np.array([[1, 0, 0], [1, 0, 1], [1, 0, -1], [1, 1, 2], [2, 0, 1], [0, 0, 3]])
    f = np.asarray(structure_factors_of(structure_params(crystal), structure_tables(crystal), hkl))
    f_inv = np.asarray(
        structure_factors_of(structure_params(inverse), structure_tables(inverse), hkl)
    )
    assert np.abs(f.imag).max() > 1e-3  # quartz is not centrosymmetric
    np.testing.assert_allclose(f_inv, np.conj(f), atol=1e-12)
    twice = inverted_crystal(inverse)
    assert twice.space_group == crystal.space_group
    for a, b in ((twice.fract, crystal.fract), (twice.translations, crystal.translations)):
        np.testing.assert_allclose((a - b + 0.5) % 1.0 - 0.5, 0.0, atol=1e-12)


def test_hand_statistics() -> None:
    rng = np.random.default_rng(0)
    given = rng.uniform(0.05, 0.08, 30)
    z, n = hand_z_score(given, given + 0.01 + rng.normal(0, 0.005, 30))
    assert n == 30 and z > 5
    z_swapped, _ = hand_z_score(given + 0.01, given)
    assert z_swapped < -5
    assert np.isnan(hand_z_score(given[:1], given[:1])[0])
    # Hamilton: equal fits are not significant, a clearly worse one is.
    assert hamilton_significance(0.05, 0.05, 1000, 14) == pytest.approx(1.0)
    assert hamilton_significance(0.05, 0.06, 1000, 14) < 1e-6


@pytest.mark.slow
def test_real_quartz_tells_its_hand(data_dir) -> None:
    """Real quartz, every 4th frame: the given (kinematical) structure and its inverse refined
    the same way; the given hand is preferred with |z| ≥ 3, and from the inverted start (the
    same two refinements, roles swapped: the inverse of the inverse is the given structure)
    the inverted one is."""
    crystal = edkit.read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    data = edkit.select_frames(
        edkit.read_pets(data_dir / "pets" / "quartz_experimental.cif_pets"), slice(0, None, 4)
    )
    hands = absolute_structure(crystal, data, fit={"max_steps": 60, "searches": 0})
    print(hands)
    assert hands.preferred == "given" and hands.z_score >= 3 and hands.determined
    assert hands.hamilton_alpha < 0.01
    swapped = compare_hands(hands.inverted, hands.given)
    assert swapped.preferred == "inverted"  # from the inverted start: its inverse fits better
    assert swapped.z_score == pytest.approx(-hands.z_score)
    record = hands.as_dict()
    assert set(record) >= {"z_score", "r_obs_given", "r_obs_inverted", "preferred"}


def test_both_hands_refine_from_one_kinematical_start(data_dir, monkeypatch) -> None:
    """The inverted hand starts from the inverse of the start the given hand had (its
    kinematical start, where one was made) and makes none of its own: a far-off model's two
    hands are then each other's inverse. Refinement and the comparison are stubbed."""
    crystal = edkit.read_cif(data_dir / "structures" / "quartz_displaced_03.cif")
    fitted = edkit.read_cif(data_dir / "structures" / "quartz.cif")  # stands for the start's fit
    made: list[tuple[object, dict]] = []

    class Stub:
        def __init__(self, start, dataset, progress=None, **options) -> None:
            made.append((start, options))
            self.start_crystal = fitted if options.get("kinematic_start", "auto") else start

        def fit(self, **_) -> None:
            pass

    monkeypatch.setattr(absolute, "Refinement", Stub)
    monkeypatch.setattr(absolute, "compare_hands", lambda given, inverted: (given, inverted))
    absolute_structure(crystal, None, g_max=1.0)
    (first, given_options), (second, inverted_options) = made
    assert first is crystal and given_options == {"g_max": 1.0}
    assert inverted_options == {"g_max": 1.0, "kinematic_start": False}
    np.testing.assert_allclose(second.fract, inverted_crystal(fitted).fract)
