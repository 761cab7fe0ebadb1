"""Spiking devices in plans: the planner puts an snn model on the device that runs it best."""

import pytest

from edgeswarm.models.spiking import SnnExecutable, SpikingNetwork
from edgeswarm.models.spiking.placement import (
    TASK,
    SpikingCost,
    prefers_snn,
    seconds_on,
    spiking_task_graph,
)
from edgeswarm.models.zoo import ZooModel
from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.policies import place

LINK = LinkSpec(bandwidth_Bps=1e8, latency_s=1e-3)


def device(name: str, flops: float, *runtimes: str) -> Device:
    return Device(DeviceId(name), flops, 1 << 30, runtimes)


@pytest.fixture(scope="module")
def cost(cnn: ZooModel, cnn_net: SpikingNetwork) -> SpikingCost:
    exe = SnnExecutable(cnn_net, timesteps=4, confidence_spec=None)
    return SpikingCost.measure(exe, [cnn.heldout.inputs[0][:32].numpy()])


def test_the_cost_is_measured_from_a_real_run(cost: SpikingCost, cnn_net: SpikingNetwork) -> None:
    assert cost.steps == 4  # no early exit without a calibrated threshold
    assert cost.ann_macs == cnn_net.ann_macs() > cost.input_macs > 0
    assert 0 < cost.sops < 4 * cost.ann_macs
    assert cost.out_bytes == 10 * 4


def test_spiking_hardware_is_costed_by_events_and_a_cpu_by_dense_steps(
        cost: SpikingCost) -> None:
    chip = device("chip", 1e10, "snn", "torch")
    cpu = device("chip", 1e10, "torch", "snn")
    assert prefers_snn(chip) and not prefers_snn(cpu)
    assert seconds_on(chip, cost) == pytest.approx((2 * cost.input_macs + cost.sops) / 1e10)
    dense = 2 * (cost.input_macs + 4 * (cost.ann_macs - cost.input_macs)) / 1e10
    assert seconds_on(cpu, cost) == pytest.approx(dense)
    assert seconds_on(chip, cost) < seconds_on(cpu, cost)


def test_the_planner_prefers_the_device_that_declares_spiking_hardware(
        cost: SpikingCost) -> None:
    # the CPU is 5x faster at matmuls, the chip lists snn first: it runs per event
    cpu = device("cpu", 5e10, "torch", "onnx", "safetensors", "snn")
    chip = device("chip", 1e10, "snn", "torch", "safetensors")
    phone = device("phone", 1e12, "onnx")  # fastest, but cannot run a spiking model
    plan = place(spiking_task_graph(Cluster((cpu, chip, phone), default_link=LINK), cost),
                 Cluster((cpu, chip, phone), default_link=LINK))
    assert plan.devices_of(TASK) == ("chip",)
    # the same chip without the preference is simulated like a CPU, and the CPU wins
    plain = device("chip", 1e10, "torch", "snn")
    cluster = Cluster((cpu, plain, phone), default_link=LINK)
    assert place(spiking_task_graph(cluster, cost), cluster).devices_of(TASK) == ("cpu",)
    # a measured latency replaces the model
    graph = spiking_task_graph(cluster, cost, seconds={"chip": 1e-9})
    assert place(graph, cluster).devices_of(TASK) == ("chip",)
    (task,) = graph.tasks
    assert task.devices == ("cpu", "chip") and task.compute_s is not None
    assert task.compute_s["chip"] == 1e-9


def test_no_spiking_device_is_infeasible_and_bad_seconds_are_refused(
        cost: SpikingCost) -> None:
    cluster = Cluster((device("phone", 1e12, "onnx"), device("pi", 1e9)), default_link=LINK)
    with pytest.raises(PlacementInfeasible, match="no device of the cluster lists runtime 'snn'"):
        spiking_task_graph(cluster, cost)
    ok = Cluster((device("cpu", 1e10, "snn"),))
    with pytest.raises(InvalidInput, match=r"seconds\['cpu'\] must be >= 0"):
        spiking_task_graph(ok, cost, seconds={"cpu": float("nan")})
