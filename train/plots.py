"""The run folder's plots: training loss (Stage II start marked) and val mIoU, as PNG files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_manifest.io import atomic_path


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Draw ``loss.png`` and ``miou.png`` into ``out`` from ``metrics.jsonl`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in metrics_path.read_text(encoding="utf-8").splitlines() if x]
    tr = [r for r in recs if r["type"] == "train"]
    ev = [r for r in recs if r["type"] == "eval"]
    if tr:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        its = np.array([r["iter"] for r in tr])
        loss = np.array([r["loss"] for r in tr])
        win = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
        ax.plot(its, loss, color="0.75", lw=0.8, label="loss")
        if win > 1:
            ax.plot(its[win - 1 :], smooth, color="C0", lw=1.5, label=f"mean of {win}")
        for r in tr:
            if r["stage"] == 2:
                ax.axvline(r["iter"], color="C3", ls="--", lw=1, label="Stage II starts")
                break
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        with atomic_path(out / "loss.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
    if ev:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["iter"] for r in ev], [100 * r["miou"] for r in ev], "o-", color="C2")
        ax.set_xlabel("iteration")
        ax.set_ylabel("val mIoU %")
        fig.tight_layout()
        with atomic_path(out / "miou.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
