"""Work an agent does once it is online, on one thread at a lower CPU priority.

After it announces itself an agent measures its int8 throughput and imports what a deploy
needs (torch's gloo, ONNX Runtime): ~1.2 s of CPU here, more than everything before the
announcement. Nothing waits for it yet, but on a testbed N agents start together on a
few cores, and the first ones' warm-up would slow the others' start (real devices, each
with its own CPU, do not slow each other down). So the steps run on a thread whose nice
value is raised (Linux, where nice is per thread): on a busy core they get what the
others leave; on an idle one, all of it.

Its own thread, because threads inherit their creator's priority, and a deploy's must not.
:meth:`WarmUp.stop` skips the steps not begun and waits for the one under way: a process
that exits while a thread is inside torch's import can abort ("terminate called without
an active exception").
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger("edgeswarm.agent")


class WarmUp:
    """``steps`` run in order on a thread ``nice`` steps nicer than its starter; ``start()``
    once (a no-op after ``stop()``), ``wait()``, ``stop()``."""

    def __init__(self, steps: Sequence[Callable[[], object]], nice: int = 10,
                 name: str = "edgeswarm-warm-up") -> None:
        self.steps = list(steps)
        self.nice = nice
        self.reniced = False         # the thread's nice value was raised
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._done = threading.Event()   # the steps ended, or never will run
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._tid: int | None = None
        self._base: int | None = None    # the starter's nice value

    def start(self) -> WarmUp:
        with self._lock:
            if not self._started and not self._stopped.is_set():
                self._started = True
                self._base = thread_nice()
                self._thread.start()
        return self

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the steps to end (or for a warm-up stopped before it started); True if
        it is over."""
        return self._done.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Skip the steps not begun, put the thread's priority back where the system allows
        it (so the step under way ends sooner), and wait up to ``timeout_s`` for it."""
        with self._lock:
            self._stopped.set()
            started, tid, base = self._started, self._tid, self._base
        if not started:
            self._done.set()
            return True
        if tid is not None and base is not None and self.reniced:
            set_thread_nice(base, tid)
        return self.wait(timeout_s)

    def _run(self) -> None:
        with self._lock:
            self._tid = threading.get_native_id()
            self.reniced = set_thread_nice(min(19, thread_nice() + self.nice))
        try:
            for step in self.steps:
                if self._stopped.is_set():
                    return
                try:
                    step()
                except Exception:  # a step reports its own failures; this is a bug
                    log.exception("warm-up step %r failed", getattr(step, "__name__", step))
        finally:
            self._done.set()


def thread_nice(tid: int | None = None) -> int:
    """The nice value of thread ``tid`` (the calling thread by default); 0 where threads
    have none of their own."""
    if not sys.platform.startswith("linux"):
        return 0
    return os.getpriority(os.PRIO_PROCESS, tid or threading.get_native_id())


def set_thread_nice(value: int, tid: int | None = None) -> bool:
    """Set thread ``tid``'s nice value (the calling thread by default); False where the
    system refuses (lowering it needs privileges) or threads have no nice value of their
    own (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, tid or threading.get_native_id(), value)
    except OSError as exc:
        log.debug("could not set a thread's nice value to %d: %s", value, exc)
        return False
    return True
