"""Contrastive loss that up-weights hard negatives in the softmax denominator."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from clipexp.names import MINING_STRATEGIES  # one list of allowed names, shared with config validation

from .contrastive import ContrastiveLossBase
from .targets import contrastive_cross_entropy

Tensor = torch.Tensor


class HardNegativeMiningLoss(ContrastiveLossBase):
    """Symmetric InfoNCE where mined negatives count ``hard_negative_weight`` times in the denominator.

    Mining runs per row of each direction's logits (image->text rows, then text->image rows), on
    detached similarities, among the row's *true negatives* ``N_i`` = columns not in the same group
    (with ``group_ids``; otherwise all off-diagonal columns). A known positive is never mined, even with
    ``multi_positive=False`` (then same-group pairs stay negatives in the targets but are not
    up-weighted). ``n_i = |N_i|``, ``s_ii`` = the row's own pair's similarity, ``W = hard_negative_weight``.

    * ``"hard"``: the ``ceil(ratio * n_i)`` most similar negatives of ``N_i``.
    * ``"semi-hard"``: candidates ``C_i = {j in N_i : s_ij < s_ii}`` (negatives less similar than the
      positive); mined = the ``ceil(ratio * |C_i|)`` most similar of ``C_i``. A row with no candidate
      (every negative already beats the positive) mines nothing: it keeps its plain InfoNCE term, since
      up-weighting negatives that already dominate it is what semi-hard mining exists to avoid.
    * ``"weighted"``: every negative gets weight ``w_ij = 1 + (W - 1) * r_ij / max_k r_ik`` with
      importance ``r_ij = n_i * softmax_{N_i}(logits_i)_j`` (mean 1 over ``N_i``), i.e.
      ``w_ij = 1 + (W - 1) * exp(l_ij - max_{k in N_i} l_ik)``: the hardest negative counts ``W`` times,
      easy ones about once. ``hard_negative_ratio`` is not used; a negative counts as "mined" (for the
      statistics) when its importance is above average (``r_ij > 1``).

    Up-weighting: the mined entry's logit in the softmax *denominator* gets ``+ log(w)`` (``w = W`` for
    hard / semi-hard), so it counts ``w`` times; the numerator (targets) is unchanged:
    ``loss_i = logsumexp_j(l_ij + log w_ij) - sum_j t_ij l_ij``.

    Extra outputs: ``hard_negative_count`` (long, mined entries summed over both directions),
    ``true_negative_count`` (long, ``sum_i n_i`` over both directions) and
    ``hard_negative_ratio_actual`` = mined / true negatives (0 when there are none).
    """

    name = "hard_negative"

    def __init__(self, temperature: float = 0.07, hard_negative_ratio: float = 0.5, mining_strategy: str = "semi-hard",
                 hard_negative_weight: float = 2.0, learnable_temp: bool = False, multi_positive: bool = True,
                 use_model_logit_scale: bool = False):
        super().__init__(temperature, learnable_temp, multi_positive, use_model_logit_scale)
        if mining_strategy not in MINING_STRATEGIES:
            raise ValueError(
                f"mining_strategy must be one of {', '.join(MINING_STRATEGIES)}; got {mining_strategy!r}"
            )
        if not 0.0 <= float(hard_negative_ratio) <= 1.0:
            raise ValueError(f"hard_negative_ratio must be in [0, 1]; got {hard_negative_ratio!r}")
        if not float(hard_negative_weight) > 0.0:
            raise ValueError(f"hard_negative_weight must be > 0; got {hard_negative_weight!r}")
        self.mining_strategy = mining_strategy
        self.hard_negative_ratio = float(hard_negative_ratio)
        self.hard_negative_weight = float(hard_negative_weight)

    @torch.no_grad()
    def mine(self, logits: Tensor, known_positives: Tensor) -> Tuple[Tensor, Tensor]:
        """Mine one direction: returns ``(mined, log_weights)``, bool and float ``[B, B]``.

        ``log_weights`` is 0 everywhere except on up-weighted negatives (never on a known positive).
        """
        sims = logits.detach().float()
        negatives = ~known_positives
        if self.mining_strategy == "weighted":
            masked = sims.masked_fill(~negatives, float("-inf"))
            row_max = masked.amax(dim=1, keepdim=True)
            relative = torch.where(negatives, torch.exp(masked - row_max), torch.zeros_like(sims))
            weights = 1.0 + (self.hard_negative_weight - 1.0) * relative
            log_weights = torch.where(negatives, weights.log(), torch.zeros_like(sims))
            n_neg = negatives.sum(dim=1, keepdim=True).clamp_min(1)
            mean_relative = relative.sum(dim=1, keepdim=True) / n_neg
            mined = negatives & (relative > mean_relative)
            return mined, log_weights

        if self.mining_strategy == "semi-hard":
            candidates = negatives & (sims < sims.diagonal().unsqueeze(1))
        else:
            candidates = negatives
        n_candidates = candidates.sum(dim=1)
        # ceil(ratio * n) in float64 with a tolerance, so that e.g. 0.3 * 10 gives 3, not 4
        k = torch.ceil(n_candidates.double() * self.hard_negative_ratio - 1e-9).clamp_min(0).long()
        masked = sims.masked_fill(~candidates, float("-inf"))
        order = masked.argsort(dim=1, descending=True, stable=True)
        ranks = order.argsort(dim=1)
        mined = candidates & (ranks < k.unsqueeze(1))
        log_weights = mined.float() * math.log(self.hard_negative_weight)
        return mined, log_weights

    def _direction_loss(self, logits: Tensor, target_mask: Optional[Tensor], known_positives: Tensor,
                        sample_labels: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        mined, log_weights = self.mine(logits, known_positives)
        loss = contrastive_cross_entropy(logits, target_mask, denominator_offsets=log_weights)
        stats = {
            "hard_negative_count": mined.sum(),
            "true_negative_count": (~known_positives).sum(),
        }
        return loss, stats

    def _finalise_stats(self, out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        mined = out["hard_negative_count"].float()
        total = out["true_negative_count"].float()
        return {"hard_negative_ratio_actual": mined / total.clamp_min(1.0)}
