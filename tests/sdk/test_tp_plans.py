"""Tensor-parallel plans the cluster deploys: the group, its plan, its manifest."""

import itertools
from pathlib import Path

import pytest
import torch

from edgeswarm.device_agent.artifacts import ArtifactServer
from edgeswarm.models.zoo.bert import BertConfig
from edgeswarm.models.zoo.minilm import SentenceEncoder
from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan, single
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId
from edgeswarm.tp_plans import GroupShards, group_manifest, group_of, group_plan, place_group

GB = 1e9


def chain(splittable_flops: float) -> TaskGraph:
    """embed -> attn -> mlp -> head; attn and mlp splittable."""
    tasks = (Task(TaskId("embed"), 1e6, 1000, 4000),
             Task(TaskId("attn"), splittable_flops, 1000, 4000, "attention", True),
             Task(TaskId("mlp"), splittable_flops, 1000, 4000, "mlp", True),
             Task(TaskId("head"), 1e6, 1000, 4000))
    names = [t.id for t in tasks]
    return TaskGraph(tasks, tuple(Edge(a, b, 4000) for a, b in itertools.pairwise(names)))


def cluster(latency_s: float) -> Cluster:
    devices = tuple(Device(DeviceId(f"d{i}"), f, 8 * 2**30)
                    for i, f in enumerate((1 * GB, 4 * GB, 2 * GB, 0.5 * GB)))
    return Cluster(devices, default_link=LinkSpec(125e6, latency_s))


def test_group_plan_puts_splittable_tasks_on_the_group_and_the_rest_on_its_lead() -> None:
    plan = group_plan(chain(1e9), [DeviceId("d1"), DeviceId("d2")])
    assert plan.assignments["attn"] == plan.assignments["mlp"] == ("d1", "d2")
    assert plan.assignments["embed"] == plan.assignments["head"] == ("d1",)
    assert group_of(plan) == ("d1", "d2")
    assert group_of(single({"embed": "d0", "attn": "d0", "mlp": "d1", "head": "d1"})) is None


def test_a_plan_with_two_groups_is_refused_by_name() -> None:
    plan = Plan({TaskId("attn"): (DeviceId("a"), DeviceId("b")),
                 TaskId("mlp"): (DeviceId("a"), DeviceId("c"))})
    with pytest.raises(InvalidInput, match=r"2 different tensor-parallel groups.*a,b; a,c"):
        group_of(plan)


def test_the_group_grows_while_compute_outweighs_the_all_reduces() -> None:
    heavy = place_group(chain(4e10), cluster(1e-4), max_members=4)
    assert group_of(heavy) is not None
    members = group_of(heavy) or ()
    assert members[0] == "d1" and len(members) >= 2      # fastest first
    # tiny work behind slow links: the fastest device alone
    light = place_group(chain(1e6), cluster(0.05), max_members=4)
    assert group_of(light) is None and light.assignments["attn"] == ("d1",)
    assert light.predicted_latency_s < float("inf")
    assert place_group(chain(4e10), cluster(1e-4), max_members=1).assignments["attn"] == ("d1",)


def test_a_graph_without_splittable_tasks_cannot_go_tensor_parallel() -> None:
    g = TaskGraph((Task(TaskId("a"), 1e6, 0, 8),), ())
    with pytest.raises(InvalidInput, match="no splittable task"):
        place_group(g, cluster(1e-3), 4)


def test_the_manifest_feeds_every_member_and_reads_the_lead(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SentenceEncoder(BertConfig(vocab_size=30, hidden_size=24, num_layers=1,
                                        num_heads=6, intermediate_size=48, max_positions=8,
                                        type_vocab_size=2, layer_norm_eps=1e-12))
    server = ArtifactServer(tmp_path / "served").start()
    try:
        files = GroupShards(server, module, tmp_path / "tp")
        m = group_manifest(files, cluster(1e-3), ["d1", "d2", "d0"], deployment="x",
                           generation=3, model="minilm", store=("127.0.0.1", 1234))
        assert m.ranks == {"coordinator": 0, "d1": 1, "d2": 2, "d0": 3}
        assert [s.recv_from for s in m.shards] == [[0], [0], [0]]
        assert [s.send_to for s in m.shards] == [[0], [], []]
        assert all(s.tp_group == [1, 2, 3] and s.builder == "tp-bert" for s in m.shards)
        assert m.shards[0].params["link"]["latency_s"] == pytest.approx(1e-3)
        again = group_manifest(files, cluster(1e-3), ["d1", "d2", "d0"], deployment="x",
                               generation=4, model="minilm", store=("127.0.0.1", 1234))
        assert [s.artifact for s in again.shards] == [s.artifact for s in m.shards]
        with pytest.raises(InvalidInput, match="'zz'"):
            group_manifest(files, cluster(1e-3), ["d1", "zz"], deployment="x", generation=5,
                           model="minilm", store=("127.0.0.1", 1234))
        with pytest.raises(InvalidInput, match="no tensor-parallel split"):
            GroupShards(server, torch.nn.Linear(2, 2))
    finally:
        server.stop()
