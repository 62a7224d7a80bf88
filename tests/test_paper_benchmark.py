"""The paper's synthetic quartz benchmark with the default recipe (slow; ``benchmarks/
paper_benchmarks.py`` is the full table, with the clean regeneration and search–refine cycles).

The shared ``quartz_synthetic.cif_pets`` was made by the paper's PyTorch code from
``quartz_kinematical.cif``. From ``quartz_displaced_02.cif`` (0.16 Å RMS from the truth, ADPs
reset), ``Refinement.fit()`` with no option beyond the compat transform's
(``edkit.compat.diffbloch_paper``: the generator's lattice, tilt sum, moving average, voltage,
g cap) must end within 0.005 Å RMS of the true positions and 0.002 Å² of every true Ueq, on
every 10th frame (10 frames, a few minutes).

Not here, because they do not hold yet (figures in the README): the same from
``quartz_displaced_03.cif`` (0.29 Å: 0.057 Å), and the clean regeneration with edkit's physics
from either start, where the first thickness search, made with the displaced structure, lands
in wrong Pendellösung minima at these 1300–2000 Å thicknesses.
"""

import numpy as np
import pytest

import edkit
from edkit.compat import diffbloch_paper
from edkit.io.pets import select_frames


def _position_rms(crystal: edkit.Crystal, truth: edkit.Crystal) -> float:
    delta = (np.asarray(crystal.fract) - np.asarray(truth.fract) + 0.5) % 1.0 - 0.5
    return float(np.sqrt(np.mean(np.sum((delta @ np.asarray(truth.real_basis)) ** 2, axis=1))))


@pytest.mark.slow
def test_default_recipe_recovers_the_truth_from_displaced_02(data_dir) -> None:
    truth = edkit.read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    full = edkit.read_pets(data_dir / "pets" / "quartz_synthetic.cif_pets")
    paper = select_frames(full, slice(0, None, 10))
    start = edkit.read_cif(data_dir / "structures" / "quartz_displaced_02.cif")
    assert _position_rms(start, truth) > 0.15
    numerics = diffbloch_paper(paper, start)
    refinement = edkit.Refinement(
        numerics.crystal, numerics.dataset, progress=False, **numerics.refinement_options
    )
    refinement.fit(progress=False)
    refined = refinement.crystal
    rms = _position_rms(refined, truth)
    ueq_error = np.abs(refined.u_iso_equivalent - truth.u_iso_equivalent).max()
    print(f"compat 02: {rms:.4f} Å, max ΔUeq {ueq_error:.4f} Å², {refinement.messages}")
    assert rms <= 0.005
    assert ueq_error <= 0.002
