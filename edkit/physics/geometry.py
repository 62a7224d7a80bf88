"""Frame geometry of a PETS dataset: the crystal → lab rotation of every frame (xarray in and out).

The dataset-level face of :mod:`edkit.physics.orientation`: it reads UB, the cell and the
goniometer angles (degrees) from a :func:`edkit.io.pets.read_pets` Dataset, converts to radians
and lifts :func:`~edkit.physics.orientation.frame_rotation` over the frames in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from edkit import schema
from edkit.physics.orientation import frame_rotation, orientation_matrix, real_space_basis

__all__ = ["frame_orientations", "zone_axes_lab"]


def frame_orientations(dataset: xr.Dataset) -> xr.DataArray:
    """Rotation of each frame from the crystal Cartesian frame to the lab frame, float64.

    O_i = R_z(−φ) R_z(ω_i) R_x(α_i) R_y(β_i) U with U = polar(UB · real) (see
    :mod:`edkit.physics.orientation`); O_i @ (u a + v b + w c) points along lab +z for the frame's
    zone axis [uvw], and a reflection's lab vector is O_i @ B @ hkl (Å⁻¹).

    Args:
      dataset: a PETS dataset (layout: :mod:`edkit.schema`): UB (Å⁻¹), the cell, alpha, beta,
        omega (degrees, (n_frame,)) and rotation_axis_position (degrees).

    Returns:
      DataArray ``orientation``, dims (frame, lab, crystal), coords lab = crystal =
      ["x", "y", "z"], shape (n_frame, 3, 3).
    """
    deg = np.pi / 180.0
    with jax.enable_x64(True):
        u = orientation_matrix(
            jnp.asarray(dataset["UB"].values, dtype=jnp.float64),
            jnp.asarray(schema.cell_parameters(dataset), dtype=jnp.float64),
        )
        rotations = jax.vmap(frame_rotation, in_axes=(None, 0, 0, 0, None))(
            u,
            jnp.asarray(dataset["alpha"].values * deg, dtype=jnp.float64),
            jnp.asarray(dataset["beta"].values * deg, dtype=jnp.float64),
            jnp.asarray(dataset["omega"].values * deg, dtype=jnp.float64),
            jnp.asarray(float(dataset["rotation_axis_position"]) * deg, dtype=jnp.float64),
        )
        values = np.asarray(rotations, dtype=np.float64)
    axes = ["x", "y", "z"]
    array = xr.DataArray(
        values,
        dims=(schema.FRAME, schema.LAB, schema.CRYSTAL),
        coords={"frame": dataset["frame"].values, "lab": axes, "crystal": axes},
    )
    return schema.apply_dataarray_attrs(array, "orientation")


def zone_axes_lab(dataset: xr.Dataset, orientations: xr.DataArray | None = None) -> np.ndarray:
    """Unit lab-frame directions of each frame's zone axis u a + v b + w c, shape (n_frame, 3).

    For a consistent dataset these are all ≈ (0, 0, 1).

    Args:
      dataset: a PETS dataset (see :func:`frame_orientations`) with ``zone_axis`` (n_frame, 3).
      orientations: :func:`frame_orientations` of it, if already computed.
    """
    o = frame_orientations(dataset) if orientations is None else orientations
    with jax.enable_x64(True):
        real = np.asarray(real_space_basis(jnp.asarray(schema.cell_parameters(dataset))))
    directions = dataset["zone_axis"].values @ real  # rows: u a + v b + w c
    lab = np.einsum("fij,fj->fi", o.values, directions)
    return lab / np.linalg.norm(lab, axis=1, keepdims=True)
