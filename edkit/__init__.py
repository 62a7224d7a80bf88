# ruff: noqa: E402  (edkit.cores must configure JAX before the imports below can start it)
"""edkit: hybrid Bloch-wave + neural-network refinement against 3D electron diffraction data.

Public API (everything a notebook needs)::

    crystal = edkit.read_cif("quartz.cif")
    data = edkit.read_pets("quartz_experimental.cif_pets")
    edkit.simulate_pattern(crystal, [1, 0, 0], [100, 500])
    edkit.simulate_frames(crystal, data, thickness=600.0)
    refinement = edkit.Refinement(crystal, data, thickness="profile-net")

Physics runs in float64 through scoped ``jax.enable_x64`` at these entry points; the global
JAX flag is never flipped on import. ``import edkit`` loads no widget library.

``import edkit`` does set one global: when JAX has not started yet, it asks for one CPU device
per core and keeps LAPACK single-threaded inside each (:mod:`edkit.cores`: XLA solves a batch
of eigenproblems on one thread, so the frames are sharded over the cores instead);
``EDKIT_CPU_DEVICES=1`` turns that off.
"""

from edkit import cores

cores.configure_cpu_devices()  # before anything below can start JAX


from edkit import metrics
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.examples import example_file, example_files
from edkit.io.cif import read_cif, write_cif
from edkit.io.pets import read_pets, select_frames, write_pets
from edkit.physics.geometry import frame_orientations
from edkit.refine.cycles import refine_in_cycles
from edkit.refine.refinement import Refinement
from edkit.simulate import synthetic
from edkit.simulate.frames import (
    build_frame_setup,
    klar_selection,
    simulate_frames,
    thickness_search,
)
from edkit.simulate.pattern import simulate_pattern
from edkit.version import __version__

__all__ = [
    "Crystal",
    "EdkitError",
    "Refinement",
    "__version__",
    "build_frame_setup",
    "example_file",
    "example_files",
    "frame_orientations",
    "klar_selection",
    "metrics",
    "read_cif",
    "read_pets",
    "refine_in_cycles",
    "select_frames",
    "simulate_frames",
    "simulate_pattern",
    "synthetic",
    "thickness_search",
    "write_cif",
    "write_pets",
]
