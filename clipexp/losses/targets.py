"""Shared maths of the contrastive family: positive masks, target distributions, logits, cross-entropy.

Every loss in :mod:`clipexp.losses` is built from these few functions, so the definition of
"a positive", "the targets" and "the cross-entropy" lives in exactly one place.

Conventions
-----------
* A *positive mask* is a bool ``[B, B]`` tensor, ``mask[i, j]`` true when pair (i, j) is a positive.
  ``None`` stands for the identity (plain CLIP: only the diagonal is positive); the cross-entropy
  then takes the textbook ``F.cross_entropy(logits, arange(B))`` path so that it is bit-for-bit the
  standard CLIP loss.
* Logits are always float32, whatever the embeddings' dtype, and are computed with autocast off.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def check_embeddings(image_embeds: Tensor, text_embeds: Tensor, *extra: Optional[Tensor]) -> int:
    """Validate ``[B, D]`` image/text embeddings (and optional ``[B]`` id tensors); return ``B``."""
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(
            f"embeddings must be [batch, dim]; got image {tuple(image_embeds.shape)} "
            f"and text {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape; got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    batch = image_embeds.shape[0]
    if batch == 0:
        raise ValueError("cannot compute a contrastive loss on an empty batch")
    for ids in extra:
        if ids is not None and (ids.dim() != 1 or ids.shape[0] != batch):
            raise ValueError(f"group_ids/labels must be a [batch] tensor of {batch} ids; got {tuple(ids.shape)}")
    return batch


def compute_logits(image_embeds: Tensor, text_embeds: Tensor, scale: Tensor | float) -> Tensor:
    """Scaled image->text similarity ``scale * image @ text.T`` in float32 (autocast disabled)."""
    with torch.autocast(device_type=image_embeds.device.type, enabled=False):
        return image_embeds.float() @ text_embeds.float().t() * scale


def same_group_mask(group_ids: Optional[Tensor], batch_size: int, device: torch.device) -> Tensor:
    """Bool ``[B, B]``: true where two samples share a group id (the identity when ``group_ids`` is None).

    These are the *known positives*: pairs a loss must never treat as a (hard) negative.
    """
    if group_ids is None:
        return torch.eye(batch_size, dtype=torch.bool, device=device)
    group_ids = group_ids.to(device)
    return group_ids.unsqueeze(0) == group_ids.unsqueeze(1)


def positive_mask(
    group_ids: Optional[Tensor], batch_size: int, device: torch.device, multi_positive: bool = True
) -> Optional[Tensor]:
    """Target positives: the same-group mask when ``multi_positive`` and ids are given, else ``None``.

    ``None`` means "diagonal only" and selects the exact textbook CLIP cross-entropy path.
    """
    if not multi_positive or group_ids is None:
        return None
    return same_group_mask(group_ids, batch_size, device)


def target_distribution(pos_mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Soft targets: the row-normalised positive mask, optionally label-smoothed.

    ``t[i, j] = (1 - eps) * mask[i, j] / sum_k mask[i, k] + eps / B`` -- for a diagonal mask this is
    exactly the target ``F.cross_entropy(..., label_smoothing=eps)`` uses.
    """
    mask = pos_mask.float()
    targets = mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    if label_smoothing > 0.0:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / mask.shape[1]
    return targets


def soft_cross_entropy(logits: Tensor, targets: Tensor, denominator_offsets: Optional[Tensor] = None) -> Tensor:
    """Per-row cross-entropy with soft targets: ``logsumexp_j(l_ij + o_ij) - sum_j t_ij * l_ij``.

    ``denominator_offsets`` (``o``) change only the softmax denominator: ``o = log(w)`` counts entry
    (i, j) ``w`` times (hard-negative up-weighting), ``o = -inf`` removes it (decoupled contrastive
    learning). With ``o = 0`` and targets summing to 1 this is ``-(t * log_softmax(l)).sum(1)``.
    """
    denominator = logits if denominator_offsets is None else logits + denominator_offsets
    return torch.logsumexp(denominator, dim=1) - (targets * logits).sum(dim=1)


def contrastive_cross_entropy(
    logits: Tensor,
    pos_mask: Optional[Tensor] = None,
    *,
    label_smoothing: float = 0.0,
    sample_weights: Optional[Tensor] = None,
    denominator_offsets: Optional[Tensor] = None,
) -> Tensor:
    """One direction of the (multi-positive) InfoNCE loss, reduced to a scalar.

    * ``pos_mask=None`` with no weights/offsets: ``F.cross_entropy(logits, arange(B))`` exactly.
    * otherwise: ``soft_cross_entropy`` against ``target_distribution(pos_mask, label_smoothing)``,
      averaged over rows with ``sample_weights`` (weighted mean ``sum w_i l_i / sum w_i``).
    """
    batch = logits.shape[0]
    if pos_mask is None and sample_weights is None and denominator_offsets is None:
        labels = torch.arange(batch, device=logits.device)
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if pos_mask is None:
        pos_mask = torch.eye(batch, dtype=torch.bool, device=logits.device)
    targets = target_distribution(pos_mask, label_smoothing)
    per_row = soft_cross_entropy(logits, targets, denominator_offsets)
    return weighted_mean(per_row, sample_weights)


def weighted_mean(values: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """``mean(values)`` or ``sum(w * values) / sum(w)``."""
    if weights is None:
        return values.mean()
    weights = weights.to(values)
    return (weights * values).sum() / weights.sum()


def class_balanced_weights(labels: Tensor, power: float = 1.0) -> Tensor:
    """Per-sample weight ``(1 / freq(label_i))**power`` over the batch, normalised to mean 1.

    Balanced labels give all ones; with ``power=1`` every class gets the same total weight.
    """
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    frequency = counts.float()[inverse] / labels.shape[0]
    weights = frequency.pow(-float(power))
    return weights / weights.mean()


def log_or_neg_inf(value: float) -> float:
    """``log(value)``, with ``log(0) = -inf`` (used for denominator offsets)."""
    return math.log(value) if value > 0.0 else float("-inf")
