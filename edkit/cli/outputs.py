"""What ``edkit refine`` writes after the refinement beside the CIF and the report."""

from collections.abc import Callable
from pathlib import Path
from typing import Any


def difference_map_summary(
    refinement: Any, simulated: Any, out: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """Write difference.ccp4 and 2fo-fc.ccp4 into ``out``; report.json's summary of them
    (σ in V, the ten largest peaks and holes with their nearest atoms)."""
    maps = refinement.difference_maps(simulated=simulated, peaks=10)
    files = maps.write_ccp4(out)
    peaks = maps.peaks
    largest = float(peaks["height_sigma"].values[0]) if peaks.sizes["peak"] else 0.0
    say(
        f"difference map: σ {maps.sigma:.3f} V, largest |peak| {abs(largest):.1f} σ "
        f"({len(maps.merged.hkl)} unique reflections); {', '.join(p.name for p in files)}"
    )
    return {
        "sigma_volt": maps.sigma,
        "unique_reflections": len(maps.merged.hkl),
        "files": [p.name for p in files],
        "peaks": [
            {
                "height_volt": float(peaks["height"].values[i]),
                "height_sigma": float(peaks["height_sigma"].values[i]),
                "fract": [float(v) for v in peaks["fract"].values[i]],
                "nearest_atom": str(peaks["nearest_atom"].values[i]),
                "distance": float(peaks["distance"].values[i]),
            }
            for i in range(peaks.sizes["peak"])
        ],
    }
