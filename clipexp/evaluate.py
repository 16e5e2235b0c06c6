"""Retrieval and zero-shot metrics, group-aware and computed in chunks.

Retrieval: for each image (query) the texts are ranked by similarity; the rank of the best-ranked
*correct* text counts, where correct means any text of the same caption group. Duplicate captions
are therefore not errors (a plain CLIP evaluation would count them as misses). Text->image likewise.
Queries are processed ``chunk_size`` at a time, so a 50k x 50k evaluation never materialises the full
similarity matrix.

Zero-shot: each class's text embedding is the normalised mean of its prompt templates' embeddings;
an image is assigned the most similar class. Top-1 and balanced (mean per-class recall) accuracy.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RECALL_KS = (1, 5, 10)


def _first_correct_ranks(queries: Tensor, gallery: Tensor, query_groups: Tensor, gallery_groups: Tensor, chunk_size: int) -> Tensor:
    """1-based rank of the highest-scoring gallery item that shares the query's group."""
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size]
        sims = q @ gallery.T  # [c, N]
        correct = query_groups[start:start + chunk_size, None] == gallery_groups[None, :]
        best_correct = sims.masked_fill(~correct, float("-inf")).max(dim=1).values  # [c]
        # rank = 1 + number of gallery items scoring strictly higher than the best correct one
        ranks.append(1 + (sims > best_correct[:, None]).sum(dim=1))
    return torch.cat(ranks)


def evaluate_retrieval(
    image_embeds: Tensor,
    text_embeds: Tensor,
    group_ids: Optional[Tensor] = None,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """Image->text and text->image Recall@k (logged as R1, R5, R10: MLflow metric names cannot contain "@") and median rank (pair i's image and text share group i).

    ``group_ids`` [N]: pairs in the same group are all correct answers for each other; ``None`` means
    every pair is its own group (the textbook evaluation).
    """
    n = image_embeds.shape[0]
    if group_ids is None:
        group_ids = torch.arange(n)
    img, txt = image_embeds.float(), text_embeds.float()
    groups = group_ids.to(img.device)
    out: Dict[str, float] = {}
    for name, q, g in (("i2t", img, txt), ("t2i", txt, img)):
        ranks = _first_correct_ranks(q, g, groups, groups, chunk_size).float()
        for k in ks:
            out[f"{name}_R{k}"] = int((ranks <= k).sum()) / n
        out[f"{name}_median_rank"] = float(ranks.median())
        out[f"{name}_mean_rank"] = float(ranks.sum()) / n
    out["mean_R1"] = (out["i2t_R1"] + out["t2i_R1"]) / 2
    return out


def zero_shot_classify(image_embeds: Tensor, class_embeds: Tensor, chunk_size: int = 4096) -> Tensor:
    """Predicted class index per image."""
    preds = [(image_embeds[s:s + chunk_size].float() @ class_embeds.float().T).argmax(dim=1) for s in range(0, image_embeds.shape[0], chunk_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def zero_shot_metrics(image_embeds: Tensor, labels: Tensor, class_embeds: Tensor) -> Dict[str, object]:
    """Top-1 and balanced accuracy and the confusion matrix (rows = true class, columns = predicted)."""
    keep = labels >= 0
    preds = zero_shot_classify(image_embeds[keep], class_embeds).cpu()
    true = labels[keep].cpu()
    k = class_embeds.shape[0]
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((true, preds), torch.ones_like(true), accumulate=True)
    support = confusion.sum(dim=1)
    per_class = confusion.diag().float() / support.clamp(min=1).float()
    present = support > 0
    return {
        "zeroshot_acc": int((preds == true).sum()) / true.numel() if true.numel() else float("nan"),
        "zeroshot_balanced_acc": float(per_class[present].mean()) if present.any() else float("nan"),
        "confusion": confusion,
    }


def class_text_embeddings(encode_text, class_names: List[str], templates: List[str]) -> Tensor:
    """Normalised mean of each class's prompt embeddings. ``encode_text(list[str]) -> [n, D]`` normalised."""
    prompts = [t.format(c) for c in class_names for t in templates]
    embeds = encode_text(prompts).float().view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeds, dim=-1)
