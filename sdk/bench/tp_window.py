"""What the sliding window costs and saves on one tensor-parallel member (issue 6 item 4).

:func:`measure_window` runs one SmolLM2 member in a fresh process pinned to one core with
one torch thread (an emulated device, as the bench's members are): it opens the member's
shard with a given window, times greedy generation (a 128-token prompt, then new tokens
one at a time) and reports the peak RSS of each phase. The member computes alone: its
all-reduces are the identity, so the figures are its compute and memory without the
links (the runner's group runs add the communication, :mod:`.runner`). A fresh process per
figure makes the peak mean something: no other run's memory is in it.

``python -m edgeswarm.bench.tp_window`` measures a grid (members x window x mode)
and prints a table or, with ``--json``, one JSON object; the figures in docs/tp.md
("Sliding window") come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgeswarm.placement.errors import InvalidInput

__all__ = ["measure_window", "write_smollm2_shards"]

PROMPT_TOKENS = 128
NEW_TOKENS = 16


def _alone(rank: int, size: int) -> Any:
    """Member ``rank`` of ``size`` with nobody to talk to: the group of one's collectives
    (identities) under the member's own rank and size, so the member computes its slice
    alone (its compute and memory, without the links)."""
    from edgeswarm.models.tp.collective import Solo

    coll = Solo()
    coll.rank, coll.size = rank, size
    return coll


def write_smollm2_shards(directory: Path, members: int) -> list[Path]:
    """SmolLM2 cut for ``members`` equal members (the runner's split), one shard each."""
    from edgeswarm.bench.tp_runner import write_shards
    from edgeswarm.models.tp.llama import llama_shape
    from edgeswarm.models.tp.split import split_layers
    from edgeswarm.models.zoo.smollm2 import load_lm

    model = load_lm().module
    split = split_layers(llama_shape(model.config), [1.0] * members)
    return [path for path, _ in write_shards("llama", model, split, Path(directory))]


def measure_window(shard_dir: Path, window: int | None, *, mode: str = "mmap",
                   keep_page_cache: bool = True, prompt_tokens: int = PROMPT_TOKENS,
                   new_tokens: int = NEW_TOKENS, repeats: int = 2, core: int | None = None,
                   timeout_s: float = 600.0) -> dict[str, Any]:
    """Run the member whose shard is ``shard_dir`` in a fresh process on one core; returns
    ``{"ttft_ms", "tpot_ms", "peak_rss_bytes", "prefill_peak_rss_bytes",
    "decode_peak_rss_bytes", "base_rss_bytes", "param_bytes", ...}`` (best of ``repeats``
    for the times, the largest peak). ``window=None``: every layer resident."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise InvalidInput(f"window must be None or an int >= 1, got {window!r}")
    args = [sys.executable, "-m", "edgeswarm.bench.tp_window", "member",
            str(shard_dir), "--window", "none" if window is None else str(window),
            "--mode", mode, "--prompt-tokens", str(prompt_tokens),
            "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    if not keep_page_cache:
        args.append("--drop-page-cache")
    if core is not None:
        args += ["--core", str(core)]
    done = subprocess.run(args, capture_output=True, text=True,  # noqa: S603 (our argv)
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the window measurement failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _member(shard_dir: Path, window: int | None, mode: str, keep_page_cache: bool,
            prompt_tokens: int, new_tokens: int, repeats: int, core: int) -> dict[str, Any]:
    """The child process's side of :func:`measure_window`."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    from edgeswarm.models.tp.llama import LlamaMember
    from edgeswarm.models.tp.memory import PeakMeter, current_rss_bytes, hwm_bytes
    from edgeswarm.models.tp.store import ResidentStore
    from edgeswarm.models.tp.window import WindowStore

    base = current_rss_bytes()
    store: ResidentStore | WindowStore
    if window is None:
        store = ResidentStore(shard_dir)
    else:
        store = WindowStore(shard_dir, window, mode=mode,  # type: ignore[arg-type]
                            keep_page_cache=keep_page_cache)
    opened = current_rss_bytes()
    meta = store.meta
    member = LlamaMember(store, _alone(int(meta["rank"]), int(meta["size"])))
    vocab = member.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator()
                           .manual_seed(0))
    with torch.inference_mode():
        member.generate(prompt[:, :8], 2)  # warm-up: first touches, as the runner does
        ttft, tpot, ttft_cpu, tpot_cpu, pre_peak, dec_peak = [], [], [], [], 0, 0
        for _ in range(repeats):
            member.reset()
            with PeakMeter() as pre:
                start, cpu = time.perf_counter(), time.process_time()
                x = member.forward(member.embed(prompt))
                _, x = member.next_token(x[:, -1])
                ttft.append(time.perf_counter() - start)
                ttft_cpu.append(time.process_time() - cpu)
            with PeakMeter() as dec:
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(new_tokens):
                    x = member.forward(x)
                    _, x = member.next_token(x[:, -1])
                tpot.append((time.perf_counter() - start) / max(new_tokens, 1))
                tpot_cpu.append((time.process_time() - cpu) / max(new_tokens, 1))
            pre_peak, dec_peak = max(pre_peak, pre.peak_bytes), max(dec_peak, dec.peak_bytes)
    result = {
        "members": int(meta["size"]), "rank": int(meta["rank"]),
        "window": window, "mode": "resident" if window is None else mode,
        "keep_page_cache": keep_page_cache, "core": core,
        "ttft_ms": 1e3 * min(ttft), "tpot_ms": 1e3 * min(tpot),
        # CPU seconds of the whole process (both threads): steadier than the wall clock
        # on a shared machine, and on a one-core device the latency when nothing waits
        # for the disk.
        "ttft_cpu_ms": 1e3 * min(ttft_cpu), "tpot_cpu_ms": 1e3 * min(tpot_cpu),
        "base_rss_bytes": base, "open_rss_bytes": opened,
        "prefill_peak_rss_bytes": pre_peak, "decode_peak_rss_bytes": dec_peak,
        "peak_rss_bytes": hwm_bytes(), "param_bytes": store.param_bytes(),
        "loads": getattr(store, "loads", 0), "peak_meter": pre.method,
    }
    store.close()
    return result


def _grid(members: Sequence[int], windows: Sequence[int | None], modes: Sequence[str],
          keep: Sequence[bool], repeats: int, rounds: int, new_tokens: int, core: int,
          root: Path) -> list[dict[str, Any]]:
    """Every configuration, ``rounds`` times interleaved (noise hits all alike); the best
    time and the largest peak of each."""
    configs = [(m, w, mode, k) for m in members for w in windows
               for mode in (modes if w is not None else ["mmap"])
               for k in (keep if w is not None else [True])]
    shards = {}
    for m in members:  # member 0's shard (the largest); reused when --dir already has it
        first = root / f"smollm2_{m}" / "member_0"
        shards[m] = first if (first / "meta.json").exists() else \
            write_smollm2_shards(root / f"smollm2_{m}", m)[0]
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {c: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            m, w, mode, k = c
            runs[c].append(measure_window(shards[m], w, mode=mode, keep_page_cache=k,
                                          new_tokens=new_tokens, repeats=repeats,
                                          core=core))
    out = []
    for results in runs.values():
        best = dict(results[0])
        for key in ("ttft_ms", "tpot_ms", "ttft_cpu_ms", "tpot_cpu_ms"):
            best[key] = min(r[key] for r in results)
            best[key + "_median"] = statistics.median(r[key] for r in results)
        for key in ("peak_rss_bytes", "prefill_peak_rss_bytes", "decode_peak_rss_bytes"):
            best[key] = max(r[key] for r in results)
        out.append(best)
    return out


def _table(rows: Sequence[dict[str, Any]]) -> str:
    mb = 1 << 20
    lines = [f"{'members':>7} {'window':>6} {'mode':>8} {'cache':>5} {'ttft ms':>8} "
             f"{'tpot ms':>8} {'cpu ttft':>8} {'cpu tpot':>8} {'peak MB':>8} {'prefill':>8} "
             f"{'decode':>8} {'base MB':>8}"]
    for r in rows:
        lines.append(f"{r['members']:>7} {r['window'] or '-':>6} {r['mode']:>8} "
                     f"{'keep' if r['keep_page_cache'] else 'drop':>5} {r['ttft_ms']:>8.1f} "
                     f"{r['tpot_ms']:>8.2f} {r['ttft_cpu_ms']:>8.1f} {r['tpot_cpu_ms']:>8.2f} "
                     f"{r['peak_rss_bytes'] / mb:>8.0f} "
                     f"{r['prefill_peak_rss_bytes'] / mb:>8.0f} "
                     f"{r['decode_peak_rss_bytes'] / mb:>8.0f} "
                     f"{r['base_rss_bytes'] / mb:>8.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgeswarm.bench.tp_window",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("member", help="one measurement in this process (JSON line)")
    one.add_argument("shard_dir", type=Path)
    grid = sub.add_parser("grid", help="a grid of fresh-process measurements")
    grid.add_argument("--members", type=int, nargs="+", default=[1, 2])
    grid.add_argument("--windows", nargs="+", default=["none", "1", "2", "4"])
    grid.add_argument("--modes", nargs="+", default=["mmap", "read"])
    grid.add_argument("--page-cache", nargs="+", choices=["keep", "drop"], default=["keep"])
    grid.add_argument("--rounds", type=int, default=2)
    grid.add_argument("--json", action="store_true")
    grid.add_argument("--dir", type=Path, default=None,
                      help="where to write the shards (default: a temporary directory)")
    for p in (one, grid):
        p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
        p.add_argument("--repeats", type=int, default=2)
        p.add_argument("--core", type=int, default=None)
    one.add_argument("--window", default="none")
    one.add_argument("--mode", default="mmap")
    one.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    one.add_argument("--drop-page-cache", action="store_true")
    args = parser.parse_args(argv)
    core = args.core if args.core is not None else (os.cpu_count() or 1) - 1
    if args.command == "member":
        window = None if args.window == "none" else int(args.window)
        print(json.dumps(_member(args.shard_dir, window, args.mode, not args.drop_page_cache,
                                 args.prompt_tokens, args.new_tokens, args.repeats, core)))
        return
    windows = [None if w == "none" else int(w) for w in args.windows]
    keep = [p == "keep" for p in args.page_cache]
    with tempfile.TemporaryDirectory(prefix="edgeswarm-window-") as tmp:
        rows = _grid(args.members, windows, args.modes, keep, args.repeats, args.rounds,
                     args.new_tokens, core, args.dir or Path(tmp))
    print(json.dumps({"runs": rows}, indent=1) if args.json else _table(rows))


if __name__ == "__main__":
    main()
