"""Helpers several test folders share (on the path through pytest's ``pythonpath``)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeswarm.device_agent.manifest import Artifact


def together(*fns: Callable[[], Any], deadline_s: float = 30.0) -> list[Any]:
    """Run each function in its own thread (the ranks of a group, say); their results, or
    the first exception raised. A thread still blocked after ``deadline_s`` fails the test."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    end = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a rank is still blocked after the deadline"
    if errors:
        raise errors[0]
    return results


def artifact(path: Path) -> Artifact:
    """A local file as a manifest artifact (a file:// URL with its sha256)."""
    data = path.read_bytes()
    return Artifact(name=path.name, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                    url=path.resolve().as_uri())
