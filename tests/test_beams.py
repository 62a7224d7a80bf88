"""Beam bookkeeping (edkit.physics.beams): the dense-table hkl differences against np.unique, and
the beam selection's order."""

import numpy as np
import pytest

from edkit.errors import EdkitError
from edkit.io.cif import read_cif
from edkit.physics import beams
from edkit.physics.beams import (
    coupling_indices,
    excitation_errors_np,
    index_differences,
    reflections_within,
    select_beams,
)


def _unique_reference(h_from: np.ndarray, h_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the sort-based bookkeeping gave: np.unique over every difference."""
    diff = (h_to[None, :, :] - h_from[:, None, :]).reshape(-1, 3)
    differences, inverse = np.unique(diff, axis=0, return_inverse=True)
    return differences, inverse.reshape(len(h_from), len(h_to))


@pytest.mark.parametrize("seed", range(6))
def test_coupling_indices_equal_np_unique(seed: int) -> None:
    rng = np.random.default_rng(seed)
    hkl = rng.integers(-9, 10, size=(int(rng.integers(1, 80)), 3))
    hkl[:, int(rng.integers(3))] *= 3  # unequal extents per axis
    differences, index = coupling_indices(hkl)
    reference, inverse = _unique_reference(hkl, hkl)
    np.testing.assert_array_equal(differences, reference)
    np.testing.assert_array_equal(index, inverse)
    np.testing.assert_array_equal(differences[index], hkl[None, :, :] - hkl[:, None, :])


def test_index_differences_over_pairs_and_into_out() -> None:
    """Several (from, to) pairs share one sorted list; ``out`` views receive the indices."""
    rng = np.random.default_rng(7)
    strong = rng.integers(-6, 7, size=(30, 3))
    weak = rng.integers(-11, 12, size=(17, 3))
    other = rng.integers(-3, 4, size=(5, 3))
    pairs = [(strong, strong), (strong, weak), (weak, strong), (other, other)]
    padded = np.full((4, 40, 40), -1, dtype=np.int32)
    out = [padded[i, : len(f), : len(t)] for i, (f, t) in enumerate(pairs)]
    differences, indices = index_differences(pairs, out)
    every = np.concatenate([(t[None] - f[:, None]).reshape(-1, 3) for f, t in pairs])
    np.testing.assert_array_equal(differences, np.unique(every, axis=0))
    for (f, t), index, view in zip(pairs, indices, out, strict=True):
        assert index is view
        np.testing.assert_array_equal(differences[index], t[None, :, :] - f[:, None, :])
    assert (padded[3, 5:, :] == -1).all() and (padded[0, :30, 30:] == -1).all()  # untouched


def test_index_differences_sorting_fallback(monkeypatch) -> None:
    """Boxes above the dense-table limit take the sorting route, with the same answer."""
    rng = np.random.default_rng(3)
    hkl = rng.integers(-40, 41, size=(60, 3))
    dense = coupling_indices(hkl)
    monkeypatch.setattr(beams, "DENSE_TABLE_LIMIT", 100)
    sorted_route = coupling_indices(hkl)
    np.testing.assert_array_equal(dense[0], sorted_route[0])
    np.testing.assert_array_equal(dense[1], sorted_route[1])
    np.testing.assert_array_equal(dense[0], _unique_reference(hkl, hkl)[0])


def test_index_differences_edge_cases() -> None:
    differences, (index,) = index_differences([(np.zeros((0, 3), int), np.ones((2, 3), int))])
    assert differences.shape == (0, 3) and index.shape == (0, 2)
    differences, index = coupling_indices(np.array([[2, -1, 5]]))
    np.testing.assert_array_equal(differences, [[0, 0, 0]])
    np.testing.assert_array_equal(index, [[0]])
    with pytest.raises(EdkitError, match="out"):
        index_differences([(np.zeros((2, 3), int), np.zeros((2, 3), int))], [np.zeros((3, 2))])


@pytest.mark.parametrize("name", ["cspbbr3", "quartz", "glycine", "borane"])
def test_select_beams_is_reflections_within_filtered(name, data_dir) -> None:
    """The analytic cut of each (h, k) column near the Ewald sphere loses no beam and adds
    none: the same beams, in the same order, as filtering the sorted sphere by |S_g| (000
    first), at zone axes and at random directions, thin and thick shells."""
    crystal = read_cif(data_dir / "structures" / f"{name}.cif")
    reciprocal = np.asarray(crystal.reciprocal_basis)
    rng = np.random.default_rng(11)
    directions = [-np.eye(3)[i] @ np.asarray(crystal.real_basis) for i in range(3)]
    directions += [-np.array([1.0, 0.03, 0.01]) @ np.asarray(crystal.real_basis)]
    directions += list(rng.normal(size=(12, 3)))
    k_mag = 39.87
    total = 0
    for trial, direction in enumerate(directions):
        k_hat = direction / np.linalg.norm(direction)
        g_max, sg_max = (
            (1.5, 0.02) if trial < 4 else (rng.uniform(0.6, 2.2), rng.uniform(0.003, 0.08))
        )
        sphere = reflections_within(reciprocal, g_max)
        g = np.linalg.norm(sphere @ reciprocal, axis=1)
        assert g[0] == 0 and np.all(np.diff(g) > -1e-12) and g[-1] <= g_max + 1e-12
        s = excitation_errors_np(sphere @ reciprocal, k_hat, k_mag)
        keep = np.abs(s) <= sg_max
        keep[0] = True
        chosen = select_beams(reciprocal, k_hat, k_mag, g_max, sg_max)
        np.testing.assert_array_equal(chosen, sphere[keep])
        total += len(chosen)
    assert total > 1000
