"""What a run leaves to look at: its metrics.jsonl read back, and curves.png (loss,
metric and learning rate per epoch, of one run or several on one figure)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError


CURVES = "curves.png"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a run directory, or no epoch finished yet)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_epoch(run_dir: Path) -> int | None:
    summary = Path(run_dir) / "summary.json"
    try:
        return json.loads(summary.read_text()).get("best", {}).get("epoch") if summary.is_file() else None
    except ValueError:
        return None


def plot_runs(run_dirs: list[Path], path: Path) -> Path:
    """Loss (train and validation), the task's headline metric and the lr against
    epochs, one colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    metric = "val_r2" if any("val_r2" in r for _, records in runs for r in records) else "val_accuracy"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (run_dir, records), colour in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        epochs = [r["epoch"] for r in records]
        name = run_dir.resolve().name
        axes[0].plot(epochs, [r["train_loss"] for r in records], "-", color=colour, label=f"{name} train")
        axes[0].plot(epochs, [r["val_loss"] for r in records], "--", color=colour, label=f"{name} validation")
        axes[1].plot(epochs, [r.get(metric, float("nan")) for r in records], "-o", color=colour, markersize=3,
                     label=name)
        axes[2].plot(epochs, [r["lr"] for r in records], "-", color=colour, label=name)
        best = best_epoch(run_dir)
        if best:
            for ax in axes[:2]:
                ax.axvline(best, color=colour, linestyle=":", linewidth=1)
    titles = ("loss", metric.replace("val_", "validation ") + " (dotted: the best epoch)",
              "learning rate (last step of each epoch)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    if all(r["lr"] > 0 for _, records in runs for r in records):
        axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
