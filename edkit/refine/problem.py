"""``Problem``: everything fixed during a refinement, as a pytree with static sizes.

Built once from (crystal, dataset, options): the frame set-up cut into chunks of frames (each a
:class:`Chunk` of device arrays: the frames' beam tables and geometry, and the observed
reflections of exactly those frames), the structure tables, the frames' features for the
thickness model, the data-only denominators of the losses, and the static choices (the frame
stack's :class:`~edkit.simulate.stack.StackConfig`, the objective, the optimiser). Every loss
edkit offers is a sum over frames, so a chunk's contribution and its gradient are exact partial
sums (``edkit.refine.core``).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from edkit import metrics
from edkit.models.parameters import StructureMapping
from edkit.models.thickness import FrameFeatures
from edkit.physics.structure import StructureTables
from edkit.refine.restraints import RestraintTables
from edkit.simulate.setup import FrameSetup
from edkit.simulate.stack import FrameArrays, StackConfig, frame_arrays
from edkit.simulate.stream import chunk_layout


class Chunk(NamedTuple):
    """c frames of one beam-count bucket and their r observed, simulated reflections.

    Attributes:
      frames: frame positions (0-based, into the dataset's frames), int, (c,).
      arrays: the frames' beam tables and geometry, padded to the bucket's sizes.
      refl_index: each reflection's position in the dataset, int, (r,).
      refl_frame: its frame's position within the chunk (0 … c−1), int, (r,).
      refl_beam: its position in that frame's beam list, int, (r,).
      i_obs, sigma: observed intensity and σ(I), (r,).
      train, validation: scored reflections of training and of held-out frames, bool, (r,).
    """

    frames: Any
    arrays: FrameArrays
    refl_index: Any
    refl_frame: Any
    refl_beam: Any
    i_obs: Any
    sigma: Any
    train: Any
    validation: Any


class HostChunks:
    """The chunks as numpy arrays, compared and hashed by identity (a static field): a problem
    run as one program (``Problem.fused``) compiles them in as constants, which lets XLA fold the
    geometry and index tables (about 10 % faster on real quartz than passing them in)."""

    def __init__(self, chunks: tuple[Chunk, ...]) -> None:
        self.chunks = chunks


@struct.dataclass
class Problem:
    """The fixed data of a refinement (a pytree; the static fields are hashed by identity).

    Attributes (leaves):
      chunks: the frames in chunks, each a :class:`Chunk`.
      differences: every hkl difference of the set-up, int, (m, 3).
      tables: the crystal's structure tables.
      features: per-frame inputs of the thickness model.
    Static:
      mapping: structure coefficients → structure. graphdef: the model's NNX graph.
      optimizer: the optax transformation. config: the frame stack's static choices.
      objective: "jana" or "wr2". real_potential: solve with real potentials (centric crystal).
      n_frames, n_refl: dataset sizes. train_denominator, validation_denominator: the data-only
      normalisers of the loss (Σ w F_o² for "jana"; the number of frames with a scored
      reflection for "wr2"). fused: a step runs every chunk in one compiled program (the
      planner's choice for problems whose whole working set is small).
    Leaf: restraints: the restraints' tables (None without restraints).
    """

    chunks: tuple[Chunk, ...]
    differences: Any
    tables: StructureTables
    features: FrameFeatures
    mapping: StructureMapping = struct.field(pytree_node=False)
    graphdef: Any = struct.field(pytree_node=False)
    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    config: StackConfig = struct.field(pytree_node=False)
    objective: str = struct.field(pytree_node=False, default="jana")
    real_potential: bool = struct.field(pytree_node=False, default=False)
    n_frames: int = struct.field(pytree_node=False, default=0)
    n_refl: int = struct.field(pytree_node=False, default=0)
    train_denominator: float = struct.field(pytree_node=False, default=1.0)
    validation_denominator: float = struct.field(pytree_node=False, default=1.0)
    fused: bool = struct.field(pytree_node=False, default=False)
    host: HostChunks | None = struct.field(pytree_node=False, default=None)
    restraints: RestraintTables | None = None

    @property
    def chunk_shapes(self) -> list[tuple[int, ...]]:
        """(frames, beams, weak beams, reflections) of each chunk: one compiled kernel each."""
        return [(*_frame_shape(chunk), len(chunk.refl_index)) for chunk in self.chunks]


def loss_denominator(
    objective: str, i_obs: np.ndarray, sigma: np.ndarray, mask: np.ndarray, frames: np.ndarray
) -> float:
    """The data-only normaliser of the loss over ``mask`` (see :class:`Problem`)."""
    if objective == "wr2":
        return float(max(len(np.unique(frames[mask & (i_obs != 0)])), 1))
    w = metrics._jana_weights_np(i_obs[mask], sigma[mask])
    return float(np.sum(w * np.maximum(i_obs[mask], 0.0)))


def _frame_shape(chunk: Chunk) -> tuple[int, ...]:
    weak = chunk.arrays.weak_hkl
    return (*chunk.arrays.hkl.shape[:2], 0 if weak is None else weak.shape[1])


def _pad_reflections(chunks: list[Chunk], n_refl: int) -> list[Chunk]:
    """Pad every chunk's reflections to the most of any chunk of the same frame shape, so that
    chunks of one shape share one compiled kernel. Padding reflections are inert: index n_refl
    (dropped when scattered back), not scored, σ = 1."""
    most: dict[tuple[int, ...], int] = {}
    for chunk in chunks:
        key = _frame_shape(chunk)
        most[key] = max(most.get(key, 1), len(chunk.refl_index))
    padded = []
    for chunk in chunks:
        extra = most[_frame_shape(chunk)] - len(chunk.refl_index)
        fill = {"refl_index": n_refl, "refl_frame": 0, "refl_beam": 0, "i_obs": 0.0,
                "sigma": 1.0, "train": False, "validation": False}  # fmt: skip
        values: dict[str, Any] = {
            name: np.concatenate([getattr(chunk, name), np.full(extra, value)])
            for name, value in fill.items()
        }
        padded.append(chunk._replace(**values))
    return padded


def build_problem(
    setup: FrameSetup,
    i_obs: np.ndarray,
    sigma: np.ndarray,
    train_mask: np.ndarray,
    validation_mask: np.ndarray,
    *,
    tables: StructureTables,
    features: FrameFeatures,
    mapping: StructureMapping,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    config: StackConfig,
    objective: str,
    chunk_frames: int,
    fused: bool = False,
) -> Problem:
    """Cut ``setup`` into chunks of at most ``chunk_frames`` frames and gather their data.

    Args:
      setup: the frame set-up.
      i_obs, sigma: every reflection of the dataset, (n_refl,).
      train_mask, validation_mask: scored reflections used for the loss and held out, (n_refl,).
      tables, features, mapping, graphdef, optimizer, config, objective: see :class:`Problem`.
      chunk_frames: frames per chunk (the memory planner's choice).
      fused: run every chunk of a step in one compiled program (the planner's choice), with
        the chunks' tables as constants.
    """
    simulated = setup.refl_beam >= 0
    host_chunks: list[Chunk] = []
    for frames, size, n_w in chunk_layout(setup, chunk_frames):
        local = np.full(setup.n_frames, -1)
        local[frames] = np.arange(len(frames))
        refl = np.nonzero(simulated & (local[setup.refl_frame] >= 0))[0]
        host_chunks.append(
            Chunk(
                frames=np.asarray(frames),
                arrays=frame_arrays(setup, frames, size, n_w),
                refl_index=refl,
                refl_frame=local[setup.refl_frame[refl]],
                refl_beam=setup.refl_beam[refl],
                i_obs=i_obs[refl],
                sigma=np.where(sigma[refl] > 0, sigma[refl], 1.0),
                train=train_mask[refl],
                validation=validation_mask[refl],
            )
        )
    host_chunks = _pad_reflections(host_chunks, len(i_obs))
    chunks = [jax.tree.map(jnp.asarray, host) for host in host_chunks]
    frames_of = setup.refl_frame
    return Problem(
        chunks=tuple(chunks),
        differences=jnp.asarray(setup.differences),
        tables=StructureTables(*(jnp.asarray(t) for t in tables)),
        features=features,
        mapping=mapping,
        graphdef=graphdef,
        optimizer=optimizer,
        config=config,
        objective=objective,
        real_potential=bool(setup.settings.get("centric", False)),
        n_frames=setup.n_frames,
        n_refl=len(i_obs),
        train_denominator=loss_denominator(objective, i_obs, sigma, train_mask, frames_of),
        validation_denominator=loss_denominator(
            objective, i_obs, sigma, validation_mask, frames_of
        ),
        fused=bool(fused),
        host=HostChunks(tuple(host_chunks)) if fused else None,
    )
