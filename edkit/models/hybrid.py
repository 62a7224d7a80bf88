"""The hybrid model: every refinable quantity of a 3D-ED refinement, physics and networks.

``HybridModel`` holds every refinable quantity as an ``nnx.Param`` — structure coefficients
(positions in Å, ADPs in Å², occupancies), per-frame orientation corrections (radians), the
absorption κ — and a thickness model (a Flax NNX module). The refinement core
(``edkit.refine.core``) turns it into the frames' inputs and streams the Bloch-wave physics
frame chunk by frame chunk.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from edkit.models.parameters import StructureMapping
from edkit.models.thickness import ThicknessModel
from edkit.physics.structure import StructureParams


class HybridModel(nnx.Module):
    """Physics + networks: every refinable parameter of a 3D-ED refinement (see module doc)."""

    def __init__(
        self,
        n_atoms: int,
        n_frames: int,
        thickness: ThicknessModel,
        *,
        absorption: float | None = None,
    ):
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        self.positions = nnx.Param(jnp.zeros((n_atoms, 3), dtype))
        self.adp = nnx.Param(jnp.zeros((n_atoms, 6), dtype))
        self.occupancy = nnx.Param(jnp.zeros((n_atoms,), dtype))
        self.orientation = nnx.Param(jnp.zeros((n_frames, 3), dtype))
        self.absorption = nnx.Param(jnp.asarray(0.0 if absorption is None else absorption, dtype))
        self.uses_absorption = absorption is not None
        self.thickness = thickness

    def structure(
        self,
        mapping: StructureMapping,
        positions: jax.Array | None = None,
        adp: jax.Array | None = None,
    ) -> StructureParams:
        """The structure (asymmetric unit); ``positions``/``adp`` override the parameters."""
        return mapping.structure(
            self.positions[...] if positions is None else positions,
            self.adp[...] if adp is None else adp,
            self.occupancy[...],
        )
