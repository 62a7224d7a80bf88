"""The one definition of a refinement's options: types, defaults, help and checks.

``RefinementOptions`` is the single source: ``edkit refine``'s flags, their defaults, choices and
help lines, the checkpoint's JSON and the checks of ``Refinement(crystal, dataset, **options)``
all come from its fields' ``metadata``: "help"; "units" ("" when dimensionless or a count);
"cli", the ``edkit refine`` flag or None (API only); "none", what None means where allowed; and
for the flag: "zero" (0 on the command line means None), "bare" (the value of the bare flag, which
takes an optional value) or "flag" (the value a valueless flag sets).
"""

import dataclasses
import difflib
import math
import numbers
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from edkit.errors import EdkitError
from edkit.simulate.frames import DEFAULT_G_MAX

ParameterGroup = Literal["positions", "adp", "occupancy", "orientation", "absorption", "thickness"]
GROUPS: tuple[str, ...] = typing.get_args(ParameterGroup)
ThicknessKind = Literal["constant", "per-frame", "platelet", "wedge", "profile-net", "map-net"]
THICKNESS_KINDS: tuple[str, ...] = typing.get_args(ThicknessKind)
Objective = Literal["jana", "wr2"]
Precision = Literal["auto", "double", "single"]
#: Gradient memory: False keeps every intermediate, "eigensystems" only the eigendecompositions,
#: True recomputes each frame in the backward pass, None lets the memory planner choose.
Remat = bool | Literal["eigensystems"] | None
#: The kinematical start: always, never, or "auto" (where the given model fits the search badly).
KinematicChoice = bool | Literal["auto"]

#: Adam step sizes in each group's own units: Å, Å², 1, radians, 1 (κ), network units.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "positions": 3e-3,
    "adp": 3e-4,
    "occupancy": 3e-3,
    "orientation": 2e-4,
    "absorption": 3e-3,
    "thickness": 5e-3,
}
#: Refinement beam defaults: beams within 0.005 Å⁻¹ of the Ewald sphere solved exactly, those up
#: to 0.03 Å⁻¹ as Bethe potentials. On real quartz this matches the exact solve of every beam to
#: 0.03 Å⁻¹ (mean per-frame R within 0.01 %, tests/test_bethe.py) with a third fewer beams.
REFINE_SG_MAX = 0.005  # Å⁻¹
REFINE_SG_WEAK = 0.03  # Å⁻¹
#: Chebyshev terms of the Bethe correction shared by a frame's sub-orientations: 12 keep the
#: quartz intensities to 4e-7 of the per-orientation correction (tests/test_bethe.py).
REFINE_BETHE_TERMS = 12
#: The groups ``structure_delay`` holds: the structure itself.
STRUCTURE_GROUPS: tuple[str, ...] = ("positions", "adp", "occupancy")
#: The bare ``--absorption`` flag's κ.
DEFAULT_ABSORPTION_FLAG = 0.05


def _meta(*, help: str, cli: str | None, units: str = "", **more: Any) -> dict[str, Any]:
    """A field's metadata: help, units ("" for counts and names), cli flag (None: API only)."""
    return {"help": help, "units": units, "cli": cli, **more}


@dataclass(frozen=True)
class RefinementOptions:
    """Choices of a refinement (all JSON-serialisable; saved in checkpoints).

    Build it with :func:`options_from` (lists become tuples, unknown names get a suggestion);
    construction checks every value and raises :class:`~edkit.errors.EdkitError`.
    """

    # fmt: off
    refine: tuple[ParameterGroup, ...] = field(
        default=("positions", "adp", "thickness", "orientation"),
        metadata=_meta(cli="--refine", help="parameter groups to refine (comma-separated on the "
                       f"command line), among {', '.join(GROUPS)}"))
    thickness: ThicknessKind = field(default="profile-net", metadata=_meta(
        cli="--thickness",
        help="thickness model (profile-net: the paper's α → (μ, σ) network; map-net: a map)"))
    absorption: float | None = field(default=None, metadata=_meta(
        cli="--absorption", units="1", none="no absorption", bare=DEFAULT_ABSORPTION_FLAG,
        help=f"proportional absorption κ (U' = κU); bare flag: {DEFAULT_ABSORPTION_FLAG}"))
    g_max: float = field(default=DEFAULT_G_MAX, metadata=_meta(
        cli="--g-max", units="Å⁻¹", help="resolution limit of the beams"))
    sg_max: float = field(default=REFINE_SG_MAX, metadata=_meta(
        cli="--sg-max", units="Å⁻¹",
        help="beams solved exactly: smallest |S_g| over the frame ≤ this"))
    sg_weak: float | None = field(default=REFINE_SG_WEAK, metadata=_meta(
        cli="--sg-weak", units="Å⁻¹", none="no Bethe potentials", zero=True,
        help="beams up to this |S_g| join as Bethe potentials (0: none)"))
    bethe_terms: int | None = field(default=REFINE_BETHE_TERMS, metadata=_meta(
        cli="--bethe-terms", none="built at every sub-orientation", zero=True,
        help="Chebyshev terms of the Bethe correction shared by a frame's sub-orientations "
        "(0: build it at every sub-orientation)"))
    n_sub: int | None = field(default=None, metadata=_meta(
        cli="--n-sub", none="from the rocking width and mosaicity, 0.05° apart",
        help="sub-orientations per frame"))
    segments: int = field(default=1, metadata=_meta(
        cli="--segments",
        help="split each frame's sub-orientations into this many runs, each solving only its "
        "own beams (fewer, cheaper solves for large frames; 1: the frame's beams throughout)"))
    segment_tails: bool = field(default=False, metadata=_meta(
        cli="--segment-tails", flag=True,
        help="with --segments: add the first-order tails of the frame's other beams to each "
        "run (and solve the beams they resonate with): closer to the frame solve, costlier"))
    kinematic_start: KinematicChoice = field(default="auto", metadata=_meta(
        cli="--kinematic-start", flag=True, negated="--no-kinematic-start",
        negated_help="no kinematical start, even from a far-off model",
        help="from a far-off model: fit the positions to |F|² and choose one overall U by the "
        "thickness search before anything else (edkit.refine.kinematic); auto: only where the "
        "given model's thickness search fits at a mean per-frame R_obs above "
        "edkit.refine.kinematic.FAR_OFF_R (17 %)"))
    tilt_weights: tuple[float, ...] | None = field(default=None, metadata=_meta(
        cli=None, units="1", none="uniform (each sub-orientation its slice of the rocking range)",
        help="relative weights of a frame's n_sub sub-orientations, shared by every frame "
        "(edkit.compat sets the paper code's moving average); needs n_sub"))
    objective: Objective = field(default="jana", metadata=_meta(
        cli=None, help="jana: wR on |F|, Jana weights; wr2: diffBloch's per-frame intensity wR2"))
    learning_rates: dict[str, float] = field(default_factory=dict, metadata=_meta(
        cli=None, units="each group's units (see DEFAULT_LEARNING_RATES)",
        help="per-group Adam step sizes overriding DEFAULT_LEARNING_RATES"))
    decay_steps: int = field(default=200, metadata=_meta(
        cli=None, units="steps", help="learning rates decay as 1/(1 + step/decay_steps)"))
    warmup_steps: int = field(default=10, metadata=_meta(
        cli="--warmup-steps", units="steps",
        help="each group's learning rate ramps linearly from 1/N to full over its first N "
        "steps, so that Adam's first, sign-sized steps do not throw the fit off (0: no ramp)"))
    structure_delay: int = field(default=5, metadata=_meta(
        cli="--structure-delay", units="steps",
        help="positions, ADPs and occupancies are held for the first N steps while thickness, "
        "orientations and scales settle (0: all groups from the first step)"))
    validation_fraction: float = field(default=0.0, metadata=_meta(
        cli=None, units="1",
        help="fraction of frames held out (every k-th); the best state is chosen on their loss"))
    seed: int = field(default=0, metadata=_meta(cli="--seed", help="initialises the networks"))
    batch_size: int = field(default=8, metadata=_meta(
        cli=None, units="frames", help="frames per vmapped batch"))
    thickness_grid: tuple[float, float, float] = field(default=(50.0, 2000.0, 25.0), metadata=_meta(
        cli=None, units="Å", help="start, stop, step of the initial thickness grid search"))
    thickness_spread: float | None = field(default=None, metadata=_meta(
        cli="--thickness-spread", units="1",
        none="whichever of 1 % and 5 % fits the start better (after the thickness search)",
        help="the profile-net's start spread σ/μ of each frame's thickness (e.g. 0.05)"))
    restraints: tuple[str, ...] = field(default=(), metadata=_meta(
        cli="--restrain", none="no restraints",
        help="a restraint in SHELX syntax, e.g. 'DFIX 1.09 0.02 C2 H1', 'DANG 2.5 O1 O2', "
        "'SIMU', 'RIGU' (edkit.refine.restraints; repeat the flag for several)"))
    riding: bool = field(default=True, metadata=_meta(
        cli=None, help="riding constraints (hydrogen atoms on their parents)"))
    riding_uiso: bool = field(default=True, metadata=_meta(
        cli="--fixed-h-uiso", flag=False,
        help="a riding isotropic H's Uiso is 1.2 × its parent's Ueq (1.5 for OH and groups of "
        "three H) as the parent refines; False (--fixed-h-uiso): the model's own Uiso, fixed"))
    divergence_factor: float = field(default=3.0, metadata=_meta(
        cli=None, units="1", help="a loss this many times the best one counts as divergence"))
    precision: Precision = field(default="auto", metadata=_meta(
        cli="--precision", help="complex128 (double) or complex64 (single) Bloch solves; auto: "
        "single in the gradient steps, and in the least squares and s.u.'s where the largest "
        "solve has 400 beams or more (edkit.refine.planner.AUTO_SINGLE_BEAMS), else double "
        "there"))
    devices: int | None = field(default=None, metadata=_meta(
        cli="--devices", none="every local device the memory budget allows (on CPU one per "
        "core, edkit.cores)", help="shard frames over N devices (on CPU: N host devices)"))
    remat: Remat = field(default=None, metadata=_meta(
        cli="--low-memory", flag="eigensystems", none="chosen by the memory planner",
        help="keep only the eigendecompositions for the gradient (large cells)"))
    memory_limit: float | None = field(default=None, metadata=_meta(
        cli="--memory-limit", units="bytes",
        none="the planner's budget, a safe fraction of available memory",
        help="memory budget of the planner: bytes, or e.g. 8G (powers of 1000), 8GiB (of 1024)"))
    chunk_frames: int | None = field(default=None, metadata=_meta(
        cli="--chunk-frames", units="frames", none="chosen by the memory planner",
        help="frames per streamed chunk"))
    # fmt: on

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            _check(option.name, getattr(self, option.name))
        if self.tilt_weights is not None and len(self.tilt_weights) != self.n_sub:
            raise EdkitError(
                f"tilt_weights has {len(self.tilt_weights)} value(s); expected one per "
                f"sub-orientation (n_sub = {self.n_sub}): give n_sub with tilt_weights"
            )
        if "absorption" in self.refine and self.absorption is None:
            raise EdkitError(
                "refine includes 'absorption' but absorption is None; give a starting κ"
            )


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RefinementOptions))
_HINTS = typing.get_type_hints(RefinementOptions)
#: The allowed values of each Literal-typed option (for ``refine``: of each element).
CHOICES: dict[str, tuple[str, ...]] = {
    name: typing.get_args(hint)
    for name, hint in _HINTS.items()
    if typing.get_origin(hint) is Literal
} | {"refine": GROUPS}


def options_from(**kwargs: Any) -> RefinementOptions:
    """Checked options from keywords (a checkpoint's JSON too): lists become tuples.

    Raises :class:`~edkit.errors.EdkitError` naming an unknown keyword and the closest valid
    one, or a bad value and what was expected.
    """
    for key in kwargs:
        if key not in OPTION_NAMES:
            close = difflib.get_close_matches(key, OPTION_NAMES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {OPTION_NAMES}"
            raise EdkitError(f"unknown refinement option {key!r}; {hint}")
    values = dict(kwargs)
    for key in ("refine", "restraints"):
        if isinstance(values.get(key), str):
            values[key] = (values[key],)
    for key in ("refine", "restraints", "thickness_grid", "tilt_weights"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if isinstance(values.get("learning_rates"), dict):
        values["learning_rates"] = dict(values["learning_rates"])
    return RefinementOptions(**values)


def options_json(options: RefinementOptions) -> dict[str, Any]:
    """JSON-ready options (tuples as lists); ``options_from(**options_json(o)) == o``."""
    out: dict[str, Any] = {}
    for name in OPTION_NAMES:
        value = getattr(options, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    out["learning_rates"] = dict(options.learning_rates)
    return out


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgtp]?)(i?)b?\s*", re.IGNORECASE)


def parse_memory(text: str | float | int) -> float:
    """A memory size in bytes from "8G", "8GB", "8 GiB", "500M", "1.5T" or a plain number.

    K, M, G, T, P (with or without B) are powers of 1000, as the memory planner reports GB;
    KiB, MiB, GiB, TiB, PiB are powers of 1024; a plain number is bytes. Raises
    :class:`~edkit.errors.EdkitError` unless the size is finite and > 0.
    """
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        size = float(text)
    else:
        match = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if match is None or (match[3] and not match[2]):
            raise EdkitError(
                f"memory size {text!r}: expected bytes, or a number with K, M, G, T or P "
                "(powers of 1000) or KiB … PiB (powers of 1024), e.g. '8G', '500MB', '1.5 TiB'"
            )
        base = 1024.0 if match[3] else 1000.0
        size = float(match[1]) * base ** " kmgtp".index(match[2].lower() or " ")
    if not (math.isfinite(size) and size > 0):
        raise EdkitError(f"memory size {text!r}: expected a finite size > 0 bytes")
    return size


# ------------------------------------------------------------------------------------- checks
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _positive(value: Any) -> bool:
    return _is_real(value) and value > 0


_CHECKS: dict[str, tuple[Any, str]] = {
    "absorption": (lambda v: v is None or (_is_real(v) and v >= 0), "κ ≥ 0 or None"),
    "g_max": (_positive, "a resolution limit > 0 Å⁻¹"),
    "sg_max": (_positive, "an excitation error > 0 Å⁻¹"),
    "sg_weak": (lambda v: v is None or _positive(v), "an excitation error > 0 Å⁻¹ or None"),
    "bethe_terms": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer ≥ 1 or None"),
    "n_sub": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer ≥ 1 or None"),
    "segments": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1"),
    "segment_tails": (lambda v: isinstance(v, bool), "True or False"),
    "kinematic_start": (lambda v: isinstance(v, bool) or v == "auto", "True, False or 'auto'"),
    "tilt_weights": (
        lambda v: v is None or (isinstance(v, tuple) and len(v) >= 1
                                and all(_is_real(w) and w >= 0 for w in v) and sum(v) > 0),
        "None or a tuple of weights ≥ 0 with a positive sum",
    ),
    "decay_steps": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1 (steps)"),
    "warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0 (steps)"),
    "structure_delay": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0 (steps)"),
    "validation_fraction": (lambda v: _is_real(v) and 0 <= v < 1, "a fraction 0 ≤ f < 1"),
    "seed": (_is_int, "an integer"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1 (frames)"),
    "thickness_grid": (
        lambda v: isinstance(v, tuple) and len(v) == 3 and all(_positive(t) for t in v)
        and v[0] <= v[1],
        "(start, stop, step) in Å, all > 0, start ≤ stop",
    ),
    "thickness_spread": (
        lambda v: v is None or (_is_real(v) and 0 < v < 1), "a fraction 0 < s < 1 or None"
    ),
    "restraints": (
        lambda v: isinstance(v, tuple) and all(isinstance(r, str) for r in v),
        "a tuple of restraint instructions such as 'DFIX 1.09 C2 H1'",
    ),
    "riding": (lambda v: isinstance(v, bool), "True or False"),
    "riding_uiso": (lambda v: isinstance(v, bool), "True or False"),
    "divergence_factor": (lambda v: _is_real(v) and v > 1, "a factor > 1"),
    "devices": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer ≥ 1 or None"),
    "remat": (
        lambda v: v is None or isinstance(v, bool) or v == "eigensystems",
        "False, True, 'eigensystems' or None (the planner chooses)",
    ),
    "memory_limit": (lambda v: v is None or _positive(v), "a size > 0 bytes or None"),
    "chunk_frames": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer ≥ 1 or None"),
}  # fmt: skip


def _check(name: str, value: Any) -> None:
    """Raise EdkitError naming the option, the bad value and what was expected."""
    if name == "refine":
        if not isinstance(value, tuple):
            raise EdkitError(f"refine = {value!r}: expected a tuple of groups among {GROUPS}")
        unknown = [g for g in value if g not in GROUPS]
        if unknown:
            raise EdkitError(
                f"refine = {value!r}: unknown group(s) {unknown}; choose from {GROUPS}"
            )
    elif name == "learning_rates":
        if not isinstance(value, dict):
            raise EdkitError(f"learning_rates = {value!r}: expected a dict group -> rate")
        bad = sorted(k for k in value if k not in GROUPS)
        if bad:
            raise EdkitError(f"learning_rates: unknown group(s) {bad}; choose from {GROUPS}")
        for group, rate in value.items():
            if not (_is_real(rate) and rate >= 0):
                raise EdkitError(f"learning_rates[{group!r}] = {rate!r}: expected a rate ≥ 0")
    elif name in CHOICES:
        # Strings only: `array in tuple` would raise numpy's ambiguous-truth error.
        if not (isinstance(value, str) and value in CHOICES[name]):
            raise EdkitError(f"{name} = {value!r}: expected one of {CHOICES[name]}")
    else:
        test, expected = _CHECKS[name]
        if not test(value):
            raise EdkitError(f"{name} = {value!r}: expected {expected}")
