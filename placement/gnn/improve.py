"""Improving a plan move by move with the scoring network, within a simulator budget.

Start: ``opts.start`` (else HEFT's plan; one simulator call), that plan with the
cheapest codec on every cut edge (one call), and (from HEFT) the other start plans of
:func:`~edgeswarm.placement.gnn.start.scratch_starts`: list schedules like HEFT's, whose
timelines come with them and cost no call. The best of these is the current plan.
Every simulated plan counts against the budget, so the result is never worse than the
start.

Then, repeatedly: one forward pass of the network scores every candidate move of the
current plan, and the candidates are simulated in order of score (greedily at
inference; sampled without replacement, by Gumbel keys, when training) until one
shortens the makespan; it is accepted and the network runs again. If ``patience``
candidates in a row fail, the plan is at a local optimum for the moves the network
likes: the least bad of them is taken anyway and its task stays put for ``tenure``
passes (a short tabu). The best plan seen is returned. Infeasible moves (memory,
allowed devices, group size) are masked out and never simulated, nor is a plan
simulated before (a walk out of a local optimum tends to come back to it).

With codecs enabled, a relocation or regrouping also re-picks the cheapest codec of
every edge of the moved task (a codec only changes when data arrives, so the cheapest
is almost always right); switching a single edge's codec remains a move of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from edgeswarm.placement.codecs import CodecSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.gnn.features import GROW, RELOCATE, SHRINK, Observation, observe
from edgeswarm.placement.gnn.network import GiphNet, GraphTensors
from edgeswarm.placement.gnn.start import scratch_starts
from edgeswarm.placement.gnn.tables import Tables
from edgeswarm.placement.heft import heft_groups
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.problem import Group, Problem
from edgeswarm.placement.simulator import Timeline, evaluate, evaluate_from, violation

Codecs = dict[tuple[int, int], str]
log = logging.getLogger("edgeswarm.placement.gnn")


@dataclass
class Trial:
    """One simulated candidate: which forward pass chose it, from which still-open
    candidates, and the reduction of the best makespan seen it brought (the reward,
    relative to the best start plan's makespan)."""

    forward: int
    cand: int
    avail: np.ndarray
    reward: float
    call: int


@dataclass
class Episode:
    solution: Solution
    start_makespan: float
    best_makespan: float
    calls: int
    forwards: int
    logits: list[Tensor] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)


class _Graph:
    """The static tensors of one problem the network needs on every forward pass."""

    def __init__(self, tb: Tables) -> None:
        self.tb = tb
        self.tensors = GraphTensors.of(tb)
        self.adjacent = np.eye(tb.n, dtype=bool)
        self.adjacent[tb.es, tb.ev] = True
        self.adjacent[tb.ev, tb.es] = True
        self.incident: list[list[tuple[int, int]]] = [[] for _ in range(tb.n)]
        for s, v in zip(tb.es.tolist(), tb.ev.tolist(), strict=True):
            self.incident[s].append((s, v))
            self.incident[v].append((s, v))


def start_of(p: Problem, opts: Options) -> tuple[list[Group], Codecs, list[int]]:
    """The plan to improve: ``opts.start`` when it is feasible, else HEFT's."""
    if opts.start is not None:
        st = opts.start
        if len(st.groups) != p.n:
            raise InvalidInput(f"start plan places {len(st.groups)} tasks; the graph has {p.n}")
        reason = violation(p, st.groups)
        if not reason:
            order = list(st.order) if st.order is not None else list(p.default_order)
            return list(st.groups), dict(st.codecs), order
        log.debug("start plan is infeasible (%s); starting from HEFT's plan", reason)
    return heft_groups(p), {}, list(p.default_order)


@dataclass(frozen=True)
class SearchConfig:
    #: improving moves taken from one ranking before the network runs again (moves near
    #: an already moved task are skipped in between)
    accepts_per_forward: int = 1
    #: candidates tried from one ranking without improvement before taking the least bad
    patience: int = 16
    #: forward passes a task moved by such a step stays put
    tenure: int = 3

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def improve(p: Problem, opts: Options, net: GiphNet, cfg: SearchConfig = SearchConfig(), *,
            rng: np.random.Generator | None = None, collect: bool = False,
            watch: Callable[[Observation], None] | None = None) -> Episode:
    """Run the search. ``rng`` None: greedy (deterministic); else sample moves.
    ``collect``: keep the logits (with gradients) and trials for training; ``watch`` sees
    every observation (to fit the feature normalisation)."""
    budget = opts.budget_for(p)
    calls0 = p.calls
    groups, codecs, order = start_of(p, opts)
    if budget < 2:  # nothing to compare a move against
        return Episode(Solution(groups, _clean(groups, codecs), order), np.nan, np.nan, 0, 0)
    g = _Graph(Tables.of(p))

    def run(gr: Sequence[Group], cd: Codecs, od: Sequence[int]) -> Timeline:
        return evaluate(p, gr, _specs(p, cd), od)

    seen = {_key(groups, codecs)}  # plans simulated: trying one again is skipped, free
    tl = run(groups, codecs, order)
    ep = Episode(Solution(groups, codecs, order), tl.makespan, tl.makespan, 0, 0)
    for cand_groups, cand_codecs, cand_order, known in _more_starts(g, opts, groups, codecs,
                                                                     order):
        if known is None and p.calls - calls0 >= budget:
            continue
        new = known if known is not None else run(cand_groups, cand_codecs, cand_order)
        seen.add(_key(cand_groups, cand_codecs))
        if new.makespan < tl.makespan * (1 - 1e-12):
            groups, codecs, order, tl = cand_groups, cand_codecs, cand_order, new
    order_pos = np.empty(p.n, dtype=np.int64)
    order_pos[order] = np.arange(p.n)
    scale = tl.makespan
    best = (groups, codecs, tl)
    tabu = np.full(p.n, -1)   # a kicked task stays put until this forward pass
    grad = torch.enable_grad() if collect else torch.inference_mode()
    while p.calls - calls0 < budget:
        obs = observe(g.tb, groups, codecs, tl, scale, order_pos, tp=opts.tp,
                      use_codecs=opts.codecs)
        if watch is not None:
            watch(obs)
        with grad:
            logits = net(obs, g.tensors)
        if collect:
            ep.logits.append(logits)
        keys = logits.detach().numpy().astype(np.float64)
        if rng is not None:
            keys = keys + rng.gumbel(size=len(keys))  # sampling without replacement
        ranked = np.argsort(-keys, kind="stable")
        task = _task_of(g, obs)
        avail = obs.feasible & (tabu[task] < ep.forwards)
        touched = _touching(g, obs) if cfg.accepts_per_forward > 1 else None
        accepted = tries = 0
        least: tuple[float, int, list[Group], Codecs, Timeline] | None = None
        for i in ranked.tolist():
            if p.calls - calls0 >= budget or not np.isfinite(keys[i]):
                break  # masked candidates sort last (-inf)
            if not avail[i]:
                continue
            before = avail.copy() if collect else avail
            avail[i] = False
            new_groups, new_codecs = _apply(g, obs, i, groups, codecs, opts.codecs)
            if (accepted or not obs.exact[i]) and violation(p, new_groups):
                continue
            key = _key(new_groups, new_codecs)
            if key in seen:
                continue
            seen.add(key)
            new = evaluate_from(p, new_groups, _specs(p, new_codecs), order, tl,
                                int(order_pos[task[i]]))
            tries += 1
            reward = max(0.0, best[2].makespan - new.makespan) / scale
            if reward > 0:
                best = (new_groups, new_codecs, new)
            if collect:
                ep.trials.append(Trial(ep.forwards, i, before, reward, p.calls - calls0 - 1))
            if new.makespan < tl.makespan * (1 - 1e-12):
                groups, codecs, tl = new_groups, new_codecs, new
                accepted += 1
                if touched is None or accepted >= cfg.accepts_per_forward:
                    break
                avail &= ~touched[task[i]]
                continue
            if least is None or new.makespan < least[0]:
                least = (new.makespan, i, new_groups, new_codecs, new)
            if not accepted and tries >= cfg.patience:
                break
        ep.forwards += 1
        if not accepted:
            if least is None:
                break  # every feasible move of this plan was tried
            _, i, groups, codecs, tl = least  # a local optimum: take the least bad move
            tabu[task[i]] = ep.forwards + cfg.tenure
    groups, codecs, tl = best
    ep.solution = Solution(groups, _clean(groups, codecs), order)
    ep.best_makespan = tl.makespan
    ep.calls = p.calls - calls0
    return ep


def _more_starts(g: _Graph, opts: Options, groups: list[Group], codecs: Codecs,
                 order: list[int]
                 ) -> Iterator[tuple[list[Group], Codecs, list[int], Timeline | None]]:
    """Other start plans, with their timelines where known: the start with the cheapest
    codec on every cut edge (one simulator call); and, when starting from HEFT, the
    other start plans of a plan from scratch
    (:func:`~edgeswarm.placement.gnn.start.scratch_starts`), list schedules whose
    timelines come with them, as HEFT's does."""
    if opts.codecs:
        swept = dict(codecs)
        for t in range(g.tb.n):
            _recodec(g, groups, swept, t)
        if swept != codecs:
            yield groups, swept, order, None
    if opts.start is not None:
        return
    yield from scratch_starts(g.tb, order, opts)


def _specs(p: Problem, codecs: Codecs) -> dict[tuple[int, int], CodecSpec]:
    return {k: p.codec_table[v] for k, v in codecs.items() if v != "none"}


def _key(groups: Sequence[Group], codecs: Codecs) -> tuple[tuple[Group, ...],
                                                         tuple[tuple[tuple[int, int], str], ...]]:
    return tuple(groups), tuple(sorted((k, v) for k, v in codecs.items() if v != "none"))


def _task_of(g: _Graph, obs: Observation) -> np.ndarray:
    """The task each candidate moves (a codec switch: the edge's destination)."""
    out: np.ndarray = np.concatenate([g.tb.opt_t[obs.cand_opt], g.tb.ev[obs.codec_edge]])
    return out


def _touching(g: _Graph, obs: Observation) -> np.ndarray:
    """``n × candidates`` bool: the candidate moves task t or an edge of t, or moves a
    neighbour of t (whose features depended on where t was)."""
    tb = g.tb
    task = np.concatenate([tb.opt_t[obs.cand_opt], tb.es[obs.codec_edge]])
    other = np.concatenate([tb.opt_t[obs.cand_opt], tb.ev[obs.codec_edge]])
    near = g.adjacent
    out: np.ndarray = near[:, task] | near[:, other]
    return out


def _apply(g: _Graph, obs: Observation, i: int, groups: list[Group], codecs: Codecs,
           use_codecs: bool) -> tuple[list[Group], Codecs]:
    tb = g.tb
    out_groups = list(groups)
    out_codecs = dict(codecs)
    n_opt = len(obs.cand_kind)
    if i >= n_opt:
        j = i - n_opt
        e = int(obs.codec_edge[j])
        key = (int(tb.es[e]), int(tb.ev[e]))
        name = tb.codec_names[int(obs.codec_idx[j])]
        if name == "none":
            out_codecs.pop(key, None)
        else:
            out_codecs[key] = name
        return out_groups, out_codecs
    opt = int(obs.cand_opt[i])
    t, d = int(tb.opt_t[opt]), int(tb.opt_d[opt])
    kind = int(obs.cand_kind[i])
    if kind == RELOCATE:
        out_groups[t] = (d,)
    elif kind == GROW:
        out_groups[t] = (*groups[t], d)
    elif kind == SHRINK:
        out_groups[t] = tuple(x for x in groups[t] if x != d)
    if use_codecs:
        _recodec(g, out_groups, out_codecs, t)
    return out_groups, out_codecs


def _recodec(g: _Graph, groups: Sequence[Group], codecs: Codecs, t: int) -> None:
    """Give every edge of task ``t`` its cheapest codec under ``groups`` (in place)."""
    for key in g.incident[t]:
        best = g.tb.best_codec(key[0], key[1], groups)
        if best == "none":
            codecs.pop(key, None)
        else:
            codecs[key] = best


def _clean(groups: Sequence[Group], codecs: Codecs) -> Codecs:
    """Codecs only on edges that cross devices."""
    return {k: v for k, v in codecs.items()
            if v != "none" and not set(groups[k[1]]) <= set(groups[k[0]])}

