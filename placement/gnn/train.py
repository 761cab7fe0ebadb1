"""Training the scoring network with policy gradients on generated instances.

Each episode draws a training instance (:func:`suites.sample_training`, seeds disjoint
from every evaluation suite) and whether codecs and tensor parallelism are allowed,
runs the search with moves *sampled* from the network's scores (sampling without
replacement, by Gumbel keys), and scores each simulated move by how much it shortened
the best makespan seen so far, relative to the best start plan.
REINFORCE: the log-probability of each choice is pushed by its return (the reduction
still to come from that simulator call on) minus a baseline (a running mean of the
return at the same point of the budget), plus an entropy bonus. Updates average a few
episodes. Every ``eval_every`` episodes the greedy policy is evaluated on a fixed
validation set of generated instances (half planned without codecs, half with); the
weights with the best validation score are the ones saved.

Deterministic for a seed (instances, sampling, initialisation and update order); the
time limit decides only how far along that fixed sequence the run gets.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeswarm.placement import suites
from edgeswarm.placement.generators import Instance
from edgeswarm.placement.gnn import checkpoint, curve
from edgeswarm.placement.gnn.features import Observation
from edgeswarm.placement.gnn.improve import Episode, SearchConfig, improve
from edgeswarm.placement.gnn.network import GROUPS, GiphNet, NetConfig
from edgeswarm.placement.policies import Options
from edgeswarm.placement.problem import Problem

#: training draws use even offsets from the seed's base, validation draws odd ones
SEED_STRIDE = 10_000_000
BASELINE_BINS = 10


@dataclass(frozen=True)
class TrainConfig:
    minutes: float = 25.0
    seed: int = 0
    lr: float = 1e-3
    #: episodes per update
    batch: int = 4
    entropy: float = 0.003
    #: validation instances and how often (episodes) the greedy policy is scored on them
    val_size: int = 24
    eval_every: int = 200
    #: stop after this many episodes even if time is left (None: only the clock)
    episodes: int | None = None
    #: instances whose observations fit the feature normalisation
    norm_instances: int = 16
    #: share of training episodes that may use codecs / tensor parallelism
    codecs_share: float = 0.4
    tp_share: float = 0.7


@dataclass
class TrainResult:
    out_dir: Path
    weights: Path
    config: Path
    curve: Path
    episodes: int
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def train(out_dir: Path, *, minutes: float = 25.0, seed: int = 0,
          progress: Callable[[dict[str, Any]], None] | None = None,
          episodes: int | None = None, val_size: int = 24, eval_every: int = 200,
          norm_instances: int = 16,
          clock: Callable[[], float] = time.monotonic) -> TrainResult:
    """Train for at most ``minutes`` (and ``episodes``) and write ``giph.safetensors``,
    ``giph.json`` and ``training_curve.png`` into ``out_dir``. ``val_size``,
    ``eval_every`` and ``norm_instances``: see :class:`TrainConfig`."""
    cfg = TrainConfig(minutes=minutes, seed=seed, episodes=episodes, val_size=val_size,
                      eval_every=eval_every, norm_instances=norm_instances)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster, and reproducible
    try:
        return _train(out_dir, cfg, progress, clock)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir: Path, cfg: TrainConfig,
           progress: Callable[[dict[str, Any]], None] | None,
           clock: Callable[[], float]) -> TrainResult:
    t0 = clock()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net, search = GiphNet(NetConfig()), SearchConfig()
    fit_normalisation(net, search, cfg)
    validation = [_problem(_draw(cfg.seed, k, held_out=True))
                  for k in range(cfg.val_size)]
    untrained = _evaluate(net, search, validation)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    baseline = np.zeros(BASELINE_BINS)
    spread = 0.01  # running RMS of advantages, to scale them
    ep_ratio: list[float] = []
    ep_reward: list[float] = []
    evals = [(0, float(np.mean(untrained)), 1.0)]
    best_score, best_state = evals[0][1], copy.deepcopy(net.state_dict())
    k = 0
    losses: list[torch.Tensor] = []
    while (cfg.episodes is None or k < cfg.episodes) and clock() - t0 < 60.0 * cfg.minutes:
        p = _problem(_draw(cfg.seed, k, held_out=False))
        opts = Options(tp=bool(rng.uniform() < cfg.tp_share),
                       codecs=bool(rng.uniform() < cfg.codecs_share))
        net.train()
        ep = improve(p, opts, net, search, rng=rng, collect=True)
        k += 1
        ep_ratio.append(ep.best_makespan / ep.start_makespan if ep.start_makespan else 1.0)
        ep_reward.append(sum(t.reward for t in ep.trials))
        loss, spread = _reinforce(ep, opts.budget_for(p), baseline, spread, cfg)
        if loss is not None:
            losses.append(loss)
        if len(losses) >= cfg.batch:
            opt.zero_grad()
            torch.stack(losses).mean().backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses = []
        if k % cfg.eval_every == 0:
            scores = _evaluate(net, search, validation)
            score = float(np.mean(scores))
            evals.append((k, score, float(np.mean(np.array(scores) / np.array(untrained)))))
            if score < best_score:
                best_score, best_state = score, copy.deepcopy(net.state_dict())
        if progress is not None:
            progress({"episode": k, "elapsed_s": clock() - t0, "minutes": cfg.minutes,
                      "ratio_heft": ep_ratio[-1], "val_ratio_heft": evals[-1][1],
                      "best_val_ratio_heft": best_score})
    net.load_state_dict(best_state)
    net.eval()
    final = _evaluate(net, search, validation)
    metrics = {
        "episodes": k,
        "train_minutes": round((clock() - t0) / 60.0, 2),
        "val_instances": len(validation),
        "val_mean_ratio_heft_untrained": round(float(np.mean(untrained)), 4),
        "val_mean_ratio_heft": round(float(np.mean(final)), 4),
        "val_mean_ratio_untrained": round(float(np.mean(np.array(final) / untrained)), 4),
        "val_worse_than_untrained_frac": round(
            float(np.mean(np.array(final) > np.array(untrained) * 1.01)), 4),
    }
    if progress is not None:
        progress({"episode": k, "elapsed_s": clock() - t0, "minutes": cfg.minutes,
                  "done": True, **metrics})
    meta = {"training": {**asdict(cfg), "algorithm": "REINFORCE: per-call return, budget-position "
                         "baseline, entropy bonus",
                         "instances": "suites.sample_training",
                         "train_seeds": f"TRAIN_SEED_BASE + {SEED_STRIDE}*seed + 2k",
                         "validation_seeds": f"TRAIN_SEED_BASE + {SEED_STRIDE}*seed + 2k+1"},
            "metrics": metrics,
            "curve": {"episode_ratio_heft": [round(x, 4) for x in ep_ratio[-2000:]],
                      "eval": evals}}
    weights, config = checkpoint.save(out_dir, net, search, meta)
    png = curve.plot(out_dir / "training_curve.png", ep_ratio, ep_reward, evals)
    return TrainResult(out_dir, weights, config, png, k, clock() - t0, metrics)


def fit_normalisation(net: GiphNet, search: SearchConfig, cfg: TrainConfig) -> None:
    """Mean and standard deviation of every feature over the observations of a greedy
    search on the first few training instances (with the untrained network: its prior)."""
    rows: dict[str, list[np.ndarray]] = {name: [] for name in GROUPS}

    def watch(obs: Observation) -> None:
        for name, x in (("task", obs.x_task), ("device", obs.x_dev), ("option", obs.x_opt),
                        ("edge", obs.msg_attr), ("codec", obs.x_codec)):
            if len(x):
                rows[name].append(np.asarray(x, dtype=np.float64))

    net.eval()
    for k in range(cfg.norm_instances):
        p = _problem(_draw(cfg.seed, k, held_out=False))
        improve(p, _val_options(k), net, search, watch=watch)
    stats = {}
    for name, width in GROUPS.items():
        x = np.concatenate(rows[name]) if rows[name] else np.zeros((1, width))
        std = x.std(axis=0)
        stats[name] = (x.mean(axis=0).tolist(), np.where(std < 1e-3, 1.0, std).tolist())
    net.set_normalisation(stats)


def _reinforce(ep: Episode, budget: int, baseline: np.ndarray, spread: float,
               cfg: TrainConfig) -> tuple[torch.Tensor | None, float]:
    """The episode's loss: REINFORCE on every simulated choice and an entropy bonus per
    ranking; returns it and the updated advantage scale."""
    if not ep.trials:
        return None, spread
    rewards = np.array([t.reward for t in ep.trials])
    returns = np.cumsum(rewards[::-1])[::-1]
    bins = np.minimum(np.array([t.call for t in ep.trials]) * BASELINE_BINS // max(budget, 1),
                      BASELINE_BINS - 1)
    adv = returns - baseline[bins]
    for b, g in zip(bins.tolist(), returns.tolist(), strict=True):
        baseline[b] += 0.02 * (g - baseline[b])
    spread = float(np.sqrt(0.98 * spread ** 2 + 0.02 * float(np.mean(adv ** 2))))
    terms = []
    for t, a in zip(ep.trials, adv.tolist(), strict=True):
        logits = ep.logits[t.forward]
        mask = torch.from_numpy(t.avail)
        logp = logits[t.cand] - torch.logsumexp(logits[mask], dim=0)
        terms.append(-(a / max(spread, 1e-6)) * logp)
    ent = []
    for logits in ep.logits:
        finite = logits[torch.isfinite(logits)]
        if len(finite) > 1:
            logp = torch.log_softmax(finite, dim=0)
            ent.append(-(logp.exp() * logp).sum())
    loss = torch.stack(terms).sum() / max(len(ep.logits), 1)
    if ent:
        loss = loss - cfg.entropy * torch.stack(ent).mean()
    return loss, spread


def _evaluate(net: GiphNet, search: SearchConfig, problems: list[Problem]) -> list[float]:
    """Greedy search on each problem (see :func:`_val_options`): best makespan ÷ HEFT's."""
    net.eval()
    out = []
    for k, p in enumerate(problems):
        ep = improve(p, _val_options(k), net, search)
        out.append(ep.best_makespan / ep.start_makespan if ep.start_makespan else 1.0)
    return out


def _val_options(k: int) -> Options:
    """Validation alternates plans without codecs (as the benchmark plans) and with."""
    return Options(codecs=k % 2 == 1)


def _draw(seed: int, k: int, *, held_out: bool) -> Instance:
    return suites.sample_training(
        suites.training_rng(SEED_STRIDE * seed + 2 * k + (1 if held_out else 0)))


def _problem(inst: Instance) -> Problem:
    return Problem(inst.graph, inst.cluster)
