"""Weighted sum of contrastive losses at several temperatures."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .contrastive import TemperatureMixin
from .targets import compute_logits, contrastive_cross_entropy, positive_mask

Tensor = torch.Tensor


class MultiScaleLoss(TemperatureMixin):
    """``loss = sum_k w_k * contrastive(T_k)`` with ``T_k = base_temperature * scales[k]``.

    Each term is the symmetric (multi-positive) InfoNCE of :class:`CLIPContrastiveLoss` at temperature
    ``T_k``; ``w = scale_weights``, divided by their sum when ``normalize_weights``. Small scales sharpen
    the softmax (focus on the hardest pairs), large ones keep gradient on the whole batch.

    ``image_to_text_loss`` / ``text_to_image_loss`` are the same weighted sums of the per-scale
    directional losses (so ``loss`` is still their mean). Extra outputs: ``scale_losses`` (``[K]``,
    per-scale symmetric losses, unweighted, detached) and ``temperatures`` (``[K]``). ``logits`` and
    ``temperature`` are those at the base temperature. Setting ``loss.temperature`` sets the base
    temperature (``base_temperature`` is an alias); with ``learnable_temp`` the base's ``log(1/T)`` is
    learnt (clamped at ln 100 like CLIP) and the scales stay fixed ratios of it.
    """

    name = "multi_scale"

    def __init__(self, scales: Sequence[float] = (1.0, 0.75, 0.5), base_temperature: float = 0.07,
                 scale_weights: Optional[Sequence[float]] = (1.0, 0.75, 0.5), normalize_weights: bool = True,
                 multi_positive: bool = True, learnable_temp: bool = False, use_model_logit_scale: bool = False):
        super().__init__(base_temperature, learnable_temp, use_model_logit_scale)
        scales = [float(s) for s in scales]
        weights = [1.0] * len(scales) if scale_weights is None else [float(w) for w in scale_weights]
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers; got {scales}")
        if len(weights) != len(scales):
            raise ValueError(
                f"scale_weights must have one weight per scale ({len(scales)}); got {len(weights)}"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"scale_weights must be non-negative with a positive sum; got {weights}")
        if normalize_weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        self.scales = scales
        self.scale_weights = weights
        self.normalize_weights = bool(normalize_weights)
        self.multi_positive = bool(multi_positive)

    @property
    def base_temperature(self) -> float:
        return self.temperature

    @base_temperature.setter
    def base_temperature(self, value: float) -> None:
        self.temperature = value

    def compute(self, image_embeds: Tensor, text_embeds: Tensor, base_scale: Tensor, batch: int, group_ids: Optional[Tensor],
                labels: Optional[Tensor]) -> Dict[str, Tensor]:
        device = image_embeds.device
        similarity = compute_logits(image_embeds, text_embeds, 1.0)
        target_mask = positive_mask(group_ids, batch, device, self.multi_positive)
        target_mask_t = None if target_mask is None else target_mask.t()

        i2t_terms, t2i_terms = [], []
        for scale in self.scales:
            logits = similarity * (base_scale / scale)
            i2t_terms.append(contrastive_cross_entropy(logits, target_mask))
            t2i_terms.append(contrastive_cross_entropy(logits.t(), target_mask_t))
        i2t_all, t2i_all = torch.stack(i2t_terms), torch.stack(t2i_terms)
        weights = torch.tensor(self.scale_weights, dtype=torch.float32, device=device)
        i2t = (weights * i2t_all).sum()
        t2i = (weights * t2i_all).sum()
        base_temperature = (1.0 / base_scale).detach()
        return {
            "loss": (i2t + t2i) / 2,
            "image_to_text_loss": i2t,
            "text_to_image_loss": t2i,
            "logits": (similarity * base_scale).detach(),
            "temperature": base_temperature,
            "scale_losses": ((i2t_all + t2i_all) / 2).detach(),
            "temperatures": base_temperature * torch.tensor(self.scales, dtype=torch.float32, device=device),
        }
