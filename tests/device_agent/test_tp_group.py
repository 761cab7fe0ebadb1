"""Tensor-parallel members as the agent runs them: shard files, the executor's group
builders, a real gloo data plane between the members (threads of this process)."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _support import artifact
from _support import together as _together
from safetensors.numpy import load_file, save_file

from edgeswarm.device_agent.dataplane import StoreHost
from edgeswarm.device_agent.executor import ShardExecutor, open_plane
from edgeswarm.device_agent.manifest import Manifest, Shard
from edgeswarm.models.tp.shards import member_files, unpack
from edgeswarm.models.zoo.bert import BertConfig
from edgeswarm.models.zoo.llama import LlamaConfig, LlamaForCausalLM
from edgeswarm.models.zoo.minilm import SentenceEncoder
from edgeswarm.placement.errors import InvalidInput, ModelFileError

TIMEOUT_S = 30.0
BERT = BertConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=6,
                  intermediate_size=48, max_positions=16, type_vocab_size=2,
                  layer_norm_eps=1e-12)
LLAMA = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=2,
                    num_heads=6, num_kv_heads=2, rope_theta=10_000.0)



def together(*fns: Callable[[], Any], deadline_s: float = 60.0) -> list[Any]:
    return _together(*fns, deadline_s=deadline_s)



@pytest.fixture
def store() -> Iterator[StoreHost]:
    with StoreHost() as host:
        yield host


def seeded(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return module.eval()


def run_group(module: torch.nn.Module, speeds: list[float], inputs: list[np.ndarray],
              tmp_path: Path, port: int, builder: str, allreduce: str) -> np.ndarray:
    """Deploy ``module`` on len(speeds) members, run one request, return the lead's output."""
    files = member_files(module, speeds, tmp_path, allreduce)
    devices = [f"dev{i}" for i in range(len(speeds))]
    ranks = {"coordinator": 0} | {d: i + 1 for i, d in enumerate(devices)}
    group = [ranks[d] for d in devices]
    shards = [Shard(id=f"tp{i}", device=d, runtime="safetensors", artifact=artifact(path),
                    builder=builder, params=params, recv_from=[0],
                    send_to=[0] if i == 0 else [], tp_group=group)
              for i, (d, (path, params)) in enumerate(zip(devices, files, strict=True))]
    m = Manifest(deployment="tp", generation=1, model="m", store_host="127.0.0.1",
                 store_port=port, world_size=len(ranks), ranks=ranks, shards=shards,
                 timeout_s=TIMEOUT_S)
    planes = together(*[lambda d=d: open_plane(m, d) for d in ["coordinator", *devices]])
    coord, members = planes[0], planes[1:]
    try:
        execs = together(*[lambda d=d, p=p, f=f, s=s: ShardExecutor(m, d, {s.id: f[0]}, p)
                           for d, p, f, s in zip(devices, members, files, shards, strict=True)])

        def feed() -> np.ndarray:
            for r in group:
                coord.send(inputs, r, 7)
            rid, out = coord.recv(group[0])
            assert rid == 7
            return out[0]

        results = together(feed, *[ex.run_once for ex in execs])
        return np.asarray(results[0])
    finally:
        for p in planes:
            p.close()


@pytest.mark.parametrize("allreduce", ["gloo", "star"])
def test_a_minilm_shaped_encoder_on_an_uneven_group_equals_one_device(
        store: StoreHost, tmp_path: Path, allreduce: str) -> None:
    module = seeded(SentenceEncoder(BERT))
    ids = torch.randint(0, BERT.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    want = module(ids, mask).detach().numpy()
    got = run_group(module, [1.0, 0.5], [ids.numpy(), mask.numpy()], tmp_path, store.port,
                    "tp-bert", allreduce)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


def test_a_llama_on_three_members_gives_the_full_logits(store: StoreHost,
                                                        tmp_path: Path) -> None:
    module = seeded(LlamaForCausalLM(LLAMA))
    ids = torch.randint(0, LLAMA.vocab_size, (2, 7))
    want = module(ids).detach().numpy()
    got = run_group(module, [2.0, 1.0, 1.0], [ids.numpy()], tmp_path, store.port,
                    "tp-llama", "auto")
    assert got.shape == want.shape == (2, 7, LLAMA.vocab_size)
    assert np.abs(got - want).max() < 1e-4


def test_each_member_file_holds_only_its_slice(tmp_path: Path) -> None:
    module = seeded(LlamaForCausalLM(LLAMA))
    whole = sum(p.numel() * 4 for p in module.parameters())
    sizes = [sum(v.nbytes for v in load_file(str(path)).values())
             for path, _ in member_files(module, [1.0, 1.0], tmp_path)]
    assert len(sizes) == 2
    assert max(sizes) < 0.6 * whole      # norms are replicated, everything else split


def test_a_corrupt_or_foreign_shard_is_refused_with_the_reason(tmp_path: Path) -> None:
    module = seeded(SentenceEncoder(BERT))
    (path, params), _ = member_files(module, [1.0, 1.0], tmp_path)
    weights = load_file(str(path))
    with pytest.raises(ModelFileError, match="lack"):
        unpack(weights, {"meta": params["meta"]})
    odd = dict(weights) | {"bogus": np.zeros(2, dtype=np.float32)}
    with pytest.raises(ModelFileError, match="bogus"):
        unpack(odd, params)
    missing = {k: v for k, v in weights.items() if not k.startswith("layer.1.")}
    with pytest.raises(ModelFileError, match="lacks a layer"):
        unpack(missing, params)
    save_file({"x": np.zeros(1, dtype=np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InvalidInput, match="no tensor-parallel split"):
        member_files(torch.nn.Linear(2, 2), [1.0, 1.0], tmp_path / "lin")
