"""The scoring network: message passing over the option graph, one logit per move.

Every (task, device) option gets an embedding from its own features plus its task's
and its device's; ``layers`` rounds of message passing then bring in what the
neighbouring tasks' current placements imply (GiPH's gpNet: the embedding of the option
each neighbour is placed on, with the transfer time and arrival slack of the edge,
averaged over the task's edges in both directions) and what the task's other options
look like (their mean). A head turns each option embedding into three logits (relocate the task
there, add the device to its tensor-parallel group, remove it from the group); a
second head scores switching the codec of a cut edge from the embeddings of its two
ends. Each logit also gets a learned multiple of the move's heuristic prior, so an
untrained network already ranks moves sensibly and training refines that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from edgeswarm.placement.gnn.features import (
    CODEC_FEATURES,
    DEVICE_FEATURES,
    EDGE_FEATURES,
    OPTION_FEATURES,
    TASK_FEATURES,
    Observation,
)
from edgeswarm.placement.gnn.tables import Tables

#: Logits per (task, device) option: relocate there, grow the group by it, shrink it.
OPTION_MOVES = 3

#: Feature groups the network normalises (mean/std stored with the checkpoint).
GROUPS = {"task": TASK_FEATURES, "device": DEVICE_FEATURES, "option": OPTION_FEATURES,
          "edge": EDGE_FEATURES, "codec": CODEC_FEATURES}


@dataclass(frozen=True)
class NetConfig:
    hidden: int = 32
    layers: int = 1
    #: initial weight of the heuristic prior in the logits
    prior_init: float = 20.0

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


class NeighbourConv(MessagePassing):
    """Mean of messages along task edges (both directions): the embedding of the option
    the neighbour is placed on now, plus a projection of the edge's features (transfer
    time, arrival slack, bytes, direction). Every option of the receiving task gets the
    same message sum, so it is computed per task and broadcast."""

    def __init__(self, hidden: int, edge_dim: int) -> None:
        super().__init__(aggr="sum")
        self.src = nn.Linear(hidden, hidden)
        self.edge = nn.Linear(edge_dim, hidden, bias=False)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, norm: Tensor) -> Tensor:
        agg = self.propagate(edge_index, x=self.src(x), edge_attr=self.edge(edge_attr),
                             norm=norm)
        out: Tensor = self.out(agg)
        return out

    def message(self, x_j: Tensor, edge_attr: Tensor, norm: Tensor) -> Tensor:
        return torch.relu(x_j + edge_attr) * norm


def _mlp(inp: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden))


class GiphNet(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        for name, width in GROUPS.items():
            self.register_buffer(f"mean_{name}", torch.zeros(width))
            self.register_buffer(f"std_{name}", torch.ones(width))
        self.task_in = _mlp(TASK_FEATURES, h)
        self.dev_in = _mlp(DEVICE_FEATURES, h)
        self.opt_in = _mlp(OPTION_FEATURES, h)
        self.conv = nn.ModuleList(NeighbourConv(h, EDGE_FEATURES) for _ in range(cfg.layers))
        self.mix = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.layers))
        self.pool = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.layers))
        head_out, codec_out = nn.Linear(h, OPTION_MOVES), nn.Linear(h, 1)
        for last in (head_out, codec_out):  # start from the prior's ranking
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), head_out)
        self.codec_head = nn.Sequential(nn.Linear(2 * h + CODEC_FEATURES, h), nn.ReLU(),
                                        codec_out)
        self.prior_w = nn.Parameter(torch.full((4,), cfg.prior_init))

    # -- normalisation ----------------------------------------------------------------
    def set_normalisation(self, stats: Mapping[str, tuple[list[float], list[float]]]) -> None:
        for name, (mean, std) in stats.items():
            getattr(self, f"mean_{name}").copy_(torch.tensor(mean))
            getattr(self, f"std_{name}").copy_(torch.tensor(std).clamp_min(1e-6))

    def normalisation(self) -> dict[str, tuple[list[float], list[float]]]:
        return {name: (getattr(self, f"mean_{name}").tolist(),
                       getattr(self, f"std_{name}").tolist()) for name in GROUPS}

    def _norm(self, name: str, x: np.ndarray) -> Tensor:
        t = torch.from_numpy(x)
        out: Tensor = (t - getattr(self, f"mean_{name}")) / getattr(self, f"std_{name}")
        return out

    # -- scoring ----------------------------------------------------------------------
    def forward(self, obs: Observation, g: GraphTensors) -> Tensor:
        """One logit per candidate of ``obs`` (option candidates first, then codecs);
        infeasible candidates get -inf."""
        # index_select / index_add rather than fancy indexing and PyG's scatter: the same
        # sums, a quarter of the time on these small tensors (a forward runs every step)
        h_task = self.task_in(self._norm("task", obs.x_task))
        h_dev = self.dev_in(self._norm("device", obs.x_dev))
        h = (self.opt_in(self._norm("option", obs.x_opt)) + h_task.index_select(0, g.opt_task)
             + h_dev.index_select(0, g.opt_dev))
        attr = self._norm("edge", obs.msg_attr)
        cur = torch.from_numpy(obs.cur_opt)
        n_task = obs.x_task.shape[0]
        for conv, pool, mix in zip(self.conv, self.pool, self.mix, strict=True):
            pooled = h.new_zeros(n_task, h.shape[1]).index_add(0, g.opt_task, h) * g.inv_count
            task = conv(h.index_select(0, cur), g.task_edges, attr, g.msg_norm) + pool(pooled)
            h = h + torch.relu(mix(h) + task.index_select(0, g.opt_task))
        kinds = torch.from_numpy(obs.cand_kind)
        prior = torch.from_numpy(obs.prior)
        n_opt = len(obs.cand_kind)
        flat = torch.from_numpy(obs.cand_opt * OPTION_MOVES + obs.cand_kind)
        logits = self.head(h).reshape(-1).index_select(0, flat)
        logits = logits + self.prior_w.index_select(0, kinds) * prior[:n_opt]
        if len(obs.codec_idx):
            src = h[torch.from_numpy(obs.codec_src_opt)]
            dst = h[torch.from_numpy(obs.codec_dst_opt)]
            x = torch.cat([src, dst, self._norm("codec", obs.x_codec)], dim=-1)
            codec = self.codec_head(x).squeeze(-1) + self.prior_w[3] * prior[n_opt:]
            logits = torch.cat([logits, codec])
        return logits.masked_fill(~torch.from_numpy(obs.feasible), float("-inf"))


@dataclass
class GraphTensors:
    """The tensors of one problem that stay fixed while its plan changes."""

    opt_task: Tensor
    opt_dev: Tensor
    inv_count: Tensor   # n × 1: 1 / options of the task
    task_edges: Tensor  # 2 × 2E: every task edge forward, then backward
    msg_norm: Tensor    # 2E × 1: 1 / messages into the receiving task

    @classmethod
    def of(cls, tb: Tables) -> GraphTensors:
        src = np.concatenate([tb.es, tb.ev])
        dst = np.concatenate([tb.ev, tb.es])
        deg = np.bincount(dst, minlength=tb.n).astype(np.float32)
        count = np.bincount(tb.opt_t, minlength=tb.n).astype(np.float32)
        return cls(torch.from_numpy(tb.opt_t), torch.from_numpy(tb.opt_d),
                   torch.from_numpy(1.0 / np.maximum(count, 1.0))[:, None],
                   torch.from_numpy(np.stack([src, dst])),
                   torch.from_numpy(1.0 / np.maximum(deg[dst], 1.0))[:, None])
