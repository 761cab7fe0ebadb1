"""The gloo data plane on loopback: real TCPStore, real process groups, real sockets.

Ranks that only need to talk run as threads of the test process (each has its own gloo
process group and sockets, as a device would); what needs a separate process (a peer
killed with SIGKILL, generations in two processes) runs a child Python.
"""

import datetime
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from _support import together as _together
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from edgeswarm.device_agent import wire
from edgeswarm.device_agent.dataplane import DataPlane, Shaping, StoreHost, store_prefix
from edgeswarm.placement.errors import DeviceLost, InvalidInput, ProtocolError

TIMEOUT_S = 5.0
#: Joining waits for the store: c10d looks up peer addresses in reverse DNS, and a resolver
#: that drops a query stalls it for 5 s (seen in sandboxes). Only joins get this margin.
JOIN_S = 30.0



def together(*fns: Callable[[], Any], deadline_s: float = 20.0) -> list[Any]:
    return _together(*fns, deadline_s=deadline_s)


@pytest.fixture
def store() -> Iterator[StoreHost]:
    with StoreHost() as host:
        yield host


@pytest.fixture
def planes(store: StoreHost) -> Iterator[Callable[..., list[DataPlane]]]:
    """Build a world of DataPlanes (one per rank, concurrently, as devices would)."""
    made: list[DataPlane] = []

    def build(world_size: int, generation: int = 1,
              per_rank: dict[int, dict[str, Any]] | None = None) -> list[DataPlane]:
        extra = per_rank or {}
        out = together(*[lambda r=r: DataPlane("127.0.0.1", store.port, r, world_size,
                                               generation, timeout_s=TIMEOUT_S,
                                               join_timeout_s=JOIN_S,
                                               **extra.get(r, {}))
                         for r in range(world_size)])
        made.extend(out)
        return out

    yield build
    for p in made:
        p.close()


def test_point_to_point_through_a_pipeline(planes: Callable[..., list[DataPlane]]) -> None:
    coord, a, b = planes(3)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    def stage(p: DataPlane, src: int, dst: int, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        rid, (t,) = p.recv(src)
        p.send([fn(t)], dst, rid)

    def coordinator() -> tuple[int, list[np.ndarray]]:
        sent = coord.send([x], 1, 42)
        assert sent == coord.bytes_sent
        return coord.recv(2)

    rid, (y,) = together(coordinator, lambda: stage(a, 0, 2, lambda t: t * 2),
                         lambda: stage(b, 1, 0, lambda t: t + 1))[0]
    assert rid == 42
    np.testing.assert_array_equal(y, x * 2 + 1)
    assert coord.bytes_received == b.bytes_sent == a.bytes_received > x.nbytes


def test_messages_from_one_peer_arrive_in_order(planes: Callable[..., list[DataPlane]]) -> None:
    a, b = planes(2)

    def sender() -> None:
        for i in range(20):
            a.send([np.full(i + 1, i, dtype=np.int64)], 1, i)

    def receiver() -> list[tuple[int, list[np.ndarray]]]:
        return [b.recv(0) for _ in range(20)]

    got = together(sender, receiver)[1]
    for i, (rid, (arr,)) in enumerate(got):
        assert rid == i
        np.testing.assert_array_equal(arr, np.full(i + 1, i))


# A one-tensor uint8 message is 40 bytes of headers plus the data; the first chunk holds
# 64 KiB - 8 bytes of message, so these sizes fit it exactly, miss by one, and need a second.
@pytest.mark.parametrize("n", [65528 - 40, 65528 - 40 + 1, 300_000])
def test_messages_longer_than_the_first_chunk_arrive_whole(
        planes: Callable[..., list[DataPlane]], n: int) -> None:
    a, b = planes(2)
    x = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    small = np.arange(3, dtype=np.int64)

    def sender() -> None:
        assert a.send([x], 1, 1) == n + 40
        a.send([small], 1, 2)  # and the stream is still in step after it

    (rid, (got,)), (rid2, (got2,)) = together(sender, lambda: [b.recv(0), b.recv(0)])[1]
    assert (rid, rid2) == (1, 2)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(got2, small)
    assert b.bytes_received == a.bytes_sent


@pytest.mark.parametrize("algorithm", ["gloo", "star"])
def test_all_reduce_sums_over_the_whole_world(planes: Callable[..., list[DataPlane]],
                                              algorithm: str) -> None:
    world = planes(3)
    parts = [np.arange(6, dtype=np.int32).reshape(2, 3) * (r + 1) for r in range(3)]
    out = together(*[lambda r=r: world[r].all_reduce(parts[r], [0, 1, 2], algorithm)
                     for r in range(3)])
    for got in out:
        np.testing.assert_array_equal(got, sum(parts))
        assert got.dtype == np.int32


@pytest.mark.parametrize("algorithm", ["gloo", "star"])
def test_all_reduce_in_a_sub_group_reuses_it(planes: Callable[..., list[DataPlane]],
                                             algorithm: str) -> None:
    _, a, b = planes(3)  # rank 0 takes no part
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(4)]
    for step in range(2):  # the second call finds the sub-group made by the first
        ra, rb = together(lambda s=step: a.all_reduce(xs[2 * s], [2, 1], algorithm),
                          lambda s=step: b.all_reduce(xs[2 * s + 1], [2, 1], algorithm))
        np.testing.assert_allclose(ra, xs[2 * step] + xs[2 * step + 1], rtol=1e-6)
        np.testing.assert_array_equal(ra, rb)
    if algorithm == "star":
        assert a.bytes_sent > 0 and b.bytes_received > 0


def test_all_reduce_rejects_bad_groups_and_dtypes(planes: Callable[..., list[DataPlane]]
                                                  ) -> None:
    a, _ = planes(2)
    x = np.ones(3, np.float32)
    with pytest.raises(InvalidInput, match="including this one"):
        a.all_reduce(x, [1])
    with pytest.raises(InvalidInput, match="distinct"):
        a.all_reduce(x, [0, 1, 1])
    with pytest.raises(InvalidInput, match=r"ranks are 0\.\.1"):
        a.all_reduce(x, [0, 5])
    with pytest.raises(InvalidInput, match="own rank"):
        a.send([x], 0, 1)
    with pytest.raises(InvalidInput, match=r"ranks are 0\.\.1"):
        a.recv(2)
    with pytest.raises(InvalidInput, match="unknown all-reduce algorithm"):
        a.all_reduce(x, [0, 1], "ring")
    with pytest.raises(InvalidInput, match="cannot all-reduce"):
        a.all_reduce(np.ones(3, bool), [0, 1])
    np.testing.assert_array_equal(a.all_reduce(x, [0]), x)  # a group of one: a copy


def test_star_all_reduce_refuses_members_that_disagree(planes: Callable[..., list[DataPlane]]
                                                       ) -> None:
    a, b = planes(2)
    member: dict[str, BaseException] = {}

    def wrong_shape() -> None:
        try:
            b.all_reduce(np.ones(4, np.float32), [0, 1], "star")
        except DeviceLost as exc:
            member["error"] = exc

    t = threading.Thread(target=wrong_shape)
    t.start()
    try:
        with pytest.raises(ProtocolError, match=r"rank 1 sent \[float32\[4\]\], expected"):
            a.all_reduce(np.ones(3, np.float32), [0, 1], "star")
        a.close()  # the member waiting for the result learns that the root left
    finally:
        t.join(TIMEOUT_S * 2)
    assert not t.is_alive()
    assert "receive from rank 0" in str(member["error"])


def test_a_silent_peer_times_out_as_device_lost(store: StoreHost) -> None:
    a, b = together(*[lambda r=r: DataPlane("127.0.0.1", store.port, r, 2, 1, timeout_s=0.5,
                                                join_timeout_s=JOIN_S)
                      for r in range(2)])
    try:
        start = time.monotonic()
        with pytest.raises(DeviceLost, match=r"rank 1.*no answer within the timeout"):
            a.recv(1)
        assert time.monotonic() - start >= 0.5
    finally:
        a.close()
        b.close()


def test_rendezvous_without_every_rank_fails_in_time(store: StoreHost) -> None:
    with pytest.raises(DeviceLost, match="not all 2 ranks joined"):
        DataPlane("127.0.0.1", store.port, 0, 2, 9, timeout_s=0.5)


def test_an_unreachable_store_is_device_lost() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeviceLost, match="cannot reach the data-plane store"):
        DataPlane("127.0.0.1", port, 1, 2, 1, timeout_s=0.5)


def test_bad_arguments_are_refused(store: StoreHost) -> None:
    with pytest.raises(InvalidInput, match="rank 3 is not in a world of size 2"):
        DataPlane("127.0.0.1", store.port, 3, 2, 1)
    with pytest.raises(InvalidInput, match="timeout"):
        DataPlane("127.0.0.1", store.port, 0, 2, 1, timeout_s=0)
    with pytest.raises(InvalidInput, match="timeouts must be > 0"):
        DataPlane("127.0.0.1", store.port, 0, 2, 1, join_timeout_s=-1)
    with pytest.raises(InvalidInput, match="shape the link to rank 4"):
        DataPlane("127.0.0.1", store.port, 0, 2, 1, shaping={4: Shaping()})
    with pytest.raises(InvalidInput, match="latency"):
        Shaping(latency_s=-1)
    with pytest.raises(InvalidInput, match="bandwidth"):
        Shaping(bandwidth_Bps=0)


def test_store_host_frees_its_port_on_close() -> None:
    host = StoreHost()
    port = host.port
    assert port > 0
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    host.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_shaped_send_takes_latency_plus_size_over_bandwidth(
        planes: Callable[..., list[DataPlane]]) -> None:
    link = Shaping(latency_s=0.05, bandwidth_Bps=1e6)
    delays: list[float] = []

    def recording_sleep(s: float) -> None:
        delays.append(s)
        time.sleep(s)

    a, b = planes(2, per_rank={0: {"shaping": {1: link}, "sleep": recording_sleep}})
    x = np.zeros(5000, np.float32)  # 20 kB

    def timed_send() -> tuple[int, float]:
        start = time.perf_counter()
        n = a.send([x], 1, 0)
        return n, time.perf_counter() - start

    (nbytes, took), _ = together(timed_send, lambda: b.recv(0))
    assert nbytes > x.nbytes
    assert delays == [pytest.approx(0.05 + nbytes / 1e6)]
    assert took >= 0.05 + nbytes / 1e6  # a lower bound: the link can only slow it
    # the other direction is not shaped
    together(lambda: b.send([x], 0, 1), lambda: a.recv(1))
    assert len(delays) == 1


def _hostile_peer(port: int, generation: int) -> ProcessGroupGloo:
    """Rank 1 of a 2-rank world built with raw gloo: it can put any bytes on the wire."""
    t = datetime.timedelta(seconds=JOIN_S)
    client = TCPStore("127.0.0.1", port, None, False, t, wait_for_workers=False)
    options = ProcessGroupGloo._Options()
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = t
    return ProcessGroupGloo(PrefixStore(store_prefix("", generation), client), 1, 2, options)


_VALID_HEAD = struct.pack("<4sHqI", b"ESW1", 1, 0, 1)  # one tensor follows


@pytest.mark.parametrize("length, payload, match", [
    (-5, b"", "announced a message of -5 bytes"),
    (wire.MAX_MESSAGE_BYTES + 1, b"", "announced a message"),
    (16, b"GET / HTTP/1.1\r\n", "truncated"),
    (40, b"ESW1" + bytes(36), "version 0"),
    (40, b"HTTP" + bytes(36), "bad magic"),
    # announces more than it sends: the rest of the first chunk reads as zeros
    (100, _VALID_HEAD, "unknown dtype code 0"),
])
def test_malformed_traffic_from_a_peer_is_a_protocol_error(
        store: StoreHost, length: int, payload: bytes, match: str) -> None:
    t = datetime.timedelta(seconds=TIMEOUT_S)

    def peer() -> ProcessGroupGloo:
        pg = _hostile_peer(store.port, 3)
        chunk = bytearray(struct.pack("<q", length) + payload)  # the first-chunk framing
        pg.send([torch.frombuffer(chunk, dtype=torch.uint8)], 0, 0).wait(t)
        return pg

    box: dict[str, Any] = {}

    def honest() -> None:
        box["plane"] = DataPlane("127.0.0.1", store.port, 0, 2, 3, timeout_s=TIMEOUT_S,
                                 join_timeout_s=JOIN_S)
        box["plane"].recv(1)

    try:
        with pytest.raises(ProtocolError, match=match):
            together(honest, peer)
    finally:
        if "plane" in box:
            box["plane"].close()


# -- across processes ---------------------------------------------------------------------

CHILD = r"""
import json, sys, time
import numpy as np
from edgeswarm.device_agent.dataplane import DataPlane
args = json.loads(sys.argv[1])
port = args["port"]
if args["mode"] == "generations":
    g1 = DataPlane("127.0.0.1", port, 1, 2, 1, timeout_s=5.0, join_timeout_s=30.0)
    g2 = DataPlane("127.0.0.1", port, 1, 2, 2, timeout_s=5.0, join_timeout_s=30.0)
    for _ in range(3):  # interleaved: each generation echoes with its own factor
        rid, (x,) = g2.recv(0); g2.send([x * 2], 0, rid)
        rid, (x,) = g1.recv(0); g1.send([x * 1], 0, rid)
    g1.close(); g2.close()
    print(json.dumps({"ok": True}), flush=True)
else:
    p = DataPlane("127.0.0.1", port, 1, 2, 1, timeout_s=5.0, join_timeout_s=30.0)
    p.send([np.ones(3, np.float32)], 0, 1)
    p.all_reduce(np.ones(3, np.float32), [0, 1])  # makes the sub-group before the kill
    print(json.dumps({"ready": True}), flush=True)
    time.sleep(60)  # killed long before
"""


@pytest.fixture
def child(store: StoreHost) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", CHILD,
                              json.dumps({"port": store.port, "mode": mode})],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if p.stdout:
            p.stdout.close()


@pytest.mark.slow
def test_two_generations_live_side_by_side_in_two_processes(
        store: StoreHost, child: Callable[[str], subprocess.Popen[str]]) -> None:
    proc = child("generations")
    g1, g2 = together(lambda: DataPlane("127.0.0.1", store.port, 0, 2, 1, timeout_s=20,
                                                join_timeout_s=JOIN_S),
                      lambda: DataPlane("127.0.0.1", store.port, 0, 2, 2, timeout_s=20,
                                                join_timeout_s=JOIN_S),
                      deadline_s=30)
    try:
        for i in range(3):
            x = np.full(4, float(i), np.float32)
            g2.send([x], 1, 100 + i)
            assert g2.recv(1)[0] == 100 + i
            g1.send([x], 1, i)
            rid, (y,) = g1.recv(1)
            assert rid == i
            np.testing.assert_array_equal(y, x)
        assert g1.bytes_sent == g2.bytes_sent  # same sizes, counted per generation
    finally:
        g1.close()
        g2.close()
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline()) == {"ok": True}
    assert proc.wait(10) == 0


@pytest.mark.slow
def test_a_peer_killed_mid_protocol_is_device_lost_not_a_hang(
        store: StoreHost, child: Callable[[str], subprocess.Popen[str]]) -> None:
    proc = child("kill")
    plane = DataPlane("127.0.0.1", store.port, 0, 2, 1, timeout_s=20, join_timeout_s=JOIN_S)
    try:
        assert plane.recv(1)[0] == 1
        plane.all_reduce(np.ones(3, np.float32), [0, 1])
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        killer = threading.Timer(0.3, proc.kill)  # SIGKILL while recv is waiting
        killer.start()
        start = time.monotonic()
        try:
            with pytest.raises(DeviceLost, match=r"receive from rank 1.*connection closed"):
                plane.recv(1)
        finally:
            killer.join()
        with pytest.raises(DeviceLost, match="send to rank 1"):
            plane.send([np.ones(2, np.float32)], 1, 2)
        with pytest.raises(DeviceLost, match=r"all-reduce over ranks \[0, 1\]"):
            plane.all_reduce(np.ones(3, np.float32), [0, 1])
        # a killed peer is seen at once, well inside the timeout
        assert time.monotonic() - start < plane.timeout_s
    finally:
        plane.close()
