import json

import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, Link, LinkSpec
from edgeswarm.placement.errors import InvalidInput


def two_devices(**kw) -> Cluster:
    devs = (Device(DeviceId("a"), 1e9, 1 << 20), Device(DeviceId("b"), 2e9, 1 << 20))
    return Cluster(devs, **kw)


def test_a_link_given_once_holds_both_ways_unless_the_reverse_is_given():
    c = two_devices(links=(Link(DeviceId("a"), DeviceId("b"), 100.0, 0.5),))
    assert c.transfer_s("a", "b", 100) == pytest.approx(1.5)
    assert c.transfer_s("b", "a", 100) == pytest.approx(1.5)
    c = two_devices(links=(Link(DeviceId("a"), DeviceId("b"), 100.0, 0.5),
                           Link(DeviceId("b"), DeviceId("a"), 50.0, 0.0)))
    assert c.transfer_s("b", "a", 100) == pytest.approx(2.0)
    assert c.transfer_s("a", "a", 1e12) == 0.0


def test_default_link_covers_unlisted_pairs():
    c = two_devices(default_link=LinkSpec(10.0, 1.0))
    assert c.transfer_s("a", "b", 20) == pytest.approx(3.0)


def test_unreachable_pair_without_default_link_is_named():
    devs = (Device(DeviceId("a"), 1e9, 1), Device(DeviceId("b"), 1e9, 1),
            Device(DeviceId("c"), 1e9, 1))
    with pytest.raises(InvalidInput, match=r"a->c"):
        Cluster(devs, links=(Link(DeviceId("a"), DeviceId("b"), 1.0, 0.0),
                             Link(DeviceId("b"), DeviceId("c"), 1.0, 0.0)))


def test_bad_devices_and_links_are_named():
    with pytest.raises(InvalidInput, match="'a' appears twice"):
        Cluster((Device(DeviceId("a"), 1.0, 1), Device(DeviceId("a"), 1.0, 1)))
    with pytest.raises(InvalidInput, match="unknown device 'z'"):
        two_devices(links=(Link(DeviceId("a"), DeviceId("z"), 1.0, 0.0),))
    with pytest.raises(InvalidInput, match="bandwidth_Bps"):
        two_devices(links=(Link(DeviceId("a"), DeviceId("b"), 0.0, 0.0),))
    with pytest.raises(InvalidInput, match="flops"):
        Cluster((Device(DeviceId("a"), 0.0, 1),))


def test_json_round_trip_and_errors():
    c = two_devices(links=(Link(DeviceId("a"), DeviceId("b"), 100.0, 0.5),),
                    default_link=LinkSpec(5.0, 0.1))
    again = Cluster.from_json(json.loads(c.dumps()))
    assert again == c
    doc = {"format": "edgeswarm.cluster/1",
           "devices": [{"id": "x", "flops": 1e9, "memory_bytes": 10, "runtimes": ["onnx"]}],
           "links": []}
    assert Cluster.from_json(doc).device("x").runtimes == ("onnx",)
    with pytest.raises(InvalidInput, match="format"):
        Cluster.from_json({"format": "nope", "devices": []})
    with pytest.raises(InvalidInput, match="memory_bytes"):
        Cluster.from_json({"format": "edgeswarm.cluster/1",
                           "devices": [{"id": "x", "flops": 1.0, "memory_bytes": "big"}]})
    with pytest.raises(InvalidInput, match="not JSON"):
        Cluster.from_json("{")


def test_without_and_with_devices():
    c = two_devices(default_link=LinkSpec(5.0, 0.1))
    assert c.without(["a"]).ids == ["b"]
    with pytest.raises(InvalidInput, match="unknown"):
        c.without(["q"])
    bigger = c.with_devices([Device(DeviceId("c"), 3e9, 5)])
    assert bigger.ids == ["a", "b", "c"]
    faster = c.with_devices([Device(DeviceId("a"), 9e9, 5)])
    assert faster.device("a").flops == 9e9
    with pytest.raises(InvalidInput, match="unknown device 'q'"):
        c.device("q")
