"""Building a refinement once from (crystal, dataset, options): set-up, memory plan, start.

:func:`prepare` does every fixed step in order — the frame set-up, the memory plan (before any
heavy work, so that a problem too large for the budget is refused at once), the data masks,
the thickness search (streamed; :mod:`edkit.simulate.thickness_search`), the hybrid model
initialised near it and the :class:`~edkit.refine.problem.Problem` — for a new refinement and a
loaded checkpoint alike, with a progress bar over these steps (and one over the search's frames).
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from flax import nnx

from edkit.constants import electron_wavelength
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.models.hybrid import HybridModel
from edkit.models.parameters import StructureMapping, structure_mapping
from edkit.models.thickness import (
    FrameFeatures,
    ProfileNet,
    check_finite,
    fit_to_thickness,
    frame_features,
    make_thickness_model,
)
from edkit.physics.geometry import frame_orientations
from edkit.physics.rocking import LAB_BEAM
from edkit.physics.structure import structure_tables
from edkit.progress import progress_bar
from edkit.refine import core
from edkit.refine.candidates import candidate_losses
from edkit.refine.objective import loss_from_sums
from edkit.refine.options import DEFAULT_LEARNING_RATES, GROUPS, RefinementOptions
from edkit.refine.planner import MemoryPlan, plan_memory
from edkit.refine.problem import Problem, build_problem
from edkit.refine.restraints import parse_restraints
from edkit.simulate.frames import FrameSetup, build_frame_setup, thickness_search
from edkit.simulate.stack import stack_config


@dataclass
class Prepared:
    """What :func:`prepare` builds (each becomes an attribute of the ``Refinement``).

    Attributes:
      setup: the frame set-up. mapping: structure coefficients → structure. memory_plan: the
      planner's choice. features: the thickness model's per-frame inputs. i_obs, sigma: every
      reflection, (n_refl,). validation_frames: held-out frames, (n_f,). train_mask,
      validation_mask: scored reflections used and held out, (n_refl,).
      thickness_search_result: the thickness search (None when the start thickness was given).
      initial_thickness: Å, (n_f,). graphdef, params: the hybrid model split. base_learning_rates,
      enabled: per group. problem: the fixed data of the core. start_spread_losses: see below.
    """

    setup: FrameSetup
    mapping: StructureMapping
    memory_plan: MemoryPlan
    features: FrameFeatures
    i_obs: np.ndarray
    sigma: np.ndarray
    validation_frames: np.ndarray
    train_mask: np.ndarray
    validation_mask: np.ndarray
    thickness_search_result: xr.Dataset | None
    initial_thickness: np.ndarray
    graphdef: Any
    params: Any
    base_learning_rates: dict[str, float]
    enabled: dict[str, bool]
    problem: Problem
    #: The training loss at each start spread tried (σ/μ → loss; empty when none was tried).
    start_spread_losses: dict[float, float]
    #: I_calc of every reflection at ``params`` when the spread choice computed it, else None.
    start_i_calc: np.ndarray | None


#: The profile network's start spreads σ/μ tried when ``thickness_spread`` is None.
START_SPREADS = (0.01, 0.05)


def prepare(
    crystal: Crystal,
    dataset: xr.Dataset,
    opts: RefinementOptions,
    initial_thickness: np.ndarray | None = None,
    *,
    progress: bool | None = None,
    stop_after_search: Callable[[xr.Dataset], bool] | None = None,
) -> Prepared | None:
    """Build everything fixed of a refinement (see the module docstring). Call under x64.

    Args:
      crystal, dataset: the start and the data.
      opts: checked options.
      initial_thickness: per-frame start thickness, Å, (n_f,); None runs the thickness search.
      progress: progress bars (tqdm: stderr, or widgets in a notebook) over the steps and the
        search's frames, with elapsed time and ETA; None: where someone watches (an
        interactive terminal or a notebook, :func:`edkit.progress.wants_progress`).
      stop_after_search: called with the thickness search's result; where it returns True the
        preparation stops there and returns None. Why: a refinement that judges its start by
        this search (``kinematic_start="auto"``) sets up again from another start when it fits
        badly, and would throw the model, the problem and the spread choice away.

    Raises:
      EdkitError: nothing scored, a frame too large for the memory budget (before the
        thickness search), or a thickness model with non-finite output.
    """
    with progress_bar(4, "preparing: frame set-up", "step", progress) as bar:
        return _prepare(crystal, dataset, opts, initial_thickness, bar, progress, stop_after_search)


#: What a refinement reads from a dataset (``edkit.read_pets`` gives all of them).
REQUIRED_FIELDS = ("frame", "h", "k", "l", "frame_id", "I_obs", "sigma", "UB", "voltage")
#: Accelerating voltages of electron diffraction instruments, V (λ = 0.122–0.0036 Å; 0.037–0.020 Å
#: at 100–300 kV); a wavelength outside means the file's radiation is not electrons.
VOLTAGE_RANGE = (10e3, 3e6)


def check_inputs(crystal: Any, dataset: Any) -> None:
    """Refuse what a refinement cannot start from, naming the argument and what was expected:
    a structure that is not a Crystal, a dataset that is not an xarray Dataset with the fields
    of :data:`REQUIRED_FIELDS`, or a wavelength that is not an electron microscope's."""
    if not isinstance(crystal, Crystal):
        raise EdkitError(
            "crystal: expected an edkit Crystal (edkit.read_cif(path)), got "
            f"{type(crystal).__name__}"
        )
    if not isinstance(dataset, xr.Dataset):
        raise EdkitError(
            "dataset: expected an xarray.Dataset (edkit.read_pets(path)), got "
            f"{type(dataset).__name__}"
        )
    source = dataset.attrs.get("source_file", "the dataset")
    missing = [name for name in REQUIRED_FIELDS if name not in dataset.variables]
    if missing:
        raise EdkitError(
            f"{source}: no {', '.join(missing)}; a refinement needs {', '.join(REQUIRED_FIELDS)} "
            "(as edkit.read_pets gives them)"
        )
    voltage = float(dataset["voltage"])
    low, high = VOLTAGE_RANGE
    if not (math.isfinite(voltage) and low <= voltage <= high):
        wavelength = dataset["wavelength"].values if "wavelength" in dataset else None
        given = f"wavelength {float(wavelength):g} Å, " if wavelength is not None else ""
        raise EdkitError(
            f"{source}: {given}voltage {voltage:g} V is not an electron microscope's (expected "
            f"{low / 1e3:g} kV–{high / 1e6:g} MV, λ = {electron_wavelength(low):.3f}–"
            f"{electron_wavelength(high):.4f} Å): not electron diffraction data, or the wavelength "
            "field holds another unit"
        )


def _hkl_frame(dataset: xr.Dataset, i: int) -> str:
    """'hkl h k l, frame f' of reflection ``i``, for messages."""
    hkl = " ".join(str(int(dataset[c].values[i])) for c in ("h", "k", "l"))
    return f"hkl {hkl}, frame {int(dataset['frame_id'].values[i])}"


def check_observations(dataset: xr.Dataset) -> None:
    """Refuse observations a refinement cannot use: a non-finite I_obs or σ, or a negative σ
    (a dataset changed in Python after reading; the PETS reader refuses them in files).

    Raises:
      EdkitError: names the source, the field, the first bad reflection (index, hkl, frame)
        and how many are bad.
    """
    source = dataset.attrs.get("source_file", "the dataset")
    for name in ("I_obs", "sigma"):
        values = np.asarray(dataset[name].values, dtype=np.float64)
        bad = ~np.isfinite(values) | ((values < 0) if name == "sigma" else False)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EdkitError(
                f"{source}: {name} of reflection {i} ({_hkl_frame(dataset, i)}) is "
                f"{values[i]!r}; {int(bad.sum())} reflection(s) have a {name} that is "
                + ("not finite or negative" if name == "sigma" else "not finite")
            )


def check_problem_data(problem: Problem, dataset: xr.Dataset) -> None:
    """Refuse a refinement whose own copy of the observations became non-finite after it was
    set up (memory corruption, a change made from Python): EdkitError naming the reflection.
    Called when a step's loss is not finite, to tell a data fault from a numerical one."""
    chunks = problem.host.chunks if problem.host is not None else problem.chunks
    for chunk in chunks:
        index = np.asarray(chunk.refl_index)
        real = index < problem.n_refl  # padding rows point past the last reflection
        for name in ("i_obs", "sigma"):
            values = np.asarray(getattr(chunk, name))[real]
            bad = ~np.isfinite(values)
            if bad.any():
                i = int(index[real][np.flatnonzero(bad)[0]])
                field = "I_obs" if name == "i_obs" else "sigma"
                raise EdkitError(
                    f"the refinement's copy of {field} became non-finite after its set-up "
                    f"(reflection {i}, {_hkl_frame(dataset, i)}: {values[bad][0]!r}); stopped "
                    "at the best state"
                )


def plan_setup(
    crystal: Crystal, dataset: xr.Dataset, opts: RefinementOptions
) -> tuple[FrameSetup, Any, MemoryPlan]:
    """The cheap half of :func:`prepare` (no solve): the inputs checked, the frame set-up, the
    structure's parameter mapping and the memory plan; what ``edkit validate`` reports.

    Raises:
      EdkitError: inputs that are not a refinement's, nothing scored, or a frame too large for
        the memory budget.
    """
    check_inputs(crystal, dataset)
    check_observations(dataset)
    setup = build_frame_setup(
        crystal, dataset, g_max=opts.g_max, sg_max=opts.sg_max, n_sub=opts.n_sub,
        sg_weak=opts.sg_weak, bethe_terms=opts.bethe_terms, segments=opts.segments,
        tails=opts.segment_tails,
    )  # fmt: skip
    if opts.tilt_weights is not None:  # the same weights for every frame, normalised
        weights = np.asarray(opts.tilt_weights, dtype=np.float64)
        weights = np.broadcast_to(weights / weights.sum(), setup.weights.shape)
        setup = dataclasses.replace(setup, weights=np.ascontiguousarray(weights))
    if not setup.scored.any():
        raise EdkitError(
            f"no reflection of {dataset.attrs.get('source_file', 'the dataset')} is "
            "scored (Klar selection); check g_max, the orientation matrix and the cell"
        )
    mapping = structure_mapping(crystal, riding=opts.riding, riding_uiso=opts.riding_uiso)
    plan = plan_memory(
        setup, n_t=2, precision=opts.precision, remat=opts.remat,
        chunk_frames=opts.chunk_frames, batch_size=opts.batch_size,
        memory_limit=opts.memory_limit,
        n_parameters=int(mapping.position_mask.sum() + mapping.adp_mask.sum()),
        devices=opts.devices,
    )  # fmt: skip
    return setup, mapping, plan


def _prepare(
    crystal: Crystal,
    dataset: xr.Dataset,
    opts: RefinementOptions,
    initial_thickness: np.ndarray | None,
    bar: Any,
    progress: bool | None,
    stop_after_search: Callable[[xr.Dataset], bool] | None,
) -> Prepared | None:
    def advance(next_step: str) -> None:
        bar.update()
        bar.set_description(f"preparing: {next_step}")

    setup, mapping, plan = plan_setup(crystal, dataset, opts)
    advance("thickness search")
    features = _features(dataset, setup)
    i_obs = np.asarray(dataset["I_obs"].values, dtype=np.float64)
    sigma = np.asarray(dataset["sigma"].values, dtype=np.float64)
    validation = np.zeros(setup.n_frames, dtype=bool)
    if opts.validation_fraction > 0:
        every = max(2, round(1.0 / opts.validation_fraction))
        validation[every // 2 :: every] = True
    scored = setup.scored & (sigma > 0)
    train_mask = scored & ~validation[setup.refl_frame]
    validation_mask = scored & validation[setup.refl_frame]

    search = None
    if initial_thickness is None:
        start, stop, step = opts.thickness_grid
        grid = np.arange(start, stop + 0.5 * step, step)
        # complex64 solves whatever the refinement's precision: this is a start value, and on
        # real quartz every frame's thickness came out identical (R curves within 6e-6) in 17 %
        # less time; large beam sets, where the solves are the whole cost, gain more.
        search = thickness_search(
            crystal, dataset, grid, setup=setup, chunk_frames=plan.chunk_frames,
            solve_dtype=jnp.complex64, progress=progress, devices=plan.devices,
        )  # fmt: skip
        best = search["thickness_best"].values
        if not np.isfinite(best).any():
            raise EdkitError("the thickness search found no frame with observed reflections")
        if stop_after_search is not None and stop_after_search(search):
            return None
        # Frames without observations take the smoothness prior's path through them.
        initial_thickness = np.where(np.isfinite(best), best, search["thickness_trend"].values)
    initial = np.asarray(initial_thickness, dtype=np.float64)
    advance("model")
    model = _model(opts, setup, mapping, features, initial, search)
    graphdef, params = nnx.split(model, nnx.Param)
    rates = {**DEFAULT_LEARNING_RATES, **opts.learning_rates}
    base_rates = {g: float(rates[g]) for g in GROUPS}
    advance("problem")
    problem = build_problem(
        setup, i_obs, sigma, train_mask, validation_mask,
        tables=structure_tables(crystal), features=features, mapping=mapping,
        graphdef=graphdef,
        optimizer=core.make_optimizer(params, GROUPS, base_rates, opts.decay_steps),
        config=stack_config(
            setup, opts.absorption is not None, "eig",
            jnp.complex64 if plan.precision == "single" else None, opts.batch_size,
            plan.remat, plan.devices,
        ),
        objective=opts.objective, chunk_frames=plan.chunk_frames, fused=plan.fused,
    )  # fmt: skip
    if opts.restraints:
        if opts.objective != "jana":
            raise EdkitError(
                f"restraints need objective='jana' (their Σ(Δ/σ)² joins Jana's weighted sum of "
                f"squares); objective={opts.objective!r}"
            )
        restraints = parse_restraints(opts.restraints, crystal)
        problem = dataclasses.replace(problem, restraints=restraints)
    spread_losses: dict[float, float] = {}
    start_i_calc = None
    if isinstance(model.thickness, ProfileNet) and model.thickness.spread:
        spreads = START_SPREADS if opts.thickness_spread is None else (opts.thickness_spread,)
        if opts.thickness_spread is None and search is None:
            spreads = (ProfileNet.initial_spread,)  # a given start (a checkpoint): no choice
        params, spread_losses, start_i_calc = start_spread(model, spreads, problem)
    bar.update()
    return Prepared(
        setup, mapping, plan, features, i_obs, sigma, validation, train_mask, validation_mask,
        search, initial, graphdef, params, base_rates, {g: g in opts.refine for g in GROUPS},
        problem, spread_losses, start_i_calc,
    )  # fmt: skip


def start_spread(
    model: HybridModel, spreads: tuple[float, ...], problem: Problem
) -> tuple[Any, dict[float, float], np.ndarray | None]:
    """Set the profile network's start spread σ/μ to the candidate with the lowest training loss
    (a small, fused problem: one forward pass each; a streamed one: one pass for all, each
    orientation solved once at every candidate's thickness nodes,
    :func:`~edkit.refine.candidates.candidate_losses`; a single candidate is set without one).

    Why a choice: at thick crystals (1300–2000 Å) a 5 % spread washes out the Pendellösung
    fringes that locate each frame's thickness, and the fit cannot sharpen them again (on clean
    synthetic quartz, started from the truth, it drifted 0.011 Å; from 1 %, 0.0016 Å), while
    real crystals can hold a wider spread. Returns the parameters, each candidate's loss and
    the chosen candidate's I_calc (n_refl,) (None without a choice).
    """
    thickness = model.thickness
    assert isinstance(thickness, ProfileNet)
    candidates = []
    for spread in spreads:
        thickness.set_relative_spread(spread)
        candidates.append(jax.tree.map(lambda x: x, nnx.state(model, nnx.Param)))  # a snapshot
    if len(spreads) == 1:
        return candidates[0], {}, None
    values: Any
    i_calcs: Any
    if problem.fused:  # a small problem: one compiled program a pass
        passes = [loss_and_i_calc(params, problem) for params in candidates]
        values, i_calcs = [v for v, _ in passes], [i for _, i in passes]
    else:  # streamed: each orientation solved once for every candidate's thickness nodes
        values, i_calcs = candidate_losses(problem, candidates)
    losses = {float(s): float(v) for s, v in zip(spreads, values, strict=True)}
    best = int(np.argmin([v if math.isfinite(v) else math.inf for v in losses.values()]))
    thickness.set_relative_spread(spreads[best])
    return nnx.state(model, nnx.Param), losses, np.asarray(i_calcs[best])


def spread_messages(losses: dict[float, float]) -> list[str]:
    """The line that says which start spread was chosen and why (none without a choice)."""
    if len(losses) < 2:
        return []
    chosen = min(losses, key=lambda s: losses[s] if math.isfinite(losses[s]) else math.inf)
    tried = ", ".join(f"{100 * s:g} %: {v:.4g}" for s, v in losses.items())
    return [f"start thickness spread σ/μ = {100 * chosen:g} % (training loss {tried})"]


def loss_and_i_calc(params: Any, problem: Problem) -> tuple[float, np.ndarray]:
    """The training loss of ``params`` and every reflection's I_calc, (n_refl,), from one
    streamed forward pass (no gradient)."""
    train, _, i_calc, _ = core.accumulate(problem, params, gradient=False)
    loss, _ = loss_from_sums(problem.objective, train, problem.train_denominator)
    return float(loss), np.asarray(i_calc)


def _model(
    opts: RefinementOptions,
    setup: FrameSetup,
    mapping: StructureMapping,
    features: FrameFeatures,
    initial: np.ndarray,
    search: xr.Dataset | None,
) -> HybridModel:
    thickness = make_thickness_model(
        opts.thickness, n_frames=setup.n_frames, features=features,
        initial=float(np.median(initial)), rngs=nnx.Rngs(opts.seed),
    )  # fmt: skip
    if search is not None:
        # Initialise the network near what the thickness search found (science.md §6).
        finite = np.isfinite(search["thickness_best"].values)
        fit_to_thickness(thickness, features, jnp.asarray(initial), jnp.asarray(finite))
    model = HybridModel(
        mapping.fract0.shape[0], setup.n_frames, thickness, absorption=opts.absorption
    )
    values, weights = thickness(features)
    if not check_finite(values, weights):
        raise EdkitError(f"the {opts.thickness!r} thickness model produced non-finite values")
    return model


def _features(dataset: xr.Dataset, setup: FrameSetup) -> FrameFeatures:
    rotations = frame_orientations(dataset).values
    beams = np.einsum("fji,j->fi", rotations, LAB_BEAM)  # Oᵀ(−z): electrons' direction, crystal
    return frame_features(jnp.asarray(dataset["alpha"].values), jnp.asarray(beams))
