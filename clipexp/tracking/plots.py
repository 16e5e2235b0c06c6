"""Figures logged with every run: training curves, a similarity heatmap, the zero-shot confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history: Dict[str, List[tuple]], path: Path) -> Path:
    """One panel per series in ``history`` ({"train/loss": [(step, value), ...], ...})."""
    names = [n for n in ("train/loss", "val/loss", "train/lr", "train/temperature") if history.get(n)]
    names += [n for n in sorted(history) if n.startswith("val/") and n.endswith("R1") and history[n]]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*history[name])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def similarity_heatmap(similarity, captions: Sequence[str], path: Path, title: str = "validation batch: image x text cosine similarity") -> Path:
    sim = similarity.detach().float().cpu().numpy()
    n = sim.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    im = ax.imshow(sim, cmap="viridis")
    ax.set_xlabel("text")
    ax.set_ylabel("image")
    ax.set_xticks(range(n))
    ax.set_xticklabels([c[:28] for c in captions], rotation=90, fontsize=6)
    ax.set_yticks(range(n))
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix(confusion, class_names: Sequence[str], path: Path, title: str = "zero-shot confusion (test)") -> Path:
    cm = confusion.cpu().numpy()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * k, 2.0 + 0.8 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(k))
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticks(range(k))
    ax.set_yticklabels(class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def wise_ft_curve(alphas: Sequence[float], target: Sequence[float], retention: Sequence[float] | None, path: Path,
                  target_name: str = "val", retention_name: str = "retention", metric: str = "zeroshot_balanced_acc") -> Path:
    """WiSE-FT: target accuracy against retention accuracy, one point per alpha (0 = the start model,
    1 = the fine-tuned one); without a retention set, target accuracy against alpha."""
    fig, ax = plt.subplots(figsize=(4.8, 4))
    if retention is not None:
        ax.plot(retention, target, marker="o")
        for a, x, y in zip(alphas, retention, target):
            ax.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{retention_name} {metric}")
    else:
        ax.plot(alphas, target, marker="o")
        ax.set_xlabel("alpha (0 = start model, 1 = fine-tuned)")
    ax.set_ylabel(f"{target_name} {metric}")
    ax.set_title("WiSE-FT weight interpolation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
