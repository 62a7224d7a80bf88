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
    losses = [1.0, 0.5, 0.6, 0.55, 0.7, 0.52]
    assert rule.reason(losses) is not None
    assert rule.reason([*losses[:-1], 0.45]) is None  # a new best 10 % lower: not yet


def test_too_few_steps_never_converge() -> None:
    rule = Convergence(window=3, tolerance=1e-3, min_steps=8)
    assert rule.reason([1.0] * 7) is None
    assert rule.reason([1.0] * 8) is not None
    assert Convergence(window=5, min_steps=0).reason([1.0] * 5) is None  # nothing before


def test_a_warm_up_is_not_compared_with() -> None:
    """After a new start the fresh moments push the loss up before it falls below the start
    again: measured against the start's loss that stage looks converged; its warm-up steps
    (``settle``) are not compared with, so while it falls it has not."""
    rule = Convergence(window=3, tolerance=1e-3, min_steps=0)
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
    [({"window": 0}, "window"), ({"tolerance": -1.0}, "tolerance"), ({"min_steps": -2}, "min")],
)
def test_bad_rules(keywords, match) -> None:
    with pytest.raises(EdkitError, match=match):
        Convergence(**keywords)
