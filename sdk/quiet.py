"""Loggers silenced below ERROR for a block, where what they would warn of is expected
(a benchmark kills a device on purpose) or shown another way (the testbed's live table)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: What warns when a device is lost or a deployment re-plans.
CHURN_LOGGERS = ("edgeswarm.agent.coordinator", "edgeswarm.sdk", "edgeswarm.agent.rank0")


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers (default: :data:`CHURN_LOGGERS`) to ERROR for the block."""
    loggers = [logging.getLogger(n) for n in (names or CHURN_LOGGERS)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
