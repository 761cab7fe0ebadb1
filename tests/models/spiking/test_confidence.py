"""Dynamic confidence: exit steps, the calibrated threshold, and what it saves on real data."""

from __future__ import annotations

import math

import pytest
import torch

from edgeswarm.models.spiking import (
    calibrate,
    confidence,
    exit_predictions,
    exit_steps,
    simulate,
)
from edgeswarm.models.spiking.confidence import NEVER
from edgeswarm.placement.errors import InvalidInput


def test_confidence_is_the_top_softmax_probability():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert confidence(logits).tolist() == pytest.approx([0.5, 0.75])


def test_exit_steps_are_the_first_confident_step_or_the_last():
    conf = torch.tensor([[0.2, 0.9, 0.5],
                         [0.95, 0.1, 0.5],
                         [0.99, 0.9, 0.5]])  # (T=3, B=3)
    assert exit_steps(conf, 0.9).tolist() == [2, 1, 3]
    assert exit_steps(conf, 0.95).tolist() == [2, 3, 3]


def _synthetic(n_easy: int, n_hard: int, steps: int = 8) -> torch.Tensor:
    """Easy inputs are confident and right from step 1; hard ones flip at the last step."""
    logits = torch.zeros(steps, n_easy + n_hard, 3, dtype=torch.float64)
    logits[:, :n_easy, 0] = 6.0  # p ~ 0.995
    logits[:, n_easy:, 1] = 1.0  # p ~ 0.58, wrong until ...
    logits[-1, n_easy:, 1] = 0.0
    logits[-1, n_easy:, 2] = 1.0  # ... the last step
    return logits


def test_calibration_stops_the_easy_inputs_and_keeps_the_answers():
    logits = _synthetic(80, 20)
    cal = calibrate(logits, max_loss=0.02)
    assert 0.58 < cal.threshold <= 0.995
    pred, steps = exit_predictions(logits, cal.threshold)
    assert steps.tolist() == [1] * 80 + [8] * 20
    assert cal.mean_steps == pytest.approx((80 + 20 * 8) / 100)
    assert cal.disagreement == 0.0
    assert torch.equal(pred, logits[-1].argmax(-1))


def test_the_loss_budget_decides_how_many_answers_may_change():
    """Hard inputs stopped early give the wrong class: allowed only within max_loss * safety."""
    logits = _synthetic(80, 20)
    labels = logits[-1].argmax(-1)
    strict = calibrate(logits, max_loss=0.1, labels=labels)  # budget 5 %: none of the 20
    assert strict.mean_steps == pytest.approx(2.4) and strict.accuracy == 1.0
    loose = calibrate(logits, max_loss=0.45, labels=labels)  # budget 22.5 %: all 20 stop
    assert loose.mean_steps == 1.0 and loose.disagreement == pytest.approx(0.2)
    assert loose.accuracy == pytest.approx(0.8) and loose.full_accuracy == 1.0


def test_nothing_to_save_means_never():
    logits = torch.zeros(4, 10, 3, dtype=torch.float64)
    logits[:, :, 0] = torch.linspace(0, 1, 4)[:, None]  # confidence grows, answer fixed
    logits[-1, :, 1] = 5.0  # ... and changes at the last step for every input
    cal = calibrate(logits, max_loss=0.0)
    assert cal.threshold == NEVER and cal.mean_steps == 4


def test_bad_calibration_inputs_are_refused():
    with pytest.raises(InvalidInput, match="per-step logits"):
        calibrate(torch.zeros(4, 10), 0.01)
    with pytest.raises(InvalidInput, match="labels"):
        calibrate(torch.zeros(4, 10, 3), 0.01, labels=torch.zeros(9))
    with pytest.raises(InvalidInput, match="max_loss"):
        calibrate(torch.zeros(4, 10, 3), 1.5)


def test_on_real_held_out_data_the_exit_saves_steps_out_of_sample(mlp, mlp_net):
    """digits-mlp, 8 steps: calibrated on one half of the held-out set, scored on the other.

    Stated tolerances: at least 30 % fewer steps, at most 1.5 points further loss (the
    bench's targets, 40 % and 0.5 point, are measured with 5-fold cross-fitting)."""
    x, y = mlp.heldout.inputs[0], mlp.heldout.labels
    run = simulate(mlp_net, x, 8)
    fit, score = torch.arange(0, len(y), 2), torch.arange(1, len(y), 2)
    cal = calibrate(run.logits[:, fit], 0.005)
    pred, steps = exit_predictions(run.logits[:, score], cal.threshold)
    full = float((run.final[score].argmax(-1) == y[score]).double().mean())
    early = float((pred == y[score]).double().mean())
    assert float(steps.double().mean()) <= 0.7 * 8
    assert early >= full - 0.015


def test_a_confidently_wrong_first_step_is_skipped_not_waited_out():
    """One step decodes every rate as 0 or 1: its softmax may be sure and wrong."""
    logits = _synthetic(80, 20)
    logits[0, 80:, 0] = 12.0  # the hard inputs claim class 0 at p > 0.9999 after step 1
    cal = calibrate(logits, max_loss=0.02)
    assert cal.min_steps == 2 and cal.disagreement == 0.0
    assert cal.mean_steps == pytest.approx((80 * 2 + 20 * 8) / 100)
    pred, steps = exit_predictions(logits, cal.threshold, cal.min_steps)
    assert steps.tolist() == [2] * 80 + [8] * 20
    assert torch.equal(pred, logits[-1].argmax(-1))
    # with exits from step 1 only a threshold above the wrong answers' would do: none stop
    assert exit_steps(confidence(logits), cal.threshold).tolist()[80:] == [1] * 20
