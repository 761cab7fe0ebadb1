import json

import pytest

from edgeswarm.placement import InvalidInput, TaskGraph

DOC = {
    "format": "edgeswarm.taskgraph/1",
    "tasks": [
        {"id": "a", "flops": 10, "param_bytes": 4, "out_bytes": 8},
        {"id": "b", "flops": 20.5, "param_bytes": 0, "out_bytes": 8, "kind": "linear",
         "splittable": True, "devices": ["phone"], "compute_s": {"phone": 0.25}},
        {"id": "c", "flops": 1, "param_bytes": 0, "out_bytes": 4},
    ],
    "edges": [{"src": "a", "dst": "b", "bytes": 8}, {"src": "a", "dst": "c", "bytes": 8},
              {"src": "b", "dst": "c", "bytes": 8}],
}


def test_round_trip_keeps_every_field():
    g = TaskGraph.from_json(DOC)
    again = TaskGraph.from_json(json.loads(g.dumps()))
    assert again == g
    b = again.task("b")
    assert b.splittable and b.kind == "linear"
    assert b.devices == ("phone",) and b.compute_s == {"phone": 0.25}
    assert again.task("a").kind == "other" and not again.task("a").splittable
    assert g.total_flops == pytest.approx(31.5)


def test_topological_order_respects_edges():
    order = TaskGraph.from_json(DOC).topological_order()
    assert order.index("a") < order.index("b") < order.index("c")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other/1"), "format"),
    (lambda d: d["tasks"][0].pop("flops"), "flops"),
    (lambda d: d["tasks"][0].update(flops="many"), "flops"),
    (lambda d: d["tasks"][0].update(param_bytes=-1), "negative"),
    (lambda d: d["edges"].append({"src": "a", "dst": "zz", "bytes": 1}), "zz"),
    (lambda d: d["edges"].append({"src": "c", "dst": "a", "bytes": 1}), "cycle"),
    (lambda d: d["tasks"].append(dict(d["tasks"][0])), "twice"),
    (lambda d: d.update(tasks="x"), "tasks"),
])
def test_bad_documents_name_the_problem(mutate, message):
    doc = json.loads(json.dumps(DOC))
    mutate(doc)
    with pytest.raises(InvalidInput, match=message):
        TaskGraph.from_json(doc)


def test_not_json_is_a_clear_error():
    with pytest.raises(InvalidInput, match="not JSON"):
        TaskGraph.from_json("{nope")
