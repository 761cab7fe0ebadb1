"""The data plane: one gloo process group per deployment generation.

Pipeline stages exchange activations point to point and tensor-parallel groups all-reduce,
over ``torch.distributed``'s gloo backend. The coordinator hosts the rendezvous
(:class:`StoreHost`, a ``TCPStore``); every device of a deployment generation builds a
:class:`DataPlane` on it. The process group is built directly under the store prefix
``<deployment>/gen/<generation>`` rather than through ``init_process_group``, so several
generations (an old deployment draining while its replacement starts) and several
deployments of one coordinator live side by side in one process and one store.

A message is :mod:`.wire` bytes in one or two gloo messages. The receiver always posts a
64 KiB first chunk (gloo accepts a shorter message into a larger receive): the total length
(int64) and the first bytes. Only a longer message sends the rest as a second chunk of
exactly the size announced, so a small message costs one gloo rendezvous, not two. The
receive for a peer's next first chunk is posted as soon as its last one arrived: gloo
handles a message that finds no receive posted on a slow path (measured on loopback:
about 4 ms instead of 0.13 ms per round trip on a busy machine). Gloo's send completes
once the receiver has posted the matching receive, so a send to a busy stage waits for it
(back-pressure) within the timeout.

Gloo trusts its peers' framing: a peer that sends more bytes than the receive posted for
them makes gloo abort the whole process, and neither gloo nor the store authenticates
anyone. The data plane therefore trusts the ranks of its generation and belongs on the
cluster's own network; what it defends against is malformed *content* (:mod:`.wire`).

Every operation waits at most its timeout. A peer that dies (``kill -9``) closes its
sockets and the waiting operation fails at once; a peer that hangs or drops off the
network fails it when the timeout runs out. Either way :class:`DeviceLost` names the peer's
rank, and the plane is finished: gloo closes a connection whose operation timed out, so
the deployment is redeployed as a new generation.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore

from edgeswarm.device_agent import wire
from edgeswarm.placement.errors import DeviceLost, InvalidInput, ProtocolError

log = logging.getLogger("edgeswarm.agent.dataplane")

#: gloo tags: a message's first chunk on ``tag``, the rest (if any) on ``tag + 1``.
_DATA_TAG = 0
_STAR_TAG = 2
_DIRECT_TAG = 4
#: Unframed all-reduce messages travel on this tag plus their byte count, so a receive
#: posted ahead for one size never meets a message of another.
_RAW_TAG = 1 << 20
_RAW_MAX = 1 << 30
#: Receives for unframed messages up to this size are posted ahead, for the next call.
_RAW_PREPOST = 4 << 20
#: The first chunk of a message: its total length, then up to _INLINE - 8 of its bytes.
_INLINE = 64 * 1024
_PREFIX = struct.Struct("<q")
#: The longest wait gloo is asked for (a timedelta of "forever" overflows its milliseconds).
_MAX_WAIT_S = 30 * 24 * 3600.0
ALGORITHMS = ("gloo", "star", "direct")
#: dtypes gloo all-reduces (numpy names); "star" sums any numeric dtype of the wire.
_GLOO_DTYPES = frozenset({"float32", "float16", "int8", "uint8", "int32", "int64"})
#: A gloo process group, typed loosely: torch's stubs leave out its operations (send, recv,
#: allreduce) and its options class.
_Gloo = Any
_GLOO: Any = ProcessGroupGloo


@dataclass(frozen=True)
class Shaping:
    """An emulated link, applied by the sender: latency plus size over bandwidth."""

    latency_s: float = 0.0
    bandwidth_Bps: float | None = None  # None: unlimited

    def __post_init__(self) -> None:
        if not self.latency_s >= 0 or math.isinf(self.latency_s):
            raise InvalidInput(f"link latency must be a finite number of seconds >= 0, "
                               f"got {self.latency_s}")
        if self.bandwidth_Bps is not None and not self.bandwidth_Bps > 0:
            raise InvalidInput(f"link bandwidth must be > 0 bytes/s (or None for unlimited), "
                               f"got {self.bandwidth_Bps}")

    def delay_s(self, nbytes: int) -> float:
        """Seconds a message of ``nbytes`` spends on this link."""
        return self.latency_s + (nbytes / self.bandwidth_Bps if self.bandwidth_Bps else 0.0)


def _seconds(timeout_s: float) -> timedelta:
    return timedelta(seconds=min(timeout_s, _MAX_WAIT_S))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _route_address(host: str, port: int) -> str:
    """The local address that routes to ``host``: the interface gloo should listen on."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))  # UDP: picks a route, sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class StoreHost:
    """The coordinator's rendezvous: a ``TCPStore`` server on ``port`` (0: a free port).

    ``TCPStore`` listens on every interface whatever ``host`` says (``host`` only names the
    address its own client connects to), and it has no authentication: keep the port to
    the cluster's network. It looks connecting peers up in reverse DNS, so a resolver that
    drops queries stalls a join by its retry time (5 s with glibc's defaults).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> None:
        self.host = host
        try:
            self._store: TCPStore | None = TCPStore(host, port, None, True, _seconds(timeout_s),
                                                    wait_for_workers=False)
        except RuntimeError as exc:
            raise InvalidInput(f"cannot host the data-plane store on {host}:{port} "
                               f"({_first_line(exc)}): pick another --data-port") from None
        self._port = int(self._store.port)

    @property
    def port(self) -> int:
        return self._port

    def close(self) -> None:
        """Stop listening (dropping the last reference shuts the server down)."""
        self._store = None

    def __enter__(self) -> StoreHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def store_prefix(deployment: str, generation: int) -> str:
    """The store prefix one deployment generation's process group rendezvouses under."""
    return f"{deployment}/gen/{generation}"


class DataPlane:
    """One device's end of one deployment generation's gloo process group.

    ``timeout_s`` bounds every operation; ``join_timeout_s`` (default: the same) bounds
    joining the group and a sub-group, which waits for the slowest member to arrive.

    Operations are not thread-safe: one thread sends and receives. ``close`` drops the
    process group; it does not interrupt an operation already waiting in another thread
    (gloo cannot): that one ends when its peer closes, dies or its timeout runs out.
    """

    def __init__(self, store_host: str, store_port: int, rank: int, world_size: int,
                 generation: int, timeout_s: float = 10.0,
                 shaping: Mapping[int, Shaping] | None = None, *, host: str | None = None,
                 join_timeout_s: float | None = None, deployment: str = "",
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidInput(f"rank {rank} is not in a world of size {world_size}")
        join_s = timeout_s if join_timeout_s is None else join_timeout_s
        if not (timeout_s > 0 and join_s > 0):
            raise InvalidInput(f"data-plane timeouts must be > 0 seconds, got {timeout_s} "
                               f"and join {join_s}")
        for dst in shaping or {}:
            self._check_rank(dst, world_size, "shape the link to")
        self.rank = rank
        self.world_size = world_size
        self.generation = generation
        self.timeout_s = timeout_s
        self.join_timeout_s = join_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self._shaping = dict(shaping or {})
        self._sleep = sleep
        self._host = host or _route_address(store_host, store_port)
        self._groups: dict[tuple[int, ...], _Gloo] = {}
        #: (src, tag) -> the first-chunk buffer and receive posted for the next message
        self._posted: dict[tuple[int, int], tuple[np.ndarray, Any]] = {}
        #: (src, bytes) -> the buffer and receive posted for its next unframed part
        self._raw_posted: dict[tuple[int, int], tuple[torch.Tensor, Any]] = {}
        self._where = f"{store_host}:{store_port}"
        try:
            store = TCPStore(store_host, store_port, None, False, _seconds(join_s),
                             wait_for_workers=False)
        except RuntimeError as exc:
            raise DeviceLost(f"cannot reach the data-plane store at {self._where} (rank 0, "
                             f"the coordinator) within {join_s} s: {_first_line(exc)}"
                             ) from None
        # the deployment scopes the keys: every deployment numbers its generations from 1
        self._root: Store | None = PrefixStore(store_prefix(deployment, generation), store)
        self._pg: _Gloo | None = self._gloo(self._root, rank, world_size,
                                            f"generation {generation}")
        log.debug("rank %d/%d joined generation %d on %s", rank, world_size, generation,
                  self._host)

    # -- point to point ----------------------------------------------------------------

    def send(self, arrays: Sequence[np.ndarray], dst: int, request_id: int) -> int:
        """Send ``arrays`` tagged ``request_id`` to rank ``dst``; returns the message bytes."""
        self._check_peer(dst, "send to")
        raw = wire.encode(arrays, request_id)
        self._send_bytes(raw, dst, _DATA_TAG)
        return len(raw)

    def recv(self, src: int, timeout_s: float | None = None) -> tuple[int, list[np.ndarray]]:
        """The next message from rank ``src``: ``(request_id, arrays)``.

        ``timeout_s`` overrides the plane's timeout for this one wait (``math.inf``: no
        limit), for a stage that idles until the next request.
        """
        self._check_peer(src, "receive from")
        return wire.decode(self._recv_bytes(src, _DATA_TAG, timeout_s))

    # -- all-reduce --------------------------------------------------------------------

    def all_reduce(self, array: np.ndarray, group: Sequence[int],
                   algorithm: str = "gloo", framed: bool = True) -> np.ndarray:
        """The element-wise sum of ``array`` over the ranks of ``group`` (this one included).

        Every member calls it with the same ``group`` and ``algorithm``. "gloo": gloo's
        all-reduce on a sub-group (created by the first call, then reused; on shaped links
        each rank first sleeps its ring's link time, ``2 (k - 1)`` hops of ``1/k`` of the
        bytes); "star": the members send to ``group[0]``, which sums and sends the result
        back (so put the fastest member first); "direct": every member sends its part to
        every other and sums what arrives: one message delay instead of the star's two,
        ``k - 1`` messages out of each member. Star and direct are point to point, shaped
        like any send; every member gets the same bits (direct sums in ``group`` order).

        ``framed=False`` (star, direct): the parts travel as raw tensor bytes, with no
        :mod:`.wire` header, into receives posted ahead for their exact size: for members
        that run the same program, whose shapes agree by construction (a tensor-parallel
        group), it halves the cost of a small all-reduce. A member whose tensor has another
        size is then noticed by the timeout (DeviceLost), not by a ProtocolError, and one
        of the same size but another shape is not noticed at all.
        """
        members = tuple(group)
        if len(set(members)) != len(members) or self.rank not in members:
            raise InvalidInput(f"all-reduce group {list(members)} must list distinct ranks "
                               f"including this one ({self.rank})")
        for m in members:
            self._check_rank(m, self.world_size, "all-reduce with")
        if algorithm not in ALGORITHMS:
            raise InvalidInput(f"unknown all-reduce algorithm {algorithm!r}: choose one of "
                               f"{', '.join(ALGORITHMS)}")
        a = np.asarray(array)
        if a.dtype.kind not in "fiu" or a.dtype.name not in wire.DTYPES:
            raise InvalidInput(f"cannot all-reduce dtype {a.dtype}: use one of "
                               f"{', '.join(sorted(_GLOO_DTYPES))}")
        if len(members) == 1:
            return a.copy()
        if not framed and algorithm != "gloo" and 0 < a.nbytes <= _RAW_MAX:
            return self._raw(np.ascontiguousarray(a), members, algorithm == "star")
        if algorithm == "star":
            return self._star(a, members)
        if algorithm == "direct":
            return self._direct(a, members)
        if a.dtype.name not in _GLOO_DTYPES:
            raise InvalidInput(f"gloo cannot all-reduce {a.dtype}: use one of "
                               f"{', '.join(sorted(_GLOO_DTYPES))} or algorithm='star'")
        ring = tuple(sorted(members))
        pg = self._group(ring)
        t = torch.from_numpy(np.array(a, copy=True))
        link = self._shaping.get(ring[(ring.index(self.rank) + 1) % len(ring)])
        if link is not None:  # emulate the ring's hops on this rank's outgoing link
            k = len(ring)
            self._sleep(2 * (k - 1) * link.delay_s(a.nbytes // k))
        with self._failure(f"all-reduce over ranks {list(members)}"):
            pg.allreduce([t]).wait(_seconds(self.timeout_s))
        return t.numpy()

    def _star(self, a: np.ndarray, members: tuple[int, ...]) -> np.ndarray:
        root = members[0]
        if self.rank != root:
            self._send_bytes(wire.encode([a], 0), root, _STAR_TAG)
            return self._one_like(a, root)
        total = a.copy()
        for m in members[1:]:
            total += self._one_like(a, m)
        self._send_all(wire.encode([total], 0), members[1:], _STAR_TAG)
        return total

    def _direct(self, a: np.ndarray, members: tuple[int, ...]) -> np.ndarray:
        peers = [m for m in members if m != self.rank]
        for m in peers:  # every member sends before it receives: post the receives first
            if (m, _DIRECT_TAG) not in self._posted:
                self._posted[(m, _DIRECT_TAG)] = self._post(m, _DIRECT_TAG)
        parts = {self.rank: a}
        with self._sending(wire.encode([a], 0), peers, _DIRECT_TAG):
            for m in peers:
                parts[m] = self._one_like(a, m, _DIRECT_TAG)
        total = parts[members[0]].copy()
        for m in members[1:]:
            total += parts[m]
        return total

    def _raw(self, a: np.ndarray, members: tuple[int, ...], star: bool) -> np.ndarray:
        """Star (through ``members[0]``) or direct all-reduce of unframed tensors.

        Lean on purpose: a decoding step runs 61 of these, and each layer of Python here
        is on the critical path of both ends (one ``try`` instead of context managers).
        """
        pg = self._plane()
        mine = torch.from_numpy(a)
        n = mine.nbytes
        root = members[0]
        peers = [m for m in members if m != self.rank]
        wait = _seconds(self.timeout_s)
        peer = root  # the one being waited for, for the error message
        try:
            if star and self.rank != root:
                self._raw_ready(pg, root, n)
                self._raw_shape([root], n)
                pg.send([mine.reshape(-1).view(torch.uint8)], root, _RAW_TAG + n).wait(wait)
                out = self._raw_take(pg, root, n, wait)
                self.bytes_sent += n
                return out.view(mine.dtype).view(mine.shape).numpy()
            for m in peers:
                self._raw_ready(pg, m, n)
            if star:
                total = mine.clone()
                for peer in peers:
                    total += self._raw_take(pg, peer, n, wait).view(mine.dtype).view(mine.shape)
                self._raw_shape(peers, n)
                sends = [pg.send([total.reshape(-1).view(torch.uint8)], m, _RAW_TAG + n)
                         for m in peers]
            else:
                self._raw_shape(peers, n)
                sends = [pg.send([mine.reshape(-1).view(torch.uint8)], m, _RAW_TAG + n)
                         for m in peers]
                parts = {self.rank: mine}
                for peer in peers:
                    parts[peer] = self._raw_take(pg, peer, n, wait).view(mine.dtype).view(
                        mine.shape)
                total = parts[members[0]].clone()
                for m in members[1:]:
                    total += parts[m]
            for i, work in enumerate(sends):
                peer = peers[i]
                work.wait(wait)
        except RuntimeError as exc:
            line = _first_line(exc)
            why = ("no answer within the timeout" if "Timed out" in line
                   else "the connection closed")
            raise DeviceLost(f"all-reduce with rank {peer} failed in generation "
                             f"{self.generation}: {why} ({line}); the device died or is "
                             "unreachable: redeploy without it") from exc
        self.bytes_sent += n * len(peers)
        return total.numpy()

    def _raw_ready(self, pg: Any, src: int, nbytes: int) -> None:
        """Make sure a receive for ``src``'s next unframed part of ``nbytes`` is posted."""
        if (src, nbytes) not in self._raw_posted:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._raw_posted[(src, nbytes)] = (buf, pg.recv([buf], src, _RAW_TAG + nbytes))

    def _raw_take(self, pg: Any, src: int, nbytes: int, wait: timedelta) -> torch.Tensor:
        """``src``'s next part (bytes), its receive for the one after posted already."""
        buf, work = self._raw_posted.pop((src, nbytes))
        work.wait(wait)
        if nbytes <= _RAW_PREPOST:  # the next one is most likely the same size
            self._raw_ready(pg, src, nbytes)
        self.bytes_received += nbytes
        return buf

    def _raw_shape(self, dsts: Sequence[int], nbytes: int) -> None:
        """Shaped links: one sleep of the slowest link's delay (they carry side by side)."""
        if self._shaping:
            links = [link for link in (self._shaping.get(d) for d in dsts) if link is not None]
            if links:
                self._sleep(max(link.delay_s(nbytes) for link in links))

    def _one_like(self, a: np.ndarray, src: int, tag: int = _STAR_TAG) -> np.ndarray:
        _, arrays = wire.decode(self._recv_bytes(src, tag, None))
        if len(arrays) != 1 or arrays[0].shape != a.shape or arrays[0].dtype != a.dtype:
            got = ", ".join(f"{x.dtype}{list(x.shape)}" for x in arrays)
            raise ProtocolError(f"all-reduce: rank {src} sent [{got}], expected one "
                                f"{a.dtype}{list(a.shape)}: the group members disagree")
        return arrays[0]

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Leave the process group (peers waiting on this rank fail with DeviceLost)."""
        for pg in [self._pg, *self._groups.values()]:
            if pg is not None:
                pg.shutdown()
        self._pg, self._root = None, None
        self._groups.clear()
        self._posted.clear()
        self._raw_posted.clear()

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _check_peer(self, rank: int, what: str) -> None:
        self._check_rank(rank, self.world_size, what)
        if rank == self.rank:
            raise InvalidInput(f"cannot {what} rank {rank}: it is this device's own rank")

    @staticmethod
    def _check_rank(rank: int, world_size: int, what: str) -> None:
        if not 0 <= rank < world_size:
            raise InvalidInput(f"cannot {what} rank {rank}: ranks are 0..{world_size - 1}")

    def _gloo(self, store: Store, rank: int, size: int, what: str) -> _Gloo:
        options = _GLOO._Options()
        options._devices = [_GLOO.create_device(hostname=self._host)]
        options._timeout = _seconds(self.join_timeout_s)
        try:
            return _GLOO(store, rank, size, options)
        except RuntimeError as exc:
            raise DeviceLost(f"{what}: not all {size} ranks joined within {self.join_timeout_s} s "
                             f"({_first_line(exc)}); check that every device got the manifest "
                             f"and reaches {self._where}") from None

    def _group(self, members: tuple[int, ...]) -> _Gloo:
        pg = self._groups.get(members)
        if pg is None:
            if self._root is None:
                raise self._closed()
            name = "group/" + "-".join(map(str, members))
            pg = self._gloo(PrefixStore(name, self._root), members.index(self.rank),
                            len(members), f"all-reduce group {list(members)}")
            self._groups[members] = pg
        return pg

    def _plane(self) -> _Gloo:
        if self._pg is None:
            raise self._closed()
        return self._pg

    def _closed(self) -> DeviceLost:
        return DeviceLost(f"the data plane of generation {self.generation} is closed")

    @contextmanager
    def _failure(self, what: str) -> Iterator[None]:
        """Turn gloo's errors (peer closed, timeout) into DeviceLost naming ``what``."""
        try:
            yield
        except RuntimeError as exc:
            line = _first_line(exc)
            why = ("no answer within the timeout" if "Timed out" in line
                   else "the connection closed")
            raise DeviceLost(f"{what} failed in generation {self.generation}: {why} ({line}); "
                             "the device died or is unreachable: redeploy without it") from exc

    def _send_bytes(self, raw: bytes, dst: int, tag: int) -> None:
        with self._sending(raw, [dst], tag):
            pass

    def _send_all(self, raw: bytes, dsts: Sequence[int], tag: int) -> None:
        with self._sending(raw, dsts, tag):
            pass

    @contextmanager
    def _sending(self, raw: bytes, dsts: Sequence[int], tag: int) -> Iterator[None]:
        """Send ``raw`` to every rank of ``dsts`` while the body runs; wait for the sends
        at the end (a peer that sends to us before it receives needs our receive first).

        Shaped links carry their messages side by side, as the cost model has it
        (``placement.problem.allreduce_times``): one sleep of the slowest link's delay.
        """
        pg = self._plane()
        links = [link for link in (self._shaping.get(d) for d in dsts) if link is not None]
        if links:
            self._sleep(max(link.delay_s(len(raw)) for link in links))
        head = min(len(raw), _INLINE - _PREFIX.size)
        first = bytearray(_PREFIX.pack(len(raw))) + raw[:head]
        chunks = [torch.frombuffer(first, dtype=torch.uint8)]
        if head < len(raw):
            chunks.append(torch.frombuffer(bytearray(memoryview(raw)[head:]), dtype=torch.uint8))
        works: list[tuple[int, Any]] = []
        with self._failure(f"send to rank {', '.join(map(str, dsts))}"):
            for dst in dsts:
                works += [(dst, pg.send([c], dst, tag + i)) for i, c in enumerate(chunks)]
        yield
        for dst, work in works:
            with self._failure(f"send to rank {dst}"):
                work.wait(_seconds(self.timeout_s))
        self.bytes_sent += len(raw) * len(dsts)

    def _post(self, src: int, tag: int) -> tuple[np.ndarray, Any]:
        """Post a receive for the first chunk of the next message from ``src``."""
        # numpy, not torch.zeros: torch fills 64 KiB in parallel and wakes its thread pool,
        # which costs milliseconds on a busy small device. Zeros: a short chunk reads as 0s.
        first = np.zeros(_INLINE, dtype=np.uint8)
        return first, self._plane().recv([torch.from_numpy(first)], src, tag)

    def _recv_bytes(self, src: int, tag: int, timeout_s: float | None) -> memoryview:
        # The receive was posted when the previous message from src arrived: a message that
        # finds its receive waiting skips gloo's slow path for unexpected messages.
        posted = self._posted.pop((src, tag), None)
        first, work = posted if posted is not None else self._post(src, tag)
        with self._failure(f"receive from rank {src}"):
            work.wait(_seconds(self.timeout_s if timeout_s is None else timeout_s))
        (n,) = _PREFIX.unpack(first[:_PREFIX.size].tobytes())
        if not 0 < n <= wire.MAX_MESSAGE_BYTES:
            raise ProtocolError(f"rank {src} announced a message of {n} bytes; the limit is "
                                f"{wire.MAX_MESSAGE_BYTES}: the peer is broken or hostile")
        self._posted[(src, tag)] = self._post(src, tag)
        head = min(n, _INLINE - _PREFIX.size)
        if head < n:
            whole = np.empty(n, dtype=np.uint8)
            whole[:head] = first[_PREFIX.size:]
            with self._failure(f"receive from rank {src}"):
                self._plane().recv([torch.from_numpy(whole[head:])], src, tag + 1).wait(
                    _seconds(self.timeout_s))
        self.bytes_received += n
        return first[_PREFIX.size:_PREFIX.size + n].data if head == n else whole.data
