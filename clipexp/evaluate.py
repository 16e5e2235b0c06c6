"""Retrieval and zero-shot metrics, group-aware and computed in chunks.

Retrieval: for each image (query) the texts are ranked by similarity; the rank of the best-ranked
*correct* text counts, where correct means any text of the same caption group. Duplicate captions
are therefore not errors (a plain CLIP evaluation would count them as misses). Text->image likewise.
Queries are processed ``chunk_size`` at a time, so a 50k x 50k evaluation never materialises the full
similarity matrix.

Zero-shot: each class's text embedding is the normalised mean of its prompt templates' embeddings;
an image is assigned the most similar class. Top-1 and balanced (mean per-class recall) accuracy.

:class:`Evaluator` runs a model over a split for the trainer: embeddings and loss in batches (sharded
across ranks under torchrun, gathered in order, so the numbers are those of one process), then the
metrics above.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clipexp.data.dataloader import build_loader
from clipexp.models.clip import image_features, text_features

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


LOWER_IS_BETTER = ("loss", "median_rank", "mean_rank")  # metric names ending so: trainer.monitor_mode=min


def split_metric_names(zero_shot: bool = True) -> List[str]:
    """The names :meth:`Evaluator.metrics` logs under ``<split>/``: the loss, then what
    :func:`evaluate_retrieval` and (with labels) :func:`zero_shot_metrics` return, found by running them on two pairs."""
    two = torch.eye(2)
    names = ["loss", *evaluate_retrieval(two, two)]
    if zero_shot:
        names += [k for k in zero_shot_metrics(two, torch.tensor([0, 1]), two) if k != "confusion"]
    return names


def class_text_embeddings(encode_text, class_names: List[str], templates: List[str]) -> Tensor:
    """Normalised mean of each class's prompt embeddings. ``encode_text(list[str]) -> [n, D]`` normalised."""
    prompts = [t.format(c) for c in class_names for t in templates]
    embeds = encode_text(prompts).float().view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeds, dim=-1)


class Evaluator:
    """The metrics of a model on a split: ``metrics(split, dataset)``.

    ``prepare``: a loader batch -> the towers' inputs on the device (the trainer's ``DeviceBatches``);
    ``dist``: the :class:`~clipexp.training.distributed.DistContext` (a single process is a context of one).
    """

    def __init__(self, model, loss_fn, processor, *, prepare: Callable, collate: Callable, autocast: Callable, dist,
                 device: torch.device, batch_size: int, max_length: int, class_names: Sequence[str], templates: Sequence[str]):
        self.model, self.loss_fn, self.processor = model, loss_fn, processor
        self.prepare, self.collate, self.autocast, self.dist, self.device = prepare, collate, autocast, dist, device
        self.batch_size, self.max_length = batch_size, max_length
        self.class_names, self.templates = list(class_names or []), list(templates)

    @torch.no_grad()
    def embed(self, dataset, images_only: bool = False) -> Optional[Dict[str, Any]]:
        """Embeddings of every pair in ``dataset`` plus its groups and labels, and the mean loss
        (``images_only``: the image embeddings, groups and labels alone; no text tower, no loss).

        Several processes: the batches are dealt round-robin to the ranks and rank 0 gathers them back
        in order, so every batch, its loss and the result are those of one process; the other ranks
        return None.
        """
        self.model.eval()
        n, size = len(dataset), self.batch_size
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        mine = self.dist.shard(len(batches))
        loader = build_loader(dataset, batch_sampler=[batches[i] for i in mine], collate=self.collate)
        parts = []
        for index, batch in zip(mine, loader):
            b = self.prepare(batch)
            with self.autocast():
                img = image_features(self.model, b["pixel_values"])
                if images_only:
                    parts.append((index, (img.float().cpu(), batch["group_ids"], batch["labels"])))
                    continue
                txt = text_features(self.model, b["input_ids"], b["attention_mask"], text_index=b["text_index"])
            out = self.loss_fn(img, txt, group_ids=b["group_ids"], labels=b["labels"], logit_scale=self.model.logit_scale)
            parts.append((index, (img.float().cpu(), txt.float().cpu(), batch["group_ids"], batch["labels"], float(out["loss"]), img.shape[0])))
        ordered = self.dist.gather_in_order(parts)
        if ordered is None:
            return None
        if images_only:
            imgs, groups, labels = zip(*ordered)
            return {"image": torch.cat(imgs), "groups": torch.cat(groups), "labels": torch.cat(labels)}
        imgs, txts, groups, labels, losses, weights = zip(*ordered)
        return {
            "image": torch.cat(imgs), "text": torch.cat(txts), "groups": torch.cat(groups), "labels": torch.cat(labels),
            "loss": float(np.average(losses, weights=weights)),
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> Tensor:
        tok = self.processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        with self.autocast():
            return text_features(self.model, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).float().cpu()

    def metrics(self, split: str, dataset, class_names: Optional[Sequence[str]] = None,
                templates: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{"metrics": {"<split>/<name>": value}, "confusion": ..., "embeddings": ...}``. Several
        processes: every rank embeds its share, rank 0 computes the metrics and sends them to the others
        (``embeddings`` is None there), so all ranks decide alike. ``class_names`` / ``templates``: the
        zero-shot classes and prompts of another dataset than the run's (an ``eval_data`` set)."""
        class_names = self.class_names if class_names is None else list(class_names)
        templates = self.templates if templates is None else list(templates)
        e = self.embed(dataset)
        result = None
        if e is not None:
            metrics: Dict[str, Any] = {"loss": e["loss"], **evaluate_retrieval(e["image"], e["text"], e["groups"])}
            confusion = None
            if class_names and (e["labels"] >= 0).any():
                class_embeds = class_text_embeddings(self.encode_prompts, class_names, templates)
                e["class_text"] = class_embeds  # the class prompts' embeddings: the similarity heatmap's columns
                zs = zero_shot_metrics(e["image"], e["labels"], class_embeds)
                confusion = zs.pop("confusion")
                metrics.update(zs)
            result = {"metrics": {f"{split}/{k}": v for k, v in metrics.items()}, "confusion": confusion}
        return {**self.dist.broadcast(result), "embeddings": e}
