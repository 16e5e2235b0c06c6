"""Contrastive loss with one documented, domain-motivated adjustment per domain."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from clipexp.names import DOMAINS  # one list of allowed names, shared with config validation

from .contrastive import ContrastiveLossBase
from .targets import (
    class_balanced_weights,
    contrastive_cross_entropy,
    log_or_neg_inf,
    soft_cross_entropy,
    target_distribution,
)

Tensor = torch.Tensor

#: label smoothing per unit of ``domain_weight`` for the medical domain, and its ceiling (< 1)
MEDICAL_SMOOTHING_PER_WEIGHT = 0.1
MAX_LABEL_SMOOTHING = 0.99


class DomainSpecificLoss(ContrastiveLossBase):
    """Symmetric (multi-positive) InfoNCE plus one adjustment chosen by ``domain``.

    Same-group pairs are positives in every domain (false-negative masking via ``group_ids``).

    * ``general``: no adjustment -- exactly :class:`CLIPContrastiveLoss`.
    * ``medical``: the targets are label-smoothed with ``eps = min(0.1 * domain_weight, 0.99)``,
      ``t = (1 - eps) * positives / |positives| + eps / B``, because report text is noisy and
      near-duplicate findings are common, so a one-hot target overstates how unique a pairing is.
      (Without groups this is ``F.cross_entropy(logits, arange, label_smoothing=eps)``.)
    * ``industrial``: each row's loss is weighted by ``(1 / batch frequency of its label) **
      domain_weight``, normalised to mean 1, so rare defect classes count as much as the nominal class;
      labels come from ``labels`` (else ``group_ids``; with neither, or balanced labels, the loss equals
      the contrastive loss). Both directions use the label of the row's pair.
    * ``scientific``: decoupled contrastive learning (Yeh et al. 2022): the positives are removed from
      the softmax denominator with strength ``lam = min(domain_weight, 1)``,
      ``loss_i = log(sum_{j neg} e^{l_ij} + (1 - lam) * sum_{j pos} e^{l_ij}) - sum_j t_ij l_ij``,
      because few-thousand-pair scientific sets train at small batches, where the positive-negative
      coupling of InfoNCE shrinks the gradient (``lam=0`` is InfoNCE, ``lam=1`` full DCL; DCL losses
      can be negative). A row with no negative at all (whole batch one group) contributes 0 when fully
      decoupled (``lam = 1``), since it has nothing to contrast.
    """

    name = "domain_specific"

    def __init__(self, domain: str = "general", temperature: float = 0.07, domain_weight: float = 1.0, learnable_temp: bool = False,
                 multi_positive: bool = True, use_model_logit_scale: bool = False):
        super().__init__(temperature, learnable_temp, multi_positive, use_model_logit_scale)
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {', '.join(DOMAINS)}; got {domain!r}")
        if not float(domain_weight) >= 0.0:
            raise ValueError(f"domain_weight must be >= 0; got {domain_weight!r}")
        self.domain = domain
        self.domain_weight = float(domain_weight)

    @property
    def label_smoothing(self) -> float:
        """Medical label-smoothing strength ``min(0.1 * domain_weight, 0.99)`` (0 for other domains)."""
        if self.domain != "medical":
            return 0.0
        return min(MEDICAL_SMOOTHING_PER_WEIGHT * self.domain_weight, MAX_LABEL_SMOOTHING)

    @property
    def decoupling(self) -> float:
        """Scientific DCL strength ``min(domain_weight, 1)`` (0 for other domains)."""
        return min(self.domain_weight, 1.0) if self.domain == "scientific" else 0.0

    def sample_weights(self, sample_labels: Optional[Tensor]) -> Optional[Tensor]:
        """Industrial class-balanced weights (mean 1), or None when they would all be 1."""
        if self.domain != "industrial" or sample_labels is None:
            return None
        _, counts = torch.unique(sample_labels, return_counts=True)
        if bool((counts == counts[0]).all()) or self.domain_weight == 0.0:
            return None
        return class_balanced_weights(sample_labels, self.domain_weight)

    def _direction_loss(self, logits: Tensor, target_mask: Optional[Tensor], known_positives: Tensor,
                        sample_labels: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        if self.domain == "medical":
            return contrastive_cross_entropy(logits, target_mask, label_smoothing=self.label_smoothing), {}
        if self.domain == "industrial":
            weights = self.sample_weights(sample_labels)
            return contrastive_cross_entropy(logits, target_mask, sample_weights=weights), {}
        if self.domain == "scientific":
            return self._decoupled(logits, target_mask), {}
        return contrastive_cross_entropy(logits, target_mask), {}

    def _decoupled(self, logits: Tensor, target_mask: Optional[Tensor]) -> Tensor:
        batch = logits.shape[0]
        positives = target_mask if target_mask is not None else torch.eye(batch, dtype=torch.bool, device=logits.device)
        lam = self.decoupling
        has_negative = (~positives).any(dim=1)
        if lam < 1.0:
            has_negative = torch.ones_like(has_negative)
        # rows without negatives keep offset 0 (finite) and are zeroed below
        remove = positives & has_negative.unsqueeze(1)
        offsets = torch.zeros_like(logits).masked_fill(remove, log_or_neg_inf(1.0 - lam))
        per_row = soft_cross_entropy(logits, target_distribution(positives), offsets)
        per_row = torch.where(has_negative, per_row, torch.zeros_like(per_row))
        return per_row.mean()
