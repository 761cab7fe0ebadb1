"""Dynamic confidence: stop each input once its output is confident enough.

After every timestep the output layer's accumulated current, divided by the steps so
far, estimates the ANN's logits; its softmax's largest probability is the confidence.
An input stops at the first step whose confidence reaches the threshold (or at the last
step). Easy inputs stop early, hard ones run on (Li, Jones and Furber, "Unleashing the
Potential of Spiking Neural Networks with Dynamic Confidence", ICCV 2023).

The threshold is calibrated on held-out inputs for a chosen accuracy loss: the lowest
threshold (so the fewest mean steps) at which the share of inputs whose early answer
differs from their answer after all steps stays within ``max_loss * safety``. An input
can only lose accuracy by changing its answer, so the disagreement bounds the loss on the
calibration data; ``safety`` (0.5) pays for the optimism of picking the lowest passing
threshold on one sample: cross-fitted on the zoo's held-out sets, the whole 0.5-point
budget lost up to 0.67 points out of sample, half of it at most 0.40. Labels are not
needed; given, they are scored.

The first outputs can be confidently wrong: after one step every neuron has fired once
or not at all, so the decoded rates are 0 or 1 and the softmax of such logits saturates
(scene-cnn fine-tuned for 16 steps: 33 of 1,000 inputs at confidence above 0.999 after
step 1 whose final answer differs, none above 0.99 from step 2 on). Calibration
therefore also picks ``min_steps``, the earliest step an input may stop at: each is tried
with its own lowest threshold, and the pair with the fewest mean steps wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeswarm.placement.errors import InvalidInput

#: Candidate thresholds tried by :func:`calibrate` (quantiles of the observed confidences).
CANDIDATES = 512
#: Share of the accuracy-loss budget that calibration may spend on its own inputs.
SAFETY = 0.5
#: A threshold above every softmax probability: never stop early.
NEVER = 2.0


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """The largest softmax probability over the last dimension."""
    return torch.softmax(logits.to(torch.float64), dim=-1).amax(dim=-1)


def exit_steps(conf: torch.Tensor, threshold: float, min_steps: int = 1) -> torch.Tensor:
    """For confidences ``(T, B)``: the 1-based step each input stops at (``T`` if never),
    the first at or after ``min_steps`` whose confidence reaches ``threshold``."""
    reached = conf >= threshold
    if min_steps > 1:
        reached[:min_steps - 1] = False
    first = reached.to(torch.int64).argmax(dim=0) + 1
    return torch.where(reached.any(dim=0), first, torch.full_like(first, conf.shape[0]))


def exit_predictions(logits: torch.Tensor, threshold: float,
                     min_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, steps taken) per input, for per-step logits ``(T, B, classes)``."""
    steps = exit_steps(confidence(logits), threshold, min_steps)
    return logits[steps - 1, torch.arange(logits.shape[1])].argmax(-1), steps


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and what it did on the calibration inputs."""

    threshold: float  # NEVER: no threshold kept the answers
    max_loss: float
    disagreement: float  # share of inputs whose early answer differs from the full run's
    mean_steps: float
    steps: int  # the most steps an input runs
    samples: int
    full_accuracy: float | None = None  # with labels: every input for all steps
    accuracy: float | None = None  # with labels: with early exit
    min_steps: int = 1  # no input stops before this step


def calibrate(logits: torch.Tensor, max_loss: float, labels: torch.Tensor | None = None,
              safety: float = SAFETY) -> Calibration:
    """The threshold and earliest exit step with the fewest mean steps whose answers stay
    within the budget.

    ``logits``: the outputs after each step, ``(T, B, classes)``, of a run without early
    exit on held-out inputs. ``max_loss``: the accuracy the early exit may cost, as a
    fraction (0.005 is half a point). Every earliest step (``min_steps``) is tried, each
    with its lowest threshold within the budget; ties go to the earlier step.
    """
    if logits.ndim != 3 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise InvalidInput(f"calibrate needs per-step logits (T, B, classes), got "
                           f"{tuple(logits.shape)}")
    if labels is not None and labels.shape != logits.shape[1:2]:
        raise InvalidInput(f"labels must have shape ({logits.shape[1]},), got "
                           f"{tuple(labels.shape)}")
    if not 0 <= max_loss < 1 or not 0 < safety <= 1:
        raise InvalidInput(f"max_loss must be in [0, 1) and safety in (0, 1], got {max_loss} "
                           f"and {safety}")
    answers = logits.argmax(-1)  # (T, B): the answer after each step
    full = answers[-1]
    rows = torch.arange(logits.shape[1])
    conf = confidence(logits)
    levels = np.unique(np.quantile(conf.reshape(-1).numpy(), np.linspace(0, 1, CANDIDATES)))
    budget = max_loss * safety + 1e-12
    chosen, earliest = NEVER, 1
    pred, steps = full, torch.full_like(full, logits.shape[0])
    for first in range(1, logits.shape[0]):
        # mean steps only grow with the threshold, so the lowest one within budget wins
        for level in levels.tolist():
            s = exit_steps(conf, level, first)
            p = answers[s - 1, rows]
            if float((p != full).double().mean()) <= budget:
                if float(s.double().mean()) < float(steps.double().mean()):
                    chosen, earliest, pred, steps = level, first, p, s
                break
    scored: dict[str, float] = {}
    if labels is not None:
        scored = {"full_accuracy": float((full == labels).double().mean()),
                  "accuracy": float((pred == labels).double().mean())}
    return Calibration(chosen, max_loss, float((pred != full).double().mean()),
                       float(steps.double().mean()), int(logits.shape[0]),
                       int(logits.shape[1]), min_steps=earliest, **scored)
