"""Where trained zoo models and generated data sets are cached."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EDGESWARM_CACHE``, else ``$XDG_CACHE_HOME/edgeswarm``, else ``~/.cache/edgeswarm``."""
    explicit = os.environ.get("EDGESWARM_CACHE")
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "edgeswarm"
    path.mkdir(parents=True, exist_ok=True)
    return path
