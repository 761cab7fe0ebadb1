"""Run one tensor-parallel group on this machine: one process per member, one core each.

The parent cuts the model (:func:`write_shards`: every member's slice into its own
directory with ``store.write_shard``), hosts the rendezvous and spawns the members
(``multiprocessing`` "spawn": a clean interpreter, as a device would have). A member:

1. pins itself to one core (``rank % cpu_count``) and one torch thread: an emulated device;
2. opens only its own shard (``open_store(dir, window)``) and joins the group's data plane
   with the emulated link (:class:`~edgeswarm.device_agent.dataplane.Shaping`) to every peer;
3. warms up (first touches, gloo's sub-group), then runs the job ``repeats`` times, each
   after a barrier, timing it;
4. runs the correctness pass: its own logit columns (LLM) or the hidden states (encoder),
   sent back to the parent, which compares them with the one-device model;
5. reports its parameter bytes, the RSS before it opened its shard and its peak RSS
   (``VmHWM``: ``ru_maxrss`` survives ``exec`` on Linux, so a spawned child's would start
   at the parent's peak, here the whole model).

The group of one runs the same member program with no data plane. Everything is bounded:
a member that raises reports the error; one that dies (``kill -9``, out of memory) is
noticed by its exit code; a run past ``timeout_s`` is stopped. Either way every member
process is gone when :func:`run_group` returns or raises, and the error names the member.

The member processes import the data plane (``edgeswarm.device_agent``): the runner is the
one place under ``models/`` that does, lazily, because it *is* a small agent; the member
programs (:mod:`.llama`, :mod:`.bert`) only see a :class:`~.collective.Collective`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgeswarm.models.tp.llama import MemberShard
from edgeswarm.models.tp.split import Split
from edgeswarm.placement import errors
from edgeswarm.placement.errors import DeviceLost, InvalidInput

if TYPE_CHECKING:
    from edgeswarm.device_agent.dataplane import Shaping

log = logging.getLogger("edgeswarm.models.tp")

__all__ = ["CollectiveJob", "DecodeJob", "EncodeJob", "GroupOptions", "GroupResult",
           "MemberReport", "run_collectives", "run_group", "write_shards"]


@dataclass(frozen=True)
class DecodeJob:
    """Greedy generation: ``new_tokens`` after ``prompt`` (token ids, one row per sequence);
    the correctness pass feeds ``check_tokens`` (the reference's greedy tokens) for
    ``check_steps`` decode steps."""

    prompt: tuple[tuple[int, ...], ...]
    new_tokens: int
    check_tokens: tuple[tuple[int, ...], ...] = ()
    check_steps: int = 0
    #: The prompt in this many pieces that take turns (one's all-reduce under the other's
    #: work); decoding is one token, one piece.
    prefill_chunks: int = 1

    kind = "llama"


@dataclass(frozen=True)
class EncodeJob:
    """One encoder forward pass over a batch, cut in ``micro_batches`` pieces that take
    turns (one piece's all-reduce overlaps the next one's work)."""

    input_ids: tuple[tuple[int, ...], ...]
    attention_mask: tuple[tuple[int, ...], ...]
    micro_batches: int = 1

    kind = "bert"


@dataclass(frozen=True)
class CollectiveJob:
    """All-reduces alone: ``rounds`` of each algorithm on float32 tensors of each shape
    (unframed, as a tensor-parallel member runs them; "star-framed": in wire messages),
    with ``compute_s`` of busy work between two (a member program computes between its
    all-reduces, which lets the peers' receives be posted in time)."""

    shapes: tuple[tuple[int, ...], ...]
    algorithms: tuple[str, ...]
    rounds: int = 50
    compute_s: float = 0.0

    kind = "collective"


Job = DecodeJob | EncodeJob | CollectiveJob


@dataclass(frozen=True)
class GroupOptions:
    """How a group runs: the all-reduce algorithm, the emulated link between every two
    members (None: plain loopback), the sliding window (None: every layer resident)."""

    algorithm: str = "auto"
    link: Shaping | None = None
    window: int | None = None
    repeats: int = 3
    check: bool = True
    pin: bool = True
    #: Bounds every data-plane operation (and joining the group).
    op_timeout_s: float = 60.0
    #: Bounds the whole run, start-up included.
    timeout_s: float = 600.0


@dataclass(frozen=True)
class MemberReport:
    """What one member measured and returns to the parent."""

    rank: int
    times_s: tuple[float, ...]                 # per repeat: TTFT (LLM) or forward (encoder)
    step_s: tuple[tuple[float, ...], ...]      # per repeat: every later token (LLM)
    collectives: tuple[tuple[int, float, int, float], ...]  # per repeat: prefill n, s; decode n, s
    algorithms: dict[str, int]
    tokens: list[list[int]] | None
    outputs: dict[str, np.ndarray]
    param_bytes: int
    resident_param_bytes: int
    base_rss_bytes: int
    peak_rss_bytes: int
    core: int | None
    #: CollectiveJob: mean milliseconds per all-reduce, "algorithm shape" -> ms.
    allreduce_ms: dict[str, float] = field(default_factory=dict)
    #: "auto": each algorithm's measured seconds per call ("star") and per byte
    #: ("star_per_byte") beyond the links (calibration).
    overhead_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupResult:
    """Every member's report, rank order; the group's figures are the slowest member's in
    each repeat, best repeat kept."""

    members: tuple[MemberReport, ...]
    options: GroupOptions
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.members)

    def best_time_s(self) -> float:
        """TTFT (LLM) or one forward pass (encoder): best over repeats of the slowest member."""
        per_repeat = zip(*(m.times_s for m in self.members), strict=True)
        return min(max(ts) for ts in per_repeat)

    def best_step_s(self) -> float:
        """Mean seconds per token after the first: best repeat of the slowest member."""
        best = float("inf")
        for r in range(len(self.members[0].step_s)):
            steps = [m.step_s[r] for m in self.members]
            if steps[0]:
                best = min(best, max(sum(s) / len(s) for s in steps))
        return best

    def collective_ms(self) -> tuple[float, float]:
        """Mean milliseconds per all-reduce (prefill, decode) on member 0, in its best
        repeat (the wait for the slowest member included)."""
        m = self.members[0]
        if not m.collectives:
            return 0.0, 0.0
        r = min(range(len(m.times_s)), key=lambda i: m.times_s[i])
        n_p, s_p, n_d, s_d = m.collectives[r]
        return (1e3 * s_p / n_p if n_p else 0.0), (1e3 * s_d / n_d if n_d else 0.0)


# -- the parent -------------------------------------------------------------------------


def write_shards(kind: str, model: torch.nn.Module, split: Split, directory: Path
                 ) -> list[tuple[Path, int]]:
    """Cut ``model`` by ``split`` and write member ``r``'s slice to ``directory/member_r``;
    returns each member's directory and parameter bytes. ``kind``: "llama" or "bert"."""
    from edgeswarm.models.tp.store import write_shard

    shards: list[MemberShard]
    if kind == "llama":
        from edgeswarm.models.tp.llama import slice_llama
        from edgeswarm.models.zoo.llama import LlamaForCausalLM

        if not isinstance(model, LlamaForCausalLM):
            raise InvalidInput(f"kind 'llama' needs a LlamaForCausalLM, got {type(model).__name__}")
        shards = slice_llama(model, split)
    elif kind == "bert":
        from edgeswarm.models.tp.bert import slice_bert
        from edgeswarm.models.zoo.bert import BertEncoder

        if not isinstance(model, BertEncoder):
            raise InvalidInput(f"kind 'bert' needs a BertEncoder, got {type(model).__name__}")
        shards = slice_bert(model, split)
    else:
        raise InvalidInput(f"unknown member program {kind!r}: 'llama' or 'bert'")
    out = []
    for rank, shard in enumerate(shards):
        path = Path(directory) / f"member_{rank}"
        out.append((path, write_shard(path, shard.layers, shard.extra, shard.meta)))
    return out


def run_group(shard_dirs: Sequence[Path], job: DecodeJob | EncodeJob,
              options: GroupOptions | None = None) -> GroupResult:
    """Run ``job`` on a group of ``len(shard_dirs)`` member processes (member ``r`` opens
    ``shard_dirs[r]``), each on its own core; return what every member reported.

    Raises :class:`DeviceLost` naming the member that died or did not finish in time, or
    the error a member raised (its class when it is one of edgeswarm's).
    """
    if not shard_dirs:
        raise InvalidInput("a group needs at least one member shard")
    return _launch([str(d) for d in shard_dirs], job, options or GroupOptions())


def run_collectives(size: int, job: CollectiveJob, options: GroupOptions | None = None
                    ) -> GroupResult:
    """Time all-reduces alone on ``size`` member processes (no model)."""
    if size < 2:
        raise InvalidInput(f"all-reduces need a group of at least 2, got {size}")
    return _launch([None] * size, job, options or GroupOptions())


def _launch(shard_dirs: Sequence[str | None], job: Job, options: GroupOptions) -> GroupResult:
    size = len(shard_dirs)
    if options.repeats < 1:
        raise InvalidInput(f"repeats must be >= 1, got {options.repeats}")
    from edgeswarm.models.tp.collective import ALGORITHMS

    if options.algorithm not in ALGORITHMS:
        raise InvalidInput(f"unknown all-reduce algorithm {options.algorithm!r}: choose one "
                           f"of {', '.join(ALGORITHMS)}")
    from edgeswarm.device_agent.dataplane import StoreHost

    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    with StoreHost(timeout_s=options.op_timeout_s) as host:
        specs = [_Spec(rank, size, host.port, shard_dirs[rank], job, options)
                 for rank in range(size)]
        procs = [ctx.Process(target=_member_main, args=(spec, results),
                             name=f"edgeswarm-tp-member-{spec.rank}", daemon=True)
                 for spec in specs]
        grace_s = 0.5  # a failed group: the others are stuck on the lost member
        try:
            for p in procs:
                p.start()
            reports = _collect(procs, results, options.timeout_s)
            grace_s = 5.0
        finally:
            _stop(procs, grace_s)
            results.close()
            results.join_thread()
    return GroupResult(tuple(reports[r] for r in range(size)), options)


def _collect(procs: Sequence[Any], results: Any, timeout_s: float) -> dict[int, MemberReport]:
    """Every member's report, or raise for the first member that failed, died or ran late."""
    deadline = time.monotonic() + timeout_s
    reports: dict[int, MemberReport] = {}
    failures: list[tuple[int, str, str]] = []
    while len(reports) < len(procs) and not failures:
        try:
            status, rank, payload = results.get(timeout=0.2)
        except queue.Empty:
            done = set(reports)
            dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode is not None]
            if dead:
                try:  # it may have reported just before exiting: one last look
                    status, rank, payload = results.get(timeout=0.5)
                except queue.Empty:
                    raise _died(dead[0], procs[dead[0]]) from None
            elif time.monotonic() > deadline:
                missing = sorted(set(range(len(procs))) - done)
                raise DeviceLost(f"tensor-parallel members {missing} did not finish within "
                                 f"{timeout_s:.0f} s; the group is stopped") from None
            else:
                continue
        _file(status, rank, payload, reports, failures)
    if failures:
        # A peer's failure is often the echo of another member's (its connection closed):
        # wait a moment for the others' reports and name the cause, not the echo.
        end = time.monotonic() + 1.0
        while len(reports) + len(failures) < len(procs) and time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                status, rank, payload = results.get(timeout=0.1)
                _file(status, rank, payload, reports, failures)
        rank, kind, message = next((f for f in failures if f[1] != "DeviceLost"), failures[0])
        for r, p in enumerate(procs):
            if r != rank and p.exitcode is not None and p.exitcode < 0:
                raise _died(r, p)
        if kind == "DeviceLost" and reports:
            message += (f" (member(s) {sorted(reports)} had finished their job and closed "
                        f"their connections: the members disagreed on the collectives left)")
        cls = getattr(errors, kind, None)
        text = f"tensor-parallel member {rank} failed: {message}"
        if isinstance(cls, type) and issubclass(cls, errors.Error):
            raise cls(text)
        raise RuntimeError(text)
    return reports


def _died(rank: int, proc: Any) -> DeviceLost:
    how = (f"was killed by signal {-proc.exitcode}" if proc.exitcode < 0
           else f"exited with code {proc.exitcode}")
    return DeviceLost(f"tensor-parallel member {rank} (pid {proc.pid}) {how} before "
                      f"reporting; the group is stopped")


def _file(status: str, rank: int, payload: Any, reports: dict[int, MemberReport],
          failures: list[tuple[int, str, str]]) -> None:
    if status == "ok":
        reports[rank] = payload
    else:
        kind, message = payload
        failures.append((rank, kind, message))


def _stop(procs: Sequence[Any], grace_s: float) -> None:
    """Join every member for up to ``grace_s``, then kill the rest: none outlives the run."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join(5.0)


# -- a member ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    rank: int
    size: int
    store_port: int
    shard_dir: str | None
    job: Job
    options: GroupOptions


def _member_main(spec: _Spec, results: Any) -> None:
    """Entry point of a member process: run, then put ``("ok", rank, report)`` or
    ``("error", rank, (class name, message))`` on ``results``."""
    try:
        report = _member(spec)
    except BaseException as exc:  # report everything, then exit non-zero
        tail = traceback.format_exc(limit=-3).strip().splitlines()[-6:]
        results.put(("error", spec.rank, (type(exc).__name__,
                                          f"{type(exc).__name__}: {exc} [{' | '.join(tail)}]")))
        results.close()
        results.join_thread()
        raise SystemExit(1) from None
    results.put(("ok", spec.rank, report))
    results.close()
    results.join_thread()


def _member(spec: _Spec) -> MemberReport:
    from edgeswarm.models.tp.collective import PlaneCollective, Solo
    from edgeswarm.models.tp.memory import current_rss_bytes, hwm_bytes
    from edgeswarm.models.tp.store import open_store

    options = spec.options
    core = None
    overhead: dict[str, float] = {}
    if options.pin and hasattr(os, "sched_setaffinity"):
        core = spec.rank % (os.cpu_count() or 1)
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    base_rss = current_rss_bytes()
    if isinstance(spec.job, CollectiveJob):
        return _member_collectives(spec, spec.job, core)
    if spec.shard_dir is None:
        raise InvalidInput(f"member {spec.rank} has no shard to run {spec.job.kind!r}")
    store = open_store(Path(spec.shard_dir), options.window)
    plane = None
    coll: Any = None
    try:
        if spec.size == 1:
            coll = Solo()
        else:
            plane = _plane(spec)
            # Equal emulated devices: the star's root (the fastest) is member 0.
            coll = PlaneCollective(plane, range(spec.size), options.algorithm, options.link)
            if options.algorithm == "auto":
                costs = coll.calibrate()
                overhead = {**{a: v for a, v in costs["overhead_s"].items()},
                            **{f"{a}_per_byte": v for a, v in costs["per_byte_s"].items()}}
        if isinstance(spec.job, DecodeJob):
            run = _run_decode(spec.job, store, coll, options)
        else:
            run = _run_encode(spec.job, store, coll, options)
        resident = store.resident_bytes()
        return MemberReport(
            rank=spec.rank, core=core, param_bytes=store.param_bytes(),
            resident_param_bytes=max(resident, run.pop("resident", 0)),
            base_rss_bytes=base_rss, peak_rss_bytes=hwm_bytes(),
            algorithms=dict(coll.stats.by_algorithm), overhead_s=overhead, **run)
    finally:
        if coll is not None:
            coll.close()
        if plane is not None:
            plane.close()
        store.close()


def _plane(spec: _Spec) -> Any:
    from edgeswarm.device_agent.dataplane import DataPlane

    options = spec.options
    link = options.link
    shaping = ({peer: link for peer in range(spec.size) if peer != spec.rank}
               if link is not None else None)
    return DataPlane("127.0.0.1", spec.store_port, spec.rank, spec.size, 1,
                     timeout_s=options.op_timeout_s, shaping=shaping,
                     join_timeout_s=options.op_timeout_s)


def _member_collectives(spec: _Spec, job: CollectiveJob, core: int | None) -> MemberReport:
    from edgeswarm.models.tp.memory import current_rss_bytes, hwm_bytes

    plane = _plane(spec)
    group = list(range(spec.size))
    out: dict[str, float] = {}
    try:
        for shape in job.shapes:
            a = np.random.default_rng(spec.rank).random(shape, dtype=np.float32)
            for name in job.algorithms:
                # "star-framed": the data plane's default, each part in a wire message
                algorithm, framed = name.removesuffix("-framed"), name.endswith("-framed")
                for _ in range(3):  # warm-up (gloo builds its sub-group on the first)
                    plane.all_reduce(a, group, algorithm, framed)
                plane.all_reduce(np.zeros(1, np.float32), group, "star")  # barrier
                total = 0.0
                for _ in range(job.rounds):
                    _busy(job.compute_s)
                    start = time.perf_counter()
                    plane.all_reduce(a, group, algorithm, framed)
                    total += time.perf_counter() - start
                out[f"{name} {'x'.join(map(str, shape))}"] = 1e3 * total / job.rounds
    finally:
        plane.close()
    return MemberReport(rank=spec.rank, times_s=(), step_s=(), collectives=(), algorithms={},
                        tokens=None, outputs={}, param_bytes=0, resident_param_bytes=0,
                        base_rss_bytes=current_rss_bytes(), peak_rss_bytes=hwm_bytes(),
                        core=core, allreduce_ms=out)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _barrier(coll: Any) -> None:
    if coll.size > 1:
        coll.all_reduce(torch.zeros(1))


def _run_decode(job: DecodeJob, store: Any, coll: Any, options: GroupOptions
                ) -> dict[str, Any]:
    from edgeswarm.models.tp.llama import LlamaMember, member_checks

    member = LlamaMember(store, coll)
    prompt = torch.tensor(job.prompt, dtype=torch.long)
    member.generate(prompt[:, :8], 2, job.prefill_chunks)   # warm-up: first touches
    resident = store.resident_bytes()
    times, steps, collectives = [], [], []
    tokens = None
    for _ in range(options.repeats):
        _barrier(coll)
        gen = member.generate(prompt, job.new_tokens, job.prefill_chunks)
        resident = max(resident, store.resident_bytes())
        times.append(gen.ttft_s)
        steps.append(gen.step_s)
        collectives.append((*gen.prefill_collectives, *gen.decode_collectives))
        tokens = gen.tokens.tolist()
    outputs: dict[str, np.ndarray] = {}
    if options.check and job.check_steps >= 0:
        feed = torch.tensor(job.check_tokens or [[0]] * prompt.shape[0], dtype=torch.long)
        prefill, decoded = member_checks(member, prompt, feed,
                                         job.check_steps if job.check_tokens else 0,
                                         gather=False)
        outputs["prefill"] = prefill.numpy()
        if decoded:
            outputs["decode"] = torch.stack(decoded).numpy()
    return {"times_s": tuple(times), "step_s": tuple(steps), "collectives": tuple(collectives),
            "tokens": tokens, "outputs": outputs, "resident": resident}


def _run_encode(job: EncodeJob, store: Any, coll: Any, options: GroupOptions
                ) -> dict[str, Any]:
    from edgeswarm.models.tp.bert import BertMember

    member = BertMember(store, coll)
    ids = torch.tensor(job.input_ids, dtype=torch.long)
    mask = torch.tensor(job.attention_mask, dtype=torch.long)
    member.forward(ids[:2, :8], mask[:2, :8], job.micro_batches)   # warm-up
    resident = store.resident_bytes()
    times, collectives = [], []
    hidden = None
    for _ in range(options.repeats):
        _barrier(coll)
        c0, s0 = coll.stats.calls, coll.stats.seconds
        hidden, seconds = member.timed(ids, mask, job.micro_batches)
        times.append(seconds)
        collectives.append((coll.stats.calls - c0, coll.stats.seconds - s0, 0, 0.0))
        resident = max(resident, store.resident_bytes())
    outputs = {"hidden": hidden.numpy()} if options.check and hidden is not None \
        and coll.rank == 0 else {}
    return {"times_s": tuple(times), "step_s": tuple(() for _ in times),
            "collectives": tuple(collectives), "tokens": None, "outputs": outputs,
            "resident": resident}
