"""What the network sees: the current plan as a graph over (task, device) options.

One :func:`observe` call turns the current placement and its simulated timeline into
numpy arrays, vectorised over options (no Python loop over options):

- task features: current start, end, slack, how long it waited for its device, upward
  rank, degree, whether it may be split, its compute time relative to its mean;
- device features: relative speed, load, memory in use, critical work on it;
- option features for "task t on device d": compute time relative to the task's mean,
  whether it is the current placement, when t's inputs would arrive on d, how long d is
  busy in that window, the estimated end of t on d and of the longest path through t
  (its successors' arrival plus their tails), transfer seconds in and out, data
  locality, memory headroom, and for splittable tasks the estimated end after adding d
  to (or removing d from) its tensor-parallel group;
- messages from the current placement of each neighbouring task, with the transfer
  time and arrival slack of the edge as features (GiPH's gpNet edges, whose messages do
  not depend on the receiving option's device, so they are computed once per task);
- the candidate moves, each with a feasibility mask (memory, allowed devices) and a
  heuristic prior (estimated seconds saved on the longest path through the task).

Times are divided by the start plan's makespan so instances of any scale look alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeswarm.placement.gnn.tables import Tables, member_matrix, reps
from edgeswarm.placement.moves import MAX_GROUP
from edgeswarm.placement.problem import Group
from edgeswarm.placement.simulator import Timeline

TASK_FEATURES = 12
DEVICE_FEATURES = 6
OPTION_FEATURES = 18
EDGE_FEATURES = 4
CODEC_FEATURES = 6

RELOCATE, GROW, SHRINK, CODEC = 0, 1, 2, 3
KINDS = ("relocate", "grow", "shrink", "codec")


@dataclass
class Observation:
    x_task: np.ndarray        # n × TASK_FEATURES
    x_dev: np.ndarray         # m × DEVICE_FEATURES
    x_opt: np.ndarray         # O × OPTION_FEATURES
    cur_opt: np.ndarray       # n: the option each task is placed on now (first member)
    msg_attr: np.ndarray      # 2E × EDGE_FEATURES: each task edge forward, then backward
    cand_opt: np.ndarray      # option of each relocate/grow/shrink candidate
    cand_kind: np.ndarray     # RELOCATE | GROW | SHRINK
    codec_edge: np.ndarray    # task edge of each codec candidate
    codec_idx: np.ndarray     # codec (index into Tables.codec_names)
    codec_src_opt: np.ndarray  # current option of the edge's source / destination task
    codec_dst_opt: np.ndarray
    x_codec: np.ndarray       # codec candidates × CODEC_FEATURES
    prior: np.ndarray         # every candidate (option ones first, then codec ones)
    feasible: np.ndarray      # every candidate
    #: feasible is exact (else the simulator's violation() must confirm it)
    exact: np.ndarray

    @property
    def n_candidates(self) -> int:
        return len(self.prior)


def observe(tb: Tables, groups: Sequence[Group],
            codecs: Mapping[tuple[int, int], str], tl: Timeline, scale: float,
            order_pos: np.ndarray, *, tp: bool, use_codecs: bool) -> Observation:
    """The features and candidate moves of the plan ``groups``/``codecs`` whose simulated
    timeline is ``tl``. ``scale``: the seconds every time is divided by; ``order_pos``:
    each task's position in the priority order (to break ties between equal times);
    ``tp``/``use_codecs``: whether tensor-parallel and codec moves are allowed."""
    n, m = tb.n, tb.m
    T = scale if scale > 0 else 1.0
    S, F = np.array(tl.start), np.array(tl.end)
    now = tl.makespan
    R = reps(groups)
    P = member_matrix(m, R)
    size = P.sum(axis=1)
    es, ev, eb = tb.es, tb.ev, tb.eb
    comp0 = np.where(tb.allowed, tb.comp, 0.0)

    # transfer seconds of every edge from its source's group to each device, and from
    # each device to its destination's group
    cost_out = tb.link_cost(R[es, 0], use_codecs)
    cost_in = tb.link_cost_to(R[ev, 0], use_codecs)
    for k in range(1, R.shape[1]):
        np.minimum(cost_out, tb.link_cost(R[es, k], use_codecs), out=cost_out)
        np.maximum(cost_in, tb.link_cost_to(R[ev, k], use_codecs), out=cost_in)
    E = len(es)
    trans_cur = cost_in[np.arange(E)[:, None], R[es]].min(axis=1) if E else np.zeros(0)

    # when t's inputs would arrive on d, how busy d is then, when t would end there
    ready = tb.into.max(F[es][:, None] + cost_out, np.zeros((n, m)))
    ready_cur = tb.into.max(F[es] + trans_cur, np.zeros(n))
    overlap = _busy_between(P, S, F, ready, ready + comp0)
    est_end = ready + overlap + comp0

    # the longest path through t: its end, then each successor's arrival and tail
    tail = now - S
    crit = tb.out_of.max(est_end[es] + cost_in + tail[ev][:, None], est_end)
    crit_cur = tb.out_of.max(F[es] + trans_cur + tail[ev], F)
    slack = _slack(tb, groups, S, F, now, trans_cur, order_pos)

    # memory: parameters (tensor-parallel members hold shares) and peak activation
    speed = np.where(P & tb.allowed, 1.0 / np.maximum(np.where(tb.allowed, tb.comp, 1.0),
                                                        1e-300), 0.0)
    share = tb.param[:, None] * speed / np.maximum(speed.sum(axis=1, keepdims=True), 1e-300)
    used = share.sum(axis=0)
    peak = (P * tb.act[:, None]).max(axis=0)
    need = used[None, :] - share + tb.param[:, None] + np.maximum(peak[None, :],
                                                                  tb.act[:, None])
    fits = need <= tb.mem[None, :]
    sure = np.abs(need - tb.mem[None, :]) > 1e-9 * tb.mem[None, :] + 1.0
    headroom = np.clip((tb.mem[None, :] - need) / np.maximum(tb.mem[None, :], 1.0), -1, 1)

    # tensor parallelism: estimated end after growing / shrinking the group
    grow_end, shrink_end, grow_fits = _tensor_parallel(tb, groups, ready, used, peak, tp)

    # data locality
    in_local = tb.into.sum(P[es] * eb[:, None])
    out_local = tb.out_of.sum(P[ev] * eb[:, None])
    in_bytes = np.maximum(tb.into.sum(eb), 1.0)
    out_bytes = np.maximum(tb.out_of.sum(eb), 1.0)
    t_in = tb.into.sum(cost_out)
    t_out = tb.out_of.sum(cost_in)

    load = (P * (F - S)[:, None]).sum(axis=0)
    ot, od = tb.opt_t, tb.opt_d

    def at(x: np.ndarray) -> np.ndarray:  # an n × m array at every option
        out: np.ndarray = x.reshape(-1)[tb.opt_flat]
        return out

    x_opt = np.stack([
        tb.log_rel,
        at(tb.comp) / T,
        at(P).astype(float),
        (at(ready) - S[ot]) / T,
        (at(est_end) - F[ot]) / T,
        at(overlap) / T,
        (crit_cur[ot] - at(crit)) / T,
        (at(crit) - now) / T,
        at(t_in) / T,
        at(t_out) / T,
        at(in_local) / in_bytes[ot],
        at(out_local) / out_bytes[ot],
        at(headroom),
        load[od] / T,
        tb.log_speed[od],
        (at(grow_end) - F[ot]) / T,
        (at(shrink_end) - F[ot]) / T,
        slack[ot] / T,
    ], axis=1)

    crit_task = slack <= 1e-9 * max(now, 1e-300)
    x_task = np.stack([
        S / T, F / T, slack / T, crit_task.astype(float), (S - ready_cur) / T,
        tb.rank / max(float(tb.rank.max()), 1e-300),
        np.log1p(np.bincount(ev, minlength=n)), np.log1p(np.bincount(es, minlength=n)),
        (tb.splittable & tp).astype(float), size / MAX_GROUP,
        np.clip(np.log(np.maximum(F - S, 1e-12) / np.maximum(tb.mean_comp, 1e-12)), -5, 5),
        tb.allowed.sum(axis=1) / m,
    ], axis=1)
    x_dev = np.stack([
        tb.log_speed, load / T, P.sum(axis=0) / n,
        (used + peak) / np.maximum(tb.mem, 1.0),
        (P * ((F - S) * crit_task)[:, None]).sum(axis=0) / T,
        (P * F[:, None]).max(axis=0) / T,
    ], axis=1)

    # messages along task edges from where each neighbour runs now (both directions)
    cur_opt = tb.opt_id[np.arange(n), R[:, 0]]
    logb = np.log1p(eb / max(float(eb.mean()), 1.0)) if E else eb
    edge_slack = (S[ev] - F[es] - trans_cur) / T
    ones = np.ones(E)
    msg_attr = np.concatenate([
        np.stack([trans_cur / T, edge_slack, logb, ones], axis=1),
        np.stack([trans_cur / T, edge_slack, logb, -ones], axis=1)]) if E else \
        np.zeros((0, EDGE_FEATURES))

    # candidates: relocations, then tensor-parallel moves, then codec switches
    single = size == 1
    reloc = ~(P[ot, od] & single[ot])
    c_opt = [np.nonzero(reloc)[0]]
    c_kind = [np.full(len(c_opt[0]), RELOCATE)]
    prior = [(crit_cur[ot] - crit[ot, od])[c_opt[0]] / T]
    feas = [fits[ot, od][c_opt[0]]]
    exact = [sure[ot, od][c_opt[0]]]
    if tp and tb.splittable.any():
        grow = tb.splittable[ot] & ~P[ot, od] & (size[ot] < MAX_GROUP)
        shrink = tb.splittable[ot] & P[ot, od] & (size[ot] > 1)
        for mask, kind, end, ok in ((grow, GROW, grow_end, grow_fits),
                                    (shrink, SHRINK, shrink_end, np.ones((n, m), bool))):
            idx = np.nonzero(mask)[0]
            c_opt.append(idx)
            c_kind.append(np.full(len(idx), kind))
            prior.append((F[ot] - end[ot, od])[idx] / T)
            feas.append(ok[ot, od][idx])
            exact.append(np.zeros(len(idx), dtype=bool))
    codec = _codec_candidates(tb, P, codecs, R, S, F, slack, T) if use_codecs else None
    if codec is not None:
        prior.append(codec[3])
        feas.append(np.ones(len(codec[3]), dtype=bool))
        exact.append(np.ones(len(codec[3]), dtype=bool))
    empty_i = np.zeros(0, dtype=np.int64)
    return Observation(
        x_task=x_task.astype(np.float32), x_dev=x_dev.astype(np.float32),
        x_opt=x_opt.astype(np.float32),
        cur_opt=cur_opt, msg_attr=msg_attr.astype(np.float32),
        cand_opt=np.concatenate(c_opt), cand_kind=np.concatenate(c_kind),
        codec_edge=codec[0] if codec else empty_i,
        codec_idx=codec[1] if codec else empty_i,
        codec_src_opt=cur_opt[es[codec[0]]] if codec else empty_i,
        codec_dst_opt=cur_opt[ev[codec[0]]] if codec else empty_i,
        x_codec=(codec[2] if codec else np.zeros((0, CODEC_FEATURES))).astype(np.float32),
        prior=np.nan_to_num(np.concatenate(prior), posinf=0.0, neginf=-10.0
                            ).astype(np.float32),
        feasible=np.concatenate(feas), exact=np.concatenate(exact),
    )


def _busy_between(P: np.ndarray, S: np.ndarray, F: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> np.ndarray:
    """``n × m``: seconds device d is busy with tasks other than t in [lo, hi] of (t, d).

    Each device's busy time up to x is a piecewise-linear function; all devices' are laid
    end to end on one axis (device d's times shifted by d·W) so one searchsorted answers
    every (t, d) query."""
    m = P.shape[1]
    pu, pj = np.nonzero(P)
    W = 2.0 * (max(float(hi.max()), float(F.max()), 0.0) + 1.0)
    key = pj * W + S[pu]
    order = np.argsort(key, kind="stable")
    key = key[order]
    dur = (F - S)[pu][order]
    before = np.cumsum(dur) - dur
    shift = np.arange(m)[None, :] * W

    q = np.stack([lo, hi]) + shift  # both ends of every window, in one search
    k = np.searchsorted(key, q, side="right") - 1
    kk = np.maximum(k, 0)
    busy = np.where(k >= 0, before[kk] + np.clip(q - key[kk], 0.0, dur[kk]), 0.0)
    own = P * np.maximum(np.minimum(F[:, None], hi) - np.maximum(S[:, None], lo), 0.0)
    return np.maximum(busy[1] - busy[0] - own, 0.0)


def _slack(tb: Tables, groups: Sequence[Group], S: np.ndarray, F: np.ndarray, now: float,
           trans_cur: np.ndarray, order_pos: np.ndarray) -> np.ndarray:
    """How long each task could slip without delaying the makespan, given the current
    device sequences and transfers (a backward pass over the timeline)."""
    start, end, cost = S.tolist(), F.tolist(), trans_cur.tolist()
    # latest first: by start, end, then priority position (unique, so no ties)
    order = np.lexsort((order_pos, F, S))[::-1].tolist()
    latest = [now] * tb.n
    next_on = [np.inf] * tb.m  # latest start of the next task on each device
    succ = tb.succ_edges
    for t in order:
        f = now
        for v, e in succ[t]:
            x = latest[v] - cost[e]
            if x < f:
                f = x
        g = groups[t]
        for j in g:
            if next_on[j] < f:
                f = next_on[j]
        f = f - (end[t] - start[t])
        latest[t] = f
        for j in g:
            next_on[j] = f
    return np.maximum(np.array(latest) - S, 0.0)


def _tensor_parallel(tb: Tables, groups: Sequence[Group], ready: np.ndarray,
                     used: np.ndarray, peak: np.ndarray, tp: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, m = tb.n, tb.m
    grow_end = np.zeros((n, m))
    shrink_end = np.zeros((n, m))
    grow_fits = np.zeros((n, m), dtype=bool)
    if not tp:
        return grow_end, shrink_end, grow_fits
    p = tb.p
    size = np.array([len(g) for g in groups])
    ts = np.nonzero(tb.splittable & (size == 1))[0]
    if len(ts):  # the common case, all at once: grow a single device r to (r, d)
        r = np.array([groups[t][0] for t in ts.tolist()])
        with np.errstate(divide="ignore"):
            inv = 1.0 / tb.comp[ts]                # 0 where not allowed
        inv_r = inv[np.arange(len(ts)), r][:, None]
        ok = tb.allowed[ts].copy()
        ok[np.arange(len(ts)), r] = False
        b = tb.out[ts][:, None]
        to_root = (tb.lat[:, r].T, tb.ibw[:, r].T)
        from_root = (tb.lat[r], tb.ibw[r])
        star = to_root[0] + b * to_root[1] + from_root[0] + b * from_root[1]
        ring = 2 * np.maximum(from_root[0] + b / 2 * from_root[1],
                              to_root[0] + b / 2 * to_root[1])
        dur = 1.0 / (inv_r + np.where(ok, inv, 0.0)) + np.minimum(star, ring)
        start = np.maximum(ready[ts, r][:, None], ready[ts])
        grow_end[ts] = np.where(ok, start + dur, 0.0)
        share = tb.param[ts][:, None] * inv / (inv_r + inv)
        grow_fits[ts] = ok & (used[None, :] + share + np.maximum(peak[None, :],
                                                                tb.act[ts][:, None])
                              <= tb.mem[None, :])
    for t in np.nonzero(tb.splittable & (size > 1))[0].tolist():
        g = groups[t]
        with np.errstate(divide="ignore"):
            inv = 1.0 / tb.comp[t]                  # 0 where not allowed
        inv_g = float(sum(inv[j] for j in g))
        ok = tb.allowed[t].copy()
        ok[list(g)] = False
        ar = allreduce_appended(tb, g, float(tb.out[t]))
        dur = 1.0 / (inv_g + np.where(ok, inv, 0.0)) + ar
        r = np.maximum(max(ready[t, j] for j in g), ready[t])
        grow_end[t] = np.where(ok, r + dur, 0.0)
        share_new = tb.param[t] * inv / (inv_g + inv)
        grow_fits[t] = ok & (used + share_new + np.maximum(peak, tb.act[t]) <= tb.mem)
        for j in g:
            rest = tuple(x for x in g if x != j)
            d = p.group_compute(t, rest) + p.allreduce_s(rest, p.out[t])
            shrink_end[t, j] = max(ready[t, x] for x in rest) + d
    return grow_end, shrink_end, grow_fits


def allreduce_appended(tb: Tables, g: Group, nbytes: float) -> np.ndarray:
    """All-reduce seconds of ``g + (d,)`` for every device ``d`` (as Problem.allreduce_s)."""
    lat, ibw = tb.lat, tb.ibw
    root = g[0]
    k = len(g) + 1
    up = lat[:, root] + nbytes * ibw[:, root]
    down = lat[root, :] + nbytes * ibw[root, :]
    for i in g[1:]:
        up = np.maximum(up, lat[i, root] + nbytes * ibw[i, root])
        down = np.maximum(down, lat[root, i] + nbytes * ibw[root, i])
    chunk = nbytes / k
    hop = np.maximum(lat[g[-1], :] + chunk * ibw[g[-1], :], lat[:, root] + chunk * ibw[:, root])
    for a, b in itertools.pairwise(g):
        hop = np.maximum(hop, lat[a, b] + chunk * ibw[a, b])
    return np.minimum(up + down, 2 * (k - 1) * hop)


def _codec_candidates(tb: Tables, P: np.ndarray,
                      codecs: Mapping[tuple[int, int], str], R: np.ndarray, S: np.ndarray,
                      F: np.ndarray, slack: np.ndarray, T: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Switching the codec of a cut edge: (edge, codec, features, prior) per candidate."""
    es, ev, eb = tb.es, tb.ev, tb.eb
    e = np.nonzero((P[ev] & ~P[es]).any(axis=1))[0]
    C = len(tb.codec_names)
    a, b, nb = R[es[e], 0], R[ev[e], 0], eb[e][:, None]
    cost = (nb * tb.enc[None, :] / tb.flops[a][:, None] + tb.lat[a, b][:, None]
            + nb * tb.ratio[None, :] * tb.ibw[a, b][:, None] + nb * tb.dec[None, :]
            / tb.flops[b][:, None])
    index = {name: i for i, name in enumerate(tb.codec_names)}
    cur_all = np.full(len(es), index.get("none", 0), dtype=np.int64)
    for key, name in codecs.items():
        cur_all[tb.edge_index[key]] = index.get(name, 0)
    cur = cur_all[e]
    cur_cost = cost[np.arange(len(e)), cur]
    saved = cur_cost[:, None] - cost
    edge_slack = (S[ev[e]] - F[es[e]] - cur_cost) / T
    pick = np.ones((len(e), C), dtype=bool)
    pick[np.arange(len(e)), cur] = False
    pick &= tb.valid[e]
    ei, ci = np.nonzero(pick)
    feats = np.stack([
        saved[ei, ci] / T, edge_slack[ei], slack[ev[e][ei]] / T,
        tb.ratio[ci], np.log1p(tb.enc[ci] + tb.dec[ci]),
        np.log1p(eb[e][ei] / max(float(eb.mean()), 1.0)),
    ], axis=1) if len(ei) else np.zeros((0, CODEC_FEATURES))
    binding = (edge_slack[ei] <= 1e-9).astype(float) if len(ei) else np.zeros(0)
    return e[ei], ci, feats, saved[ei, ci] / T * binding
