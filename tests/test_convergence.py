"""The Adam stage's stopping rule (edkit.refine.convergence): pure, no JAX."""

import math

import pytest

from edkit import EdkitError
from edkit.refine.convergence import Convergence


def test_a_falling_loss_has_not_converged() -> None:
    rule = Convergence(window=3, tolerance=1e-3, min_steps=0)
    losses = [1.0 * 0.99**i for i in range(10)]  # 1 % per step: 3 % per window
    assert rule.reason(losses) is None


def test_a_flat_loss_has_converged_and_says_by_how_much() -> None:
    rule = Convergence(window=3, tolerance=1e-3, min_steps=0)
    losses = [1.0, 0.5, 0.4, 0.4, 0.39999, 0.39998]
    reason = rule.reason(losses)
    assert reason is not None and "over the last 3 steps" in reason and "< 0.1 %" in reason


def test_noise_without_progress_has_converged() -> None:
    """Adam's loss jumps about: only the best loss counts."""
    rule = Convergence(window=4, tolerance=1e-3, min_steps=0)
    losses = [1.0, 0.5, 0.504, 0.502, 0.507, 0.503]
    assert rule.reason(losses) is not None
    assert rule.reason([*losses[:-1], 0.45]) is None  # a new best 10 % lower: not yet


def test_a_bump_is_not_a_plateau() -> None:
    """The real quartz demo's new thickness start (2026-12-06): the stage's best stopped
    falling because the loss rose 4-6 % for 20 steps and then fell back; while the last
    ``window`` losses spread over more than ``spread`` (1 %) the stage goes on, rising or
    falling, unless the losses are a validation set's (there a rise is overfitting)."""
    rule = Convergence(window=3, tolerance=1e-3, min_steps=0)
    bump = [0.0500, 0.0460, 0.0445, 0.0443, 0.0446, 0.0453, 0.0462, 0.0468]
    assert rule.reason(bump) is None
    assert rule.reason([*bump, 0.0461, 0.0452, 0.0447]) is None  # falling back, still moving
    assert rule.reason(bump, validation=True) is not None  # early stopping on validation
    assert Convergence(window=3, min_steps=0, spread=0.1).reason(bump) is not None
    assert rule.reason([*bump[:5], 0.04435, 0.04432, 0.04431]) is not None  # flat: converged


def test_too_few_steps_never_converge() -> None:
    rule = Convergence(window=3, tolerance=1e-3, min_steps=8)
    assert rule.reason([1.0] * 7) is None
    assert rule.reason([1.0] * 8) is not None
    assert Convergence(window=5, min_steps=0).reason([1.0] * 5) is None  # nothing before


def test_a_warm_up_is_not_compared_with() -> None:
    """After a new start the fresh moments push the loss up before it falls below the start
    again: measured against the start's loss that stage looks converged; its warm-up steps
    (``settle``) are not compared with, so while it falls it has not."""
    rule = Convergence(window=3, tolerance=1e-3, min_steps=0, spread=math.inf)
    losses = [1.0, 1.5, 1.8, 1.6, 1.4, 1.2, 1.1]  # the start, the bump, then 8-14 % a step
    assert rule.reason(losses) is not None  # the start's 1.0 is the best "before"
    assert rule.reason(losses, settle=2) is None
    assert rule.reason([*losses, 1.1, 1.1, 1.1], settle=2) is not None  # flat since: converged
    assert rule.reason(losses[:5], settle=2) is None  # too few steps after the warm-up


def test_non_finite_losses_are_skipped() -> None:
    rule = Convergence(window=2, tolerance=1e-3, min_steps=0)
    assert rule.reason([math.nan, math.nan, 1.0]) is None
    assert rule.reason([1.0, math.inf, 1.0, math.nan]) is not None


@pytest.mark.parametrize(
    ("keywords", "match"),
    [
        ({"window": 0}, "window"),
        ({"tolerance": -1.0}, "tolerance"),
        ({"min_steps": -2}, "min"),
        ({"spread": -0.1}, "spread"),
    ],
)
def test_bad_rules(keywords, match) -> None:
    with pytest.raises(EdkitError, match=match):
        Convergence(**keywords)
