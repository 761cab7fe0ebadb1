"""The training curve plot: episode rewards and the held-out evaluation over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def plot(path: Path, episode_ratio: Sequence[float], episode_reward: Sequence[float],
         eval_points: Sequence[tuple[int, float, float]]) -> Path:
    """Write ``path`` (PNG): per-episode makespan ÷ HEFT and reward (raw and moving
    average), and the validation set's mean makespan ÷ HEFT and ÷ the untrained policy
    at each evaluation (episode, ratio to HEFT, ratio to untrained)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    x = np.arange(1, len(episode_ratio) + 1)
    for ax, values, label in ((top, episode_ratio, "makespan ÷ HEFT"),
                              (middle, episode_reward, "reward")):
        if len(values):
            ax.plot(x, values, ".", ms=2, alpha=0.25, color="tab:blue")
            ax.plot(x, _smooth(values), color="tab:blue",
                    label=f"training episode: {label} (moving mean of 50)")
        ax.grid(alpha=0.3)
        if len(values):
            ax.legend(fontsize=8)
    top.set_ylabel("makespan ÷ HEFT")
    middle.set_ylabel("reward: makespan cut\n÷ best start plan")
    if eval_points:
        ep, heft, untrained = zip(*eval_points, strict=True)
        bottom.plot(ep, heft, "o-", color="tab:red", label="makespan ÷ HEFT (left)")
        right = bottom.twinx()
        right.plot(ep, untrained, "s--", color="tab:green",
                   label="makespan ÷ untrained network's (right)")
        right.set_ylabel("÷ untrained", color="tab:green")
        lines = bottom.get_lines() + right.get_lines()
        bottom.legend(lines, [str(ln.get_label()) for ln in lines], fontsize=8)
    bottom.set_ylabel("validation (greedy):\nmean makespan ÷ HEFT", color="tab:red")
    bottom.set_xlabel("episode")
    bottom.grid(alpha=0.3)
    fig.suptitle("GiPH-style placement policy: REINFORCE training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], window: int = 50) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    w = max(1, min(window, len(v)))
    c = np.cumsum(np.concatenate([[0.0], v]))
    out = np.empty(len(v))
    for i in range(len(v)):
        lo = max(0, i + 1 - w)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out
