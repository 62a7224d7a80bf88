"""The paper's synthetic quartz benchmark with the default recipe (the clean regenerations in
the slow run, the compat transform in ``make test-benchmarks``; ``benchmarks/paper_benchmarks.py``
is the full table).

The shared ``quartz_synthetic.cif_pets`` was made by the paper's PyTorch code from
``quartz_kinematical.cif``. ``Refinement.fit()`` (the default recipe: Adam until converged, the
thickness search again from the refined structure, LM; before it, where the start fits its first
thickness search at a mean R_obs above 17 %, the kinematical start) must end within 0.005 Å
RMS of the true positions and 0.002 Å² of every true Ueq, on every 10th frame (10 frames), from

- ``quartz_displaced_02.cif`` (0.16 Å RMS from the truth, ADPs reset) on the file itself
  through the compat transform (``edkit.compat.diffbloch_paper``: the generator's lattice,
  tilt sum, moving average, voltage, g cap; no other option);
- ``quartz_displaced_02.cif`` and ``_03.cif`` (0.29 Å) on the clean regeneration of the same
  header with edkit's own physics (``edkit.simulate.synthetic.make_dataset``; the generator's
  platelet law t = 1309 Å / cos(α + 0.1°), fitted in notebook 07; Poisson noise). From
  ``_03`` with the defaults: the kinematical start is made (R_obs 63 %) and finds the thickness.
  From ``_02`` without it (``kinematic_start=False``, the default before 2026-12-06): the first
  thickness search, made with the displaced structure, lands in wrong Pendellösung minima at
  these 1300–2000 Å and the search from the refined structure finds them again (the restarts'
  path, which the default takes where a start fits its search below 17 % yet is off).
"""

import numpy as np
import pytest

import edkit
from edkit.compat import diffbloch_paper
from edkit.io.pets import select_frames
from edkit.simulate.synthetic import make_dataset

#: The paper file's platelet law (t0 Å, α0 degrees), as benchmarks/paper_benchmarks.py fits it.
LAW = (1309.0, -0.1)


def _position_rms(crystal: edkit.Crystal, truth: edkit.Crystal) -> float:
    delta = (np.asarray(crystal.fract) - np.asarray(truth.fract) + 0.5) % 1.0 - 0.5
    return float(np.sqrt(np.mean(np.sum((delta @ np.asarray(truth.real_basis)) ** 2, axis=1))))


@pytest.mark.benchmark  # 469 s on 2 cores: outside CI's budget (make test-benchmarks)
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


@pytest.mark.slow  # 106 s and 176 s (2026-12-06)
@pytest.mark.parametrize(("level", "kinematic_start"), [("02", False), ("03", "auto")])
def test_default_recipe_recovers_the_truth_on_the_clean_regeneration(
    data_dir, level, kinematic_start
) -> None:
    truth = edkit.read_cif(data_dir / "structures" / "quartz_kinematical.cif")
    full = edkit.read_pets(data_dir / "pets" / "quartz_synthetic.cif_pets")
    header = select_frames(full, slice(0, None, 10))
    alpha = np.deg2rad(header["alpha"].values - LAW[1])
    clean = make_dataset(truth, header, LAW[0] / np.cos(alpha), seed=0)
    start = edkit.read_cif(data_dir / "structures" / f"quartz_displaced_{level}.cif")
    assert _position_rms(start, truth) > 0.15
    refinement = edkit.Refinement(start, clean, progress=False, kinematic_start=kinematic_start)
    assert (refinement.kinematic_start is not None) is (kinematic_start == "auto")
    refinement.fit(progress=False)
    refined = refinement.crystal
    rms = _position_rms(refined, truth)
    ueq_errors = np.abs(refined.u_iso_equivalent - truth.u_iso_equivalent)
    thickness_error = refinement.thickness.values / clean.attrs["synthetic_thickness"] - 1
    print(
        f"clean {level}: {rms:.4f} Å, ΔUeq {ueq_errors} Å² (RMS "
        f"{np.sqrt(np.mean(ueq_errors**2)):.5f}), thickness RMS "
        f"{np.sqrt(np.mean(thickness_error**2)):.4f}, {refinement.messages}"
    )
    assert rms <= 0.005
    # Issue 13's targets: positions ≤ 0.005 Å RMS and every Ueq within 0.002 Å². (From the
    # truth itself the same fit ends O's Ueq 0.0008 Å² off, 2.5 s.u.: the data's own floor.)
    assert ueq_errors.max() <= 0.002
    assert np.sqrt(np.mean(thickness_error**2)) <= 0.05
