"""How much memory a process holds: current RSS, its peak, and the peak over one phase.

What the figures mean (Linux): the *resident set* is every page mapped into the process
and present in RAM — anonymous memory (tensors, the heap, thread stacks), file-backed
pages it has mapped (shared libraries, ``mmap``-ed weights) and shared memory. It does not
count the kernel's page cache for files the process only ``read()`` (or mapped and then
released with ``MADV_DONTNEED``): that cache is reclaimable, and the kernel drops it under
pressure, at the price of reading the disk again. The *peak* (``VmHWM`` in
``/proc/self/status``) is the high-water mark of the resident set since the process
started, or since :func:`reset_peak`. (``ru_maxrss`` is not the same figure: it carries
over ``exec``, so a spawned child reports at least its parent's RSS at the fork.)

A process's peak includes its start-up (the interpreter and torch alone are ~300 MB here)
and whatever it built before its steady state, so comparisons of a phase — "the peak while
decoding with a window of 2 layers" — need :class:`PeakMeter`, which resets the mark when
the kernel allows (writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0) and samples
the current RSS from a thread otherwise (which can miss spikes shorter than its period).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from types import TracebackType

from edgeswarm.placement.errors import RuntimeNotAvailable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def peak_rss_bytes() -> int:
    """``ru_maxrss``: the peak resident set as getrusage reports it. On Linux it survives
    ``exec`` (a spawned child starts at its parent's RSS at the fork) and
    :func:`reset_peak` leaves it alone: prefer :func:`hwm_bytes` for a process's own peak
    or :class:`PeakMeter` for a phase's."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes


def current_rss_bytes() -> int:
    """The resident set right now (``/proc/self/statm``: resident pages x page size)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise RuntimeNotAvailable("the current RSS needs /proc (Linux, Android) or the "
                                  "psutil package: pip install psutil") from None
    return int(psutil.Process().memory_info().rss)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def hwm_bytes() -> int:
    """The resident set's high-water mark (``VmHWM``): since start or the last reset."""
    hwm = _status_kb("VmHWM")
    return peak_rss_bytes() if hwm is None else hwm


def reset_peak() -> bool:
    """Set the high-water mark to the current RSS (``/proc/self/clear_refs``). Returns False
    where the kernel does not allow it (then measure a phase by sampling)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64 * _PAGE


class PeakMeter:
    """The peak RSS over a ``with`` block, and the RSS it started from::

        with PeakMeter() as meter:
            run_the_phase()
        meter.peak_bytes, meter.start_bytes

    By the kernel's high-water mark when it can be reset (exact), else by sampling the
    current RSS every ``period_s`` from a thread (a lower bound).
    """

    def __init__(self, period_s: float = 0.001) -> None:
        self.period_s = period_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMeter:
        self.start_bytes = current_rss_bytes()
        if reset_peak():
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self.peak_bytes = self.start_bytes
            self._thread = threading.Thread(target=self._sample, name="edgeswarm-peak-rss",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is None:
            self.peak_bytes = max(hwm_bytes(), current_rss_bytes())
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(self.period_s)
