"""Pairwise sigmoid loss (SigLIP, Zhai et al. 2023)."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .contrastive import TemperatureMixin
from .targets import compute_logits, same_group_mask

Tensor = torch.Tensor


class SigLIPLoss(TemperatureMixin):
    """SigLIP: an independent binary classification for every image-text pair of the batch.

    ``logits = t * image @ text.T + b`` with ``t = 1 / temperature`` and bias ``b``;
    ``z_ij = +1`` for positives (the diagonal, or every same-group pair when ``multi_positive`` and
    ``group_ids`` are given) and ``-1`` otherwise;
    ``loss = -sum_ij log sigmoid(z_ij * logits_ij) / B``.

    Defaults follow the paper: ``log t`` learnable, initialised at ``t = 10`` (``temperature=0.1``),
    ``b`` learnable (``learnable_bias``), initialised at ``init_bias = -10``. ``t`` is clamped at 100 as
    in the CLIP losses. Setting ``loss.temperature = T`` re-initialises ``log t`` to ``log(1/T)``.

    The sigmoid loss is symmetric (summing rows or columns gives the same total), so
    ``image_to_text_loss`` and ``text_to_image_loss`` both report the full loss and ``loss`` is their
    mean (= the same number). ``logits`` (detached) include the bias; ``bias`` is an extra output.
    """

    name = "siglip"

    def __init__(self, temperature: float = 0.1, learnable_temp: bool = True, init_bias: float = -10.0, multi_positive: bool = True,
                 learnable_bias: bool = True, use_model_logit_scale: bool = False):
        super().__init__(temperature, learnable_temp, use_model_logit_scale)
        if not math.isfinite(float(init_bias)):
            raise ValueError(f"init_bias must be a finite number; got {init_bias!r}")
        bias = torch.tensor(float(init_bias), dtype=torch.float32)
        if learnable_bias:
            self.logit_bias = nn.Parameter(bias)
        else:
            self.register_buffer("logit_bias", bias)
        self.multi_positive = bool(multi_positive)

    def compute(self, image_embeds: Tensor, text_embeds: Tensor, scale: Tensor, batch: int, group_ids: Optional[Tensor],
                labels: Optional[Tensor]) -> Dict[str, Tensor]:
        device = image_embeds.device
        bias = self.logit_bias.float().to(device)
        logits = compute_logits(image_embeds, text_embeds, scale) + bias
        positives = same_group_mask(group_ids if self.multi_positive else None, batch, device)
        signs = positives.float() * 2.0 - 1.0
        loss = -F.logsigmoid(signs * logits).sum() / batch
        return {
            "loss": loss,
            "image_to_text_loss": loss,
            "text_to_image_loss": loss,
            "logits": logits.detach(),
            "temperature": (1.0 / scale).detach(),
            "bias": bias.detach(),
        }
