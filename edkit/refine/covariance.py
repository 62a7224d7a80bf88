"""The full normal matrix: structure and nuisance parameters together, for s.u.'s and counts.

Holding the thickness, the orientations or κ fixed while the s.u.'s of the structure are computed
underestimates them: the structure's parameters are correlated with these nuisance parameters,
and the s.u. of a parameter is the square root of a diagonal element of the *inverse* of the
full normal matrix. This module builds that matrix over every refined parameter and returns the
structural block of its inverse.

The parameters of a refinement fall in three kinds (:class:`ParameterLayout`):

* dense columns, each able to move every reflection: the free position and ADP coefficients,
  the occupancies, κ, and the parameters of a thickness model with few of them ("constant": 1,
  "platelet": 2, "wedge": 3);
* local columns, a few per frame, each moving only its own frame's reflections: the three
  orientation angles of each frame and, for the "per-frame" model and the networks, one
  thickness scale per frame (every node of the frame's thickness distribution times (1 + s_f):
  the networks' many weights enter the fit only through each frame's thickness, so their
  effective count is one per frame, the number of values a free per-frame model would have);
* the per-frame scales k_f, solved in closed form inside Jana's residuals (variable
  projection): the residuals' Jacobian through k_f is that of the other parameters projected
  off the scale's column (to first order in the residuals), which is exactly what eliminating
  the scales from the full normal matrix does. They need no column, but they are parameters:
  they count.

Every reflection depends only on its own frame's local parameters, so the local columns of a
chunk need one tangent pass per *kind* (at most four), not one per frame, and the normal matrix
has the arrow form [[A, B], [Bᵀ, D]] with D block-diagonal (one n_l × n_l block per frame).
The local parameters are eliminated frame by frame (Schur complement): the dense block of the
inverse is (A − Σ_f B_f D_f⁺ B_fᵀ)⁺, a matrix the size of the dense parameters, however many
frames there are. Scaled by GoF² (Jana's convention), GoF with every parameter counted.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edkit.errors import EdkitError
from edkit.progress import progress_bar
from edkit.refine.core import (
    Intermediates,
    model_intermediates,
    n_restraint_residuals,
    restraint_normal_terms,
)
from edkit.refine.lm import _residuals, _sum_chunks
from edkit.refine.problem import Chunk, Problem
from edkit.simulate.stack import StackConfig

#: Thickness models whose own parameters are the nuisance columns (few, shared by the frames);
#: every other model gets one thickness scale per frame (see the module docstring).
GLOBAL_THICKNESS = ("constant", "platelet", "wedge")
#: Structural groups (their block of the covariance is what the s.u.'s report), in column order.
STRUCTURAL = ("positions", "adp", "occupancy")
#: Dense groups in column order (a group's columns are contiguous).
DENSE = (*STRUCTURAL, "absorption", "thickness")


@dataclass(frozen=True)
class ParameterLayout:
    """Which parameters are refined, and how they enter the full normal matrix.

    Attributes:
      masks: {group: boolean masks, one per leaf of the group in the model's parameter tree
        (flattening order)} of the dense columns; a group's columns are contiguous, in the
        order of :data:`DENSE`.
      leaf_groups: each parameter leaf's group (flattening order of the model's ``nnx.State``).
      local_thickness: one thickness-scale column per frame.
      orientation: three orientation columns per frame.
      fitted_frames: frames with a training reflection (their scales and local parameters are
        refined), bool, (n_frames,).
    """

    masks: dict[str, tuple[np.ndarray, ...]]
    leaf_groups: tuple[str, ...]
    local_thickness: bool
    orientation: bool
    fitted_frames: np.ndarray

    def size(self, group: str) -> int:
        """Dense columns of ``group``."""
        return int(sum(int(m.sum()) for m in self.masks.get(group, ())))

    @property
    def n_dense(self) -> int:
        return sum(self.size(g) for g in DENSE)

    @property
    def n_structural(self) -> int:
        return sum(self.size(g) for g in STRUCTURAL)

    @property
    def n_local(self) -> int:
        """Local columns per frame (thickness scale, then the three orientation angles)."""
        return int(self.local_thickness) + 3 * int(self.orientation)

    def slice(self, group: str) -> slice:
        """The columns of dense ``group``."""
        start = sum(self.size(g) for g in DENSE[: DENSE.index(group)])
        return slice(start, start + self.size(group))

    def counts(self) -> dict[str, int]:
        """Every refined parameter, by group: positions, adp, occupancy (free coefficients after
        site symmetry and riding), scales (one per fitted frame), thickness (the model's own
        parameters for "constant"/"platelet"/"wedge", else one per fitted frame), orientation
        (three per fitted frame), absorption (κ: 0 or 1)."""
        n_frames = int(self.fitted_frames.sum())
        thickness = n_frames if self.local_thickness else self.size("thickness")
        return {
            "positions": self.size("positions"),
            "adp": self.size("adp"),
            "occupancy": self.size("occupancy"),
            "scales": n_frames,
            "thickness": thickness,
            "orientation": 3 * n_frames if self.orientation else 0,
            "absorption": self.size("absorption"),
        }


def parameter_layout(
    params: Any,
    mapping: Any,
    enabled: dict[str, bool],
    thickness_kind: str,
    uses_absorption: bool,
    problem: Problem,
    *,
    nuisance: bool = True,
) -> ParameterLayout:
    """The :class:`ParameterLayout` of a refinement's current parameters.

    Args:
      params: the model's parameters (an ``nnx.State`` of the hybrid model).
      mapping: the structure mapping (its position and ADP masks: site symmetry, riding).
      enabled: refined groups.
      thickness_kind: the thickness model's name.
      uses_absorption: whether κ enters the physics (``absorption`` set).
      problem: the refinement's fixed data (which frames have training reflections).
      nuisance: False: the structural parameters only (thickness, orientations and κ held).
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    groups = tuple(str(path[0].key) for path, _ in leaves)
    on = {g: bool(enabled.get(g, False)) for g in enabled}
    local_thickness = nuisance and on.get("thickness", False)
    local_thickness = local_thickness and thickness_kind not in GLOBAL_THICKNESS
    wanted = {
        "positions": np.asarray(mapping.position_mask) & on.get("positions", False),
        "adp": np.asarray(mapping.adp_mask) & on.get("adp", False),
        "occupancy": on.get("occupancy", False),
        "absorption": nuisance and on.get("absorption", False) and uses_absorption,
        "thickness": nuisance and on.get("thickness", False) and not local_thickness,
    }
    masks: dict[str, list[np.ndarray]] = {}
    for (_, leaf), group in zip(leaves, groups, strict=True):
        if group not in wanted:
            continue
        want = wanted[group]
        mask = np.broadcast_to(np.asarray(want, dtype=bool), np.shape(leaf)).copy()
        masks.setdefault(group, []).append(mask)
    fitted = np.zeros(problem.n_frames, dtype=bool)
    for chunk in problem.chunks:
        train = np.asarray(chunk.train)
        fitted[np.asarray(chunk.frames)[np.asarray(chunk.refl_frame)[train]]] = True
    return ParameterLayout(
        masks={g: tuple(m) for g, m in masks.items()},
        leaf_groups=groups,
        local_thickness=bool(local_thickness),
        orientation=bool(nuisance and on.get("orientation", False)),
        fitted_frames=fitted,
    )


def shift_dense(params: Any, layout: ParameterLayout, theta: jax.Array) -> Any:
    """``params`` with the dense columns moved by ``theta`` (n_dense,), in the layout's order."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    seen: dict[str, int] = {}
    out = []
    for leaf, group in zip(leaves, layout.leaf_groups, strict=True):
        if group not in layout.masks:
            out.append(leaf)
            continue
        k = seen.get(group, 0)
        seen[group] = k + 1
        mask = layout.masks[group][k]
        before = sum(int(m.sum()) for m in layout.masks[group][:k])
        start = layout.slice(group).start + before
        index = np.flatnonzero(mask.reshape(-1))
        flat = jnp.reshape(leaf, (-1,)).at[index].add(theta[start : start + index.size])
        out.append(jnp.reshape(flat, jnp.shape(leaf)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _local_tangents(z: Intermediates, layout: ParameterLayout) -> Intermediates | None:
    """Tangents of the local kinds (n_l leading axis): each frame's thickness scale, then the
    orientation angles, every frame at once (frames never share a reflection)."""
    zeros = jax.tree.map(jnp.zeros_like, z)
    rows = []
    if layout.local_thickness:
        rows.append(zeros._replace(thickness=z.thickness))
    if layout.orientation:
        for j in range(3):
            rows.append(zeros._replace(orientation=zeros.orientation.at[:, j].set(1.0)))
    if not rows:
        return None
    return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def chunk_full_terms(
    z: Intermediates,
    dense: Intermediates,
    local: Intermediates | None,
    chunk: Chunk,
    reciprocal: jax.Array,
    config: StackConfig,
) -> dict[str, jax.Array]:
    """One chunk's share of the arrow-form normal matrix (module docstring): "A" (n_d, n_d),
    "g" (n_d,), "cost" (); with local columns also, per frame of the dataset, "B" (n_f, n_d,
    n_l), "D" (n_f, n_l, n_l) and "h" (n_f, n_l) (the local gradient)."""

    def residuals(zz: Intermediates) -> jax.Array:
        return _residuals(zz, chunk, reciprocal, config)

    r, linear = jax.linearize(residuals, z)
    jd = jax.lax.map(linear, dense)  # (n_d, r)
    out = {"A": jd @ jd.T, "g": jd @ r, "cost": r @ r}
    if local is None:
        return out
    jl = jax.lax.map(linear, local)  # (n_l, r)
    n_frames = z.thickness.shape[0]
    frame = chunk.frames[chunk.refl_frame]  # each reflection's frame in the dataset

    def per_frame(x: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(x, frame, num_segments=n_frames)

    out["B"] = per_frame(jd.T[:, :, None] * jl.T[:, None, :])
    out["D"] = per_frame(jl.T[:, :, None] * jl.T[:, None, :])
    out["h"] = per_frame(jl.T * r[:, None])
    return out


chunk_full = jax.jit(chunk_full_terms, static_argnums=(5,))


#: A direction of the structure keeps less than this fraction of its information once the
#: nuisance parameters are eliminated (an eigenvalue of the Schur complement equilibrated by
#: the structure's own diagonal): it is not determined (round-off of the elimination is ~1e-13).
UNDETERMINED = 1e-9
#: Pseudo-inverse cut of a frame's local block, relative to its largest (equilibrated) value.
LOCAL_RCOND = 1e-10


class FullNormal(NamedTuple):
    """The full normal matrix, the local columns eliminated.

    Attributes:
      covariance: of the dense parameters (layout order), scaled by GoF², (n_dense, n_dense);
        the undetermined directions left out (a pseudo-inverse).
      step: the Gauss–Newton shift of the dense parameters from the current state (the local
        ones moving with them), (n_dense,); in the parameters' units (Å, Å², 1).
      determined: dense parameters with no component along a direction the data leave free
        once the nuisance parameters are refined (e.g. too few reflections per frame for its
        scale, thickness and angles), bool, (n_dense,); the others' s.u.'s are unbounded.
      gof: sqrt(Σr² / (n_residuals − n_parameters)), every refined parameter counted.
      n_parameters: every refined parameter (:meth:`ParameterLayout.counts`).
      n_residuals: training reflections.
    """

    covariance: np.ndarray
    step: np.ndarray
    determined: np.ndarray
    gof: float
    n_parameters: int
    n_residuals: int


def _local_pinv(matrix: np.ndarray) -> np.ndarray:
    """Pseudo-inverses of a stack of symmetric positive semi-definite blocks (..., n, n),
    equilibrated first: the columns mix units (a relative thickness scale, radians)."""
    diagonal = np.sqrt(np.maximum(np.diagonal(matrix, axis1=-2, axis2=-1), 0.0))
    d = np.where(diagonal > 0, diagonal, 1.0)
    outer = d[..., :, None] * d[..., None, :]
    scaled = matrix / outer
    scaled = 0.5 * (scaled + np.swapaxes(scaled, -1, -2))
    return np.linalg.pinv(scaled, rcond=LOCAL_RCOND, hermitian=True) / outer


def _eliminate_local(sums: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The dense block's Schur complement and gradient once every frame's local columns are
    eliminated (A − Σ_f B_f D_f⁺ B_fᵀ, g − Σ_f B_f D_f⁺ h_f)."""
    schur, gradient = np.array(sums["A"]), np.array(sums["g"])
    if "B" in sums:
        b, d_inv = sums["B"], _local_pinv(sums["D"])  # (n_f, n_d, n_l), (n_f, n_l, n_l)
        schur -= np.einsum("fdl,flm,fem->de", b, d_inv, b)
        gradient -= np.einsum("fdl,flm,fm->d", b, d_inv, sums["h"])
    return schur, gradient


def _invert(
    schur: np.ndarray,
    dense_diagonal: np.ndarray,
    gradient: np.ndarray,
    cost: float,
    n_parameters: int,
    n_residuals: int,
) -> FullNormal:
    """Equilibrate by the dense diagonal, drop the undetermined directions, scale by GoF²."""
    diagonal = np.sqrt(np.maximum(dense_diagonal, 0.0))
    a = np.where(diagonal > 0, diagonal, 1.0)
    scaled = schur / np.outer(a, a)
    values, vectors = np.linalg.eigh(0.5 * (scaled + scaled.T))
    keep = values > UNDETERMINED
    inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T / np.outer(a, a)
    free = np.sum(vectors[:, ~keep] ** 2, axis=1)  # each parameter's weight on free directions
    determined = (free < 1e-6) & (diagonal > 0)
    dof = max(n_residuals - n_parameters, 1)
    gof = float(np.sqrt(cost / dof))
    return FullNormal(
        inverse * gof**2, -inverse @ gradient, determined, gof, n_parameters, n_residuals
    )


def solve(sums: dict[str, np.ndarray], layout: ParameterLayout, n_residuals: int) -> FullNormal:
    """Eliminate the local columns frame by frame and invert the dense block (module doc).

    The Schur complement S is equilibrated by the dense block's own diagonal (A, the
    information each parameter has with every other one held): an eigenvalue of the result is
    the fraction of information a direction keeps once the nuisance parameters are free, and
    below :data:`UNDETERMINED` the direction is left out of the inverse and the parameters
    along it are marked undetermined. The GoF divides by n_residuals − n_parameters, at least
    1 (as :func:`edkit.refine.lm.covariance` does)."""
    schur, gradient = _eliminate_local(sums)
    n_parameters = sum(layout.counts().values())
    return _invert(
        schur, np.diag(sums["A"]), gradient, float(sums["cost"]), n_parameters, n_residuals
    )


def solve_joint(
    parts: list[tuple[dict[str, np.ndarray], ParameterLayout]], n_residuals: int
) -> FullNormal:
    """The full normal matrix of one structure refined against several datasets, each with its
    own nuisance parameters (thickness, orientations, κ, scales): ``parts`` holds each
    dataset's accumulated sums and layout (the same structural columns in each).

    The datasets' nuisance blocks do not couple, so each dataset's non-structural columns
    (local and dense) are eliminated on their own and the structural Schur complements add:
    S = Σ_d [S_d,ss − S_d,sn S_d,nn⁺ S_d,ns]. Returns a :class:`FullNormal` over the structural
    parameters only; every parameter is counted once (the structure's once, not per dataset).
    """
    n = parts[0][1].n_structural
    if any(layout.n_structural != n for _, layout in parts):
        raise EdkitError("joint normal matrix: the datasets refine different structural columns")
    schur, gradient, diagonal = np.zeros((n, n)), np.zeros(n), np.zeros(n)
    cost, n_parameters = 0.0, -(len(parts) - 1) * n
    for sums, layout in parts:
        own, own_gradient = _eliminate_local(sums)
        if own.shape[0] > n:  # this dataset's κ and global thickness parameters
            coupling, inverse = own[:n, n:], _local_pinv(own[n:, n:])
            own = own[:n, :n] - coupling @ inverse @ coupling.T
            own_gradient = own_gradient[:n] - coupling @ inverse @ own_gradient[n:]
        schur += own
        gradient += own_gradient
        diagonal += np.diag(sums["A"])[:n]
        cost += float(sums["cost"])
        n_parameters += sum(layout.counts().values())
    return _invert(schur, diagonal, gradient, cost, n_parameters, n_residuals)


class FullLeastSquares:
    """The full normal matrix of a problem over the parameters of ``layout``.

    Args:
      problem: the refinement's fixed data.
      layout: the refined parameters (:func:`parameter_layout`).
      progress: a bar over the chunks (None: where someone watches).
    """

    def __init__(self, problem: Problem, layout: ParameterLayout, progress: bool | None = None):
        if layout.n_structural == 0:
            raise EdkitError(
                "no structural parameter is refined (enable 'positions', 'adp' or 'occupancy')"
            )
        self.problem, self.layout, self.progress = problem, layout, progress
        self.n_residuals = int(sum(int(np.sum(c.train)) for c in problem.chunks))
        self.n_residuals += n_restraint_residuals(problem)  # restraints are observations
        self._tangents = jax.jit(self._tangents_of)
        self._restraints = jax.jit(
            lambda params: restraint_normal_terms(
                problem, lambda theta: shift_dense(params, layout, theta), layout.n_dense
            )
        )

    def _tangents_of(
        self, params: Any, problem: Problem
    ) -> tuple[Intermediates, Intermediates, Intermediates | None]:
        def intermediates_of(theta: jax.Array) -> Intermediates:
            return model_intermediates(shift_dense(params, self.layout, theta), problem)

        z, linear = jax.linearize(intermediates_of, jnp.zeros(self.layout.n_dense))
        dense = jax.vmap(linear)(jnp.eye(self.layout.n_dense))
        return z, dense, _local_tangents(z, self.layout)

    def normal(self, params: Any) -> FullNormal:
        """Accumulate chunk by chunk at ``params`` and solve (:func:`solve`)."""
        return solve(self.sums(params), self.layout, self.n_residuals)

    def sums(self, params: Any) -> dict[str, np.ndarray]:
        """The normal matrix's blocks at ``params`` before any elimination, on the host: "A"
        (n_dense, n_dense), "g" (n_dense,), "cost", and with local columns "B", "D", "h"."""
        problem = self.problem
        with progress_bar(
            len(problem.chunks) + 1, "full normal matrix", "chunk", self.progress
        ) as bar:
            z, dense, local = self._tangents(params, problem)
            bar.update()
            sums = _sum_chunks(chunk_full_terms, chunk_full, (z, dense, local), problem, bar)
        host = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items()}
        if problem.restraints is not None:  # their rows join the dense block (structure only)
            r_normal, r_gradient, r_cost = map(np.asarray, self._restraints(params))
            host["A"], host["g"] = host["A"] + r_normal, host["g"] + r_gradient
            host["cost"] = host["cost"] + r_cost
        return host


def structural_variances(full: FullNormal, layout: ParameterLayout) -> np.ndarray:
    """Variances of the positions, ADPs and occupancies (in that order; their units squared),
    inf where a parameter is not determined (:attr:`FullNormal.determined`)."""
    n = layout.n_structural
    variances = np.maximum(np.diag(full.covariance)[:n], 0.0)
    return np.where(full.determined[:n], variances, np.inf)


def shift_over_su(full: FullNormal, layout: ParameterLayout) -> tuple[float, float]:
    """(max, mean) of |shift| / s.u. over the determined structural parameters, the shift
    being the Gauss–Newton step from the current state (what one more full least-squares cycle
    would apply); (NaN, NaN) when none is determined."""
    n = layout.n_structural
    su = np.sqrt(structural_variances(full, layout))
    ok = np.isfinite(su) & (su > 0)
    ratio = np.abs(full.step[:n])[ok] / su[ok]
    if ratio.size == 0:
        return float("nan"), float("nan")
    return float(np.max(ratio)), float(np.mean(ratio))
