"""Classification figures of a head's scores: accuracy, balanced accuracy, recall per class, and the metric
names they are logged under (MLflow allows letters, digits, ``_ - . / :`` and spaces in a name)."""

from __future__ import annotations

import re
from typing import Dict, List, Sequence

import torch
from torch import Tensor


def recall_per_class(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Recall of each class ``[C]`` (float64): correct / support; NaN for a class with no sample."""
    support = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    return torch.where(support > 0, hits / support.clamp(min=1), torch.full_like(support, float("nan")))


def balanced_accuracy(pred: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean recall over the classes present in ``labels`` (as ``clipexp.evaluate.zero_shot_metrics``)."""
    recall = recall_per_class(pred, labels, num_classes)
    present = ~torch.isnan(recall)
    return float(recall[present].mean()) if present.any() else float("nan")


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return float((pred == labels).double().mean()) if labels.numel() else float("nan")


def class_keys(class_names: Sequence[str]) -> List[str]:
    """One metric-name part per class: characters MLflow refuses and spaces become ``_``; a name that two
    classes would share gets its class index appended (``a_b_1``)."""
    keys = [re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name)) or "_" for name in class_names]
    seen: Dict[str, int] = {}
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
    return [f"{key}_{i}" if seen[key] > 1 else key for i, key in enumerate(keys)]
