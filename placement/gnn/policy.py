"""The registered ``gnn`` policy: the shipped checkpoint driving the move-by-move search."""

from __future__ import annotations

from pathlib import Path

from edgeswarm.placement.gnn.checkpoint import DEFAULT_DIR, load
from edgeswarm.placement.gnn.improve import improve
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.problem import Problem


def solve(p: Problem, opts: Options, checkpoint: Path | str = DEFAULT_DIR) -> Solution:
    """Improve ``opts.start`` (else HEFT's plan) within ``opts.budget_for(p)`` simulator
    calls, greedily by the network's scores; deterministic, never worse than the start.

    Raises :class:`~edgeswarm.placement.errors.ModelFileError` when the checkpoint is
    missing or corrupt."""
    model = load(checkpoint)
    return improve(p, opts, model.net, model.search).solution
