"""Figures logged with every run: training curves, a similarity heatmap, the zero-shot confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


#: the training-curve panels: (title, series); a panel with no logged series is left out
CURVE_PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("retrieval R@1 (val)", ("val/i2t_R1", "val/t2i_R1", "val/mean_R1")),
    ("zero-shot accuracy (val)", ("val/zeroshot_acc", "val/zeroshot_balanced_acc")),
    ("learning rate", ("train/lr",)),
    ("temperature", ("train/temperature",)),
)
CURVE_COLUMNS = 3
BEST_MARKER = "best step"  # the label of the best-step line in each panel (and of the point on the monitored curve)


def monitored(history: Dict[str, List[tuple]]) -> tuple:
    """``(monitor, best step)`` of a run's history: the trainer logs ``best/<monitor>`` each time it improves,
    so its last point is the best step. ``(None, None)`` without one."""
    names = [n[len("best/"):] for n in history if n.startswith("best/") and history[n]]
    if not names:
        return None, None
    return names[0], int(history["best/" + names[0]][-1][0])


def training_curves_figure(history: Dict[str, List[tuple]], monitor: Optional[str] = None, best_step: Optional[int] = None):
    """A grid of :data:`CURVE_COLUMNS` panels a row (1260 px wide at 100 dpi): the monitored metric first
    (its best step marked with a point and a dashed line, and its test value, when logged, as a cross), then
    :data:`CURVE_PANELS`. Every panel marks the best step. ``monitor`` / ``best_step`` default to :func:`monitored`."""
    found_monitor, found_step = monitored(history)
    monitor = monitor or found_monitor
    best_step = found_step if best_step is None else best_step
    panels = []
    if monitor and history.get(monitor):
        panels.append((f"{monitor} (monitored)", (monitor,)))
    panels += [(title, tuple(n for n in names if history.get(n) and n != monitor)) for title, names in CURVE_PANELS]
    panels = [(t, names) for t, names in panels if names]
    rows = max(1, -(-len(panels) // CURVE_COLUMNS))
    fig, axes = plt.subplots(rows, CURVE_COLUMNS, figsize=(4.2 * CURVE_COLUMNS, 3.4 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = zip(*history[name])
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=name)
        if best_step is not None:
            ax.axvline(best_step, color="tab:red", linestyle="--", linewidth=1, label=f"{BEST_MARKER} {best_step}")
        if monitor in names and best_step is not None:
            at = [v for s, v in history[monitor] if s == best_step]
            if at:
                ax.plot([best_step], [at[-1]], marker="o", markersize=9, color="tab:red", linestyle="none",
                        label=f"best {at[-1]:.4f}")
            test = history.get("test/" + monitor.split("/", 1)[-1])
            if test:
                ax.plot([test[-1][0]], [test[-1][1]], marker="X", markersize=9, color="black", linestyle="none",
                        label=f"test {test[-1][1]:.4f}")
        ax.set_title(title, fontsize=15)  # large: MLflow's artifact preview shows the picture at about 3/4 of its size
        ax.set_xlabel("optimizer step", fontsize=12)
        ax.tick_params(labelsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def training_curves(history: Dict[str, List[tuple]], path: Path, monitor: Optional[str] = None, best_step: Optional[int] = None) -> Path:
    """:func:`training_curves_figure` saved as a PNG (``history``: ``{"train/loss": [(step, value), ...], ...}``)."""
    return _save(training_curves_figure(history, monitor, best_step), path)


def _save(fig, path: Path, dpi: int = 100) -> Path:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def class_similarity(image, labels, class_text) -> tuple:
    """``(matrix, counts)``: ``matrix[i, j]`` the mean cosine similarity of the images of class ``i`` to the
    prompts of class ``j`` (their normalised mean embedding); ``counts[i]`` the images of class ``i``. Unlabelled
    images (label < 0) are left out; a class without images gets a row of NaN."""
    import numpy as np

    sim = (image.float() @ class_text.float().T).cpu().numpy()
    labels = labels.cpu().numpy()
    k = sim.shape[1]
    counts = np.array([(labels == i).sum() for i in range(k)])
    matrix = np.array([sim[labels == i].mean(axis=0) if counts[i] else np.full(k, np.nan) for i in range(k)])
    return matrix, counts


def distinct_caption_pairs(captions: Sequence[str], n: int = 12) -> List[int]:
    """The first pair of each distinct caption, up to ``n``: the rows and columns of a pair heatmap (repeated
    captions would give identical columns and no diagonal to read)."""
    seen, out = set(), []
    for i, caption in enumerate(captions):
        if caption not in seen:
            seen.add(caption)
            out.append(i)
            if len(out) == n:
                break
    return out


def _wrap(text: str, width: int = 28, lines: int = 3) -> str:
    import textwrap

    parts = textwrap.wrap(str(text), width) or [""]
    return "\n".join(parts[:lines]) + ("..." if len(parts) > lines else "")


def similarity_figure(matrix, rows: Sequence[str], cols: Sequence[str], title: str, xlabel: str, ylabel: str):
    """A heatmap with every cell's value written in it, wrapped tick labels and a colour bar."""
    import numpy as np

    n_rows, n_cols = matrix.shape
    fig, ax = plt.subplots(figsize=(2.8 + 1.1 * n_cols, 1.8 + 0.7 * n_rows))
    im = ax.imshow(matrix, cmap="viridis", aspect="auto")
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i, j in zip(*np.nonzero(np.isfinite(matrix))):  # dark text on viridis' light (high) end, light on its dark end
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9, color="black" if matrix[i, j] > middle else "white")
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([_wrap(c) for c in cols], rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([_wrap(r, 32, 2) for r in rows], fontsize=9)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.set_title(_wrap(title, 70, 2), fontsize=11)
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    fig.tight_layout()
    return fig


def similarity_heatmap_figure(embeddings: Dict, captions: Sequence[str], class_names: Sequence[str], split: str = "test"):
    """What a run's similarity heatmap shows, from an evaluation's ``embeddings`` (``image``, ``text``, ``labels``
    and, with zero-shot classes, ``class_text``: the class prompts' embeddings):

    * with classes: each class's images (rows) against each class's prompts (columns), the mean cosine
      similarity; a model that tells the classes apart has the largest value of each row on the diagonal;
    * without: pairs with distinct captions, image ``i`` (rows) against caption ``j`` (columns); the
      matching pairs are the diagonal.
    """
    labels = embeddings.get("labels")
    class_text = embeddings.get("class_text")
    if class_text is not None and class_names and labels is not None and (labels >= 0).any():
        matrix, counts = class_similarity(embeddings["image"], labels, class_text)
        return similarity_figure(matrix, [f"{c} (n={int(k)})" for c, k in zip(class_names, counts)], [f"'{c}' prompts" for c in class_names],
                                 f"{split} split: mean cosine similarity of each class's images to each class's prompts",
                                 "class prompts (mean embedding of the domain's templates)", "images of class")
    pick = distinct_caption_pairs([c if isinstance(c, str) else c[0] for c in captions])
    sim = (embeddings["image"][pick].float() @ embeddings["text"][pick].float().T).cpu().numpy()
    caps = [captions[i] if isinstance(captions[i], str) else captions[i][0] for i in pick]
    return similarity_figure(sim, [f"image {k + 1}" for k in range(len(pick))], caps,
                             f"{split} split: {len(pick)} pairs with distinct captions, image x caption cosine similarity (matches on the diagonal)",
                             "caption", "image (of the pair with the caption of the same number)")


def similarity_heatmap(embeddings: Dict, captions: Sequence[str], class_names: Sequence[str], path: Path, split: str = "test") -> Path:
    """:func:`similarity_heatmap_figure` saved as a PNG."""
    return _save(similarity_heatmap_figure(embeddings, captions, class_names, split), path, dpi=110)


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
    return _save(fig, path)


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
    return _save(fig, path)
