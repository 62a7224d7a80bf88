"""The hybrid model: the Bloch-wave physics of every frame joined with a thickness network.

``HybridModel`` holds every refinable quantity as an ``nnx.Param`` — structure coefficients
(positions in Å, ADPs in Å², occupancies), per-frame orientation corrections (radians), the
absorption κ — and a thickness model (a Flax NNX module). Calling it with a static
:class:`ForwardContext` predicts the intensity of every observed reflection.
"""

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from edkit.models.parameters import StructureMapping
from edkit.models.thickness import FrameFeatures, ThicknessModel
from edkit.physics import bloch
from edkit.physics.structure import StructureParams, StructureTables
from edkit.simulate.frames import FrameSetup, frame_intensity_stack, reflection_intensities


@dataclass(frozen=True, eq=False)
class ForwardContext:
    """Everything fixed during a refinement (closed over by the compiled step)."""

    mapping: StructureMapping
    tables: StructureTables
    setup: FrameSetup
    features: FrameFeatures
    absorption_method: bloch.AbsorptionMethod = "eig"
    batch_size: int = 8
    solve_dtype: jnp.dtype | None = None
    devices: int = 1
    remat: bool | str = False


class Prediction(NamedTuple):
    """What the model predicts.

    Attributes:
      i_calc: rocking-curve intensity of each observed reflection (unscaled), (n_refl,).
      thickness: thickness nodes per frame, Å, (n_f, n_t).
      weights: their weights (sum 1 per frame), (n_f, n_t).
    """

    i_calc: jax.Array
    thickness: jax.Array
    weights: jax.Array


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
        context: ForwardContext,
        positions: jax.Array | None = None,
        adp: jax.Array | None = None,
    ) -> StructureParams:
        """The structure (asymmetric unit); ``positions``/``adp`` override the parameters."""
        return context.mapping.structure(
            self.positions[...] if positions is None else positions,
            self.adp[...] if adp is None else adp,
            self.occupancy[...],
        )

    def __call__(
        self,
        context: ForwardContext,
        positions: jax.Array | None = None,
        adp: jax.Array | None = None,
    ) -> Prediction:
        """Predict every reflection; ``positions``/``adp`` (coefficients) override the
        parameters without mutating them (for Jacobians taken inside a transform)."""
        values, weights = self.thickness(context.features)
        stack = frame_intensity_stack(
            self.structure(context, positions, adp),
            context.tables,
            context.setup,
            values,
            orientation_corrections=self.orientation[...],
            absorption=jnp.abs(self.absorption[...]) if self.uses_absorption else None,
            absorption_method=context.absorption_method,
            batch_size=context.batch_size,
            solve_dtype=context.solve_dtype,
            devices=context.devices,
            remat=context.remat,
        )
        frame_values = jnp.einsum("ft,ftn->fn", weights, stack)
        return Prediction(reflection_intensities(context.setup, frame_values), values, weights)
