"""Thickness models of the hybrid refinement, as Flax NNX modules (science.md §6).

Every model maps the features of a batch of frames to a *distribution* of beam path lengths per
frame: ``values`` (thickness nodes, Å, shape (n_f, n_t)) and ``weights`` (≥ 0, summing to 1 per
frame, shape (n_f, n_t)). The refinement averages the intensities computed at the nodes with the
weights (incoherent sum, column approximation). ``n_t`` (``n_nodes``) is static per model.

Parameters are unconstrained ``nnx.Param``s mapped through smooth transforms, so every value lies
in ``[lower, upper]`` by construction and gradients never vanish through a hard clip:

* a bounded thickness is ``lower · (upper/lower)^σ(raw)`` (a sigmoid in log space: the same raw
  step is the same *relative* change anywhere in the range);
* derived values (t₀/cos, node spreads) go through :func:`soft_clamp`, the identity well inside
  the bounds that saturates smoothly at them;
* obliquity factors use :func:`soft_floor` (a softplus ``max(c, c_min)``), c_min = 0.2 by default.

The float dtype of the parameters (and so of the outputs) follows the x64 setting at
construction: float64 with ``jax_enable_x64``, else float32.

The pieces live in private modules: ``_thickness_base`` (bounds, features, transforms, the base
class), ``_thickness_geometric`` (constant, per-frame, platelet/wedge) and ``_thickness_nets``
(profile and map networks); pre-training and the factory are here. Import from this module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from edkit.errors import EdkitError
from edkit.models._thickness_base import (
    CLAMP_SOFTNESS,
    COS_MIN,
    COS_SOFTNESS,
    KINDS,
    LOWER,
    UPPER,
    FrameFeatures,
    ThicknessModel,
    bounded,
    check_finite,
    float_dtype,
    frame_features,
    soft_clamp,
    soft_floor,
    unbounded,
)
from edkit.models._thickness_geometric import (
    ConstantThickness,
    PerFrameThickness,
    PlateletThickness,
)
from edkit.models._thickness_nets import ProfileNet, ThicknessMap

# --- pre-training and the factory --------------------------------------------------------------


def fit_to_thickness(
    model: ThicknessModel,
    features: FrameFeatures,
    target: jax.Array | np.ndarray,
    mask: jax.Array | np.ndarray | None = None,
    *,
    steps: int = 400,
    learning_rate: float = 0.05,
) -> list[float]:
    """Pre-train ``model`` in place so its mean thickness matches ``target`` on the masked frames.

    Loss: mean over frames with ``mask`` of ((t̄ − target)/target)², t̄ the model's
    :meth:`fitted_thickness` (Σ_k w t; μ for the profile network). Adam on the model's
    ``nnx.Param``s with a short second-moment memory (b2 = 0.95: the first gradients of a far-off
    start are large and a long memory would stall the end of the fit), the rate decaying from
    ``learning_rate`` to 1 % of it (cosine); one jitted step (compiled once per call).

    Args:
      model: any ThicknessModel; updated in place.
      features: the frames, n_f of them.
      target: thickness per frame, Å, shape (n_f,), > 0 where masked in.
      mask: bool, shape (n_f,); default all frames.
      steps: optimizer steps.
      learning_rate: peak Adam rate.

    Returns:
      the loss before each step, ``steps`` floats.
    """
    n_f = features.alpha.shape[0]
    dtype = float_dtype()
    target = jnp.asarray(target, dtype)
    mask = jnp.ones(n_f, bool) if mask is None else jnp.asarray(mask, bool)
    if target.shape != (n_f,) or mask.shape != (n_f,):
        raise EdkitError(
            f"fit_to_thickness: target and mask must have shape ({n_f},), got {target.shape} "
            f"and {mask.shape}"
        )
    if not bool(jnp.any(mask)):
        raise EdkitError("fit_to_thickness: the mask selects no frame")
    if not bool(jnp.all(jnp.where(mask, jnp.isfinite(target) & (target > 0), True))):
        raise EdkitError("fit_to_thickness: target must be finite and > 0 on the masked frames")
    safe_target = jnp.where(mask, target, 1.0)
    weight = mask.astype(dtype) / jnp.sum(mask)

    schedule = optax.cosine_decay_schedule(learning_rate, max(int(steps), 1), alpha=0.01)
    optimizer = nnx.Optimizer(model, optax.adam(schedule, b2=0.95), wrt=nnx.Param)

    def loss_fn(model: ThicknessModel) -> jax.Array:
        mean = model.fitted_thickness(features)
        return jnp.sum(weight * ((mean - safe_target) / safe_target) ** 2)

    @nnx.jit
    def step(model: ThicknessModel, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(int(steps))]


def make_thickness_model(
    kind: str,
    *,
    n_frames: int,
    features: FrameFeatures | None = None,
    initial: float = 500.0,
    rngs: nnx.Rngs | None = None,
    **options,
) -> ThicknessModel:
    """Build a thickness model by name.

    Args:
      kind: one of "constant", "per-frame", "platelet", "wedge", "profile-net", "map-net".
      n_frames: number of frames (used by "per-frame").
      features: the dataset's frames; "map-net" starts its normal along their mean beam.
      initial: starting thickness, Å (scalar; "per-frame" also takes shape (n_f,)).
      rngs: random keys for the networks (default ``nnx.Rngs(0)``).
      **options: passed on to the model's constructor (lower, upper, hidden, n_nodes, …).

    Raises:
      EdkitError: unknown kind, naming the choices.
    """
    if kind == "constant":
        return ConstantThickness(initial, **options)
    if kind == "per-frame":
        return PerFrameThickness(n_frames, initial, **options)
    if kind == "platelet":
        return PlateletThickness(initial, **options)
    if kind == "wedge":
        return PlateletThickness(initial, wedge=True, **options)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if kind == "profile-net":
        return ProfileNet(rngs=rngs, initial=initial, **options)
    if kind == "map-net":
        if "normal" not in options and features is not None:
            mean_beam = np.mean(np.asarray(features.beam, dtype=float), axis=0)
            if np.linalg.norm(mean_beam) > 1e-6:
                options["normal"] = mean_beam
        return ThicknessMap(rngs=rngs, initial=initial, **options)
    raise EdkitError(f"unknown thickness model {kind!r}; choose one of {', '.join(KINDS)}")


__all__ = [
    "CLAMP_SOFTNESS",
    "COS_MIN",
    "COS_SOFTNESS",
    "KINDS",
    "LOWER",
    "UPPER",
    "ConstantThickness",
    "FrameFeatures",
    "PerFrameThickness",
    "PlateletThickness",
    "ProfileNet",
    "ThicknessMap",
    "ThicknessModel",
    "bounded",
    "check_finite",
    "fit_to_thickness",
    "frame_features",
    "make_thickness_model",
    "soft_clamp",
    "soft_floor",
    "unbounded",
]
