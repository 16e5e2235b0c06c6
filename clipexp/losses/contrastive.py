"""Symmetric InfoNCE (CLIP) and the base class every contrastive-family loss shares.

The base class owns the temperature (fixed, learnable, or the model's own ``logit_scale``), the
float32 logits, the positive masks and the output dict; subclasses only say how one direction's
loss is computed from its ``[B, B]`` logits (:meth:`ContrastiveLossBase._direction_loss`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .targets import (
    check_embeddings,
    compute_logits,
    contrastive_cross_entropy,
    positive_mask,
    same_group_mask,
)

Tensor = torch.Tensor

#: CLIP clamps the logit scale exp(log(1/T)) at 100, i.e. the temperature at 0.01.
MAX_LOGIT_SCALE = 100.0


class TemperatureMixin(nn.Module):
    """What every loss shares: the call and the temperature.

    ``forward(image_embeds, text_embeds, group_ids=None, labels=None, logit_scale=None)`` checks the
    L2-normalised ``[B, D]`` embeddings, works out the scale ``1/T`` and hands both to the loss's
    :meth:`compute`, which returns the output dict (at least ``loss``, ``image_to_text_loss``,
    ``text_to_image_loss``, ``logits``, ``temperature``). ``name`` is the loss's option in ``conf/loss/``.

    The temperature:

    * fixed (default): ``scale = 1 / temperature``; the trainer may set ``loss.temperature = T``.
    * ``learnable_temp=True``: parameter ``logit_scale = log(1/T)``, ``scale = exp(logit_scale)``
      clamped at 100 (CLIP); setting ``loss.temperature = T`` re-initialises the parameter to
      ``log(1/T)``.
    * ``use_model_logit_scale=True``: ``forward(..., logit_scale=model.logit_scale)`` is required and
      ``scale = logit_scale.exp().clamp(max=100)``; the loss then has no parameter of its own
      (``learnable_temp`` is ignored) and setting ``temperature`` has no effect on the loss.
    """

    name = ""

    def __init__(self, temperature: float, learnable_temp: bool = False, use_model_logit_scale: bool = False):
        super().__init__()
        _check_temperature(temperature)
        self.use_model_logit_scale = bool(use_model_logit_scale)
        self.learnable_temp = bool(learnable_temp) and not self.use_model_logit_scale
        self._temperature = float(temperature)
        if self.learnable_temp:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature), dtype=torch.float32))

    @property
    def temperature(self) -> float:
        """The temperature the next forward uses (``1 / scale``; the clamp included when learnable)."""
        if self.learnable_temp:
            return 1.0 / min(math.exp(float(self.logit_scale.detach())), MAX_LOGIT_SCALE)
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        _check_temperature(value)
        self._temperature = value
        if self.learnable_temp:
            with torch.no_grad():
                self.logit_scale.fill_(math.log(1.0 / value))

    def get_extra_state(self) -> dict:
        """The fixed temperature travels in ``state_dict()`` so that a checkpoint resumes exactly."""
        return {"temperature": self._temperature}

    def set_extra_state(self, state: dict) -> None:
        self._temperature = float(state["temperature"])

    def logit_scale_value(self, device: torch.device, logit_scale: Optional[Tensor] = None) -> Tensor:
        """The multiplicative scale ``1/T`` as a float32 scalar tensor (differentiable when learnt)."""
        if self.use_model_logit_scale:
            if logit_scale is None:
                raise ValueError(
                    "use_model_logit_scale=True: call the loss with logit_scale=model.logit_scale"
                )
            return logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE).to(device)
        if self.learnable_temp:
            return self.logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE).to(device)
        return torch.tensor(1.0 / self._temperature, dtype=torch.float32, device=device)

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, group_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, logit_scale: Optional[Tensor] = None) -> Dict[str, Tensor]:
        batch = check_embeddings(image_embeds, text_embeds, group_ids, labels)
        scale = self.logit_scale_value(image_embeds.device, logit_scale)
        return self.compute(image_embeds, text_embeds, scale, batch, group_ids, labels)

    def compute(self, image_embeds: Tensor, text_embeds: Tensor, scale: Tensor, batch: int, group_ids: Optional[Tensor],
                labels: Optional[Tensor]) -> Dict[str, Tensor]:
        """The loss's output dict from checked embeddings and the scale ``1/T`` (a float32 scalar tensor)."""
        raise NotImplementedError


class ContrastiveLossBase(TemperatureMixin):
    """Template for symmetric contrastive losses over a ``[B, B]`` similarity matrix.

    The output dict (embeddings of any float dtype; the maths is float32) holds
    ``loss`` (mean of the two directions), ``image_to_text_loss``, ``text_to_image_loss``, ``logits``
    (detached scaled image->text logits) and ``temperature``, plus whatever the subclass adds.
    Gathered (multi-GPU) tensors are simply a bigger batch.
    """

    def __init__(self, temperature: float = 0.07, learnable_temp: bool = False, multi_positive: bool = True,
                 use_model_logit_scale: bool = False):
        super().__init__(temperature, learnable_temp, use_model_logit_scale)
        self.multi_positive = bool(multi_positive)

    def _direction_loss(self, logits: Tensor, target_mask: Optional[Tensor], known_positives: Tensor,
                        sample_labels: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Loss of one direction (rows of ``logits`` are queries); returns ``(loss, stats)``.

        ``target_mask``: positives used as targets (None = diagonal only, the textbook path);
        ``known_positives``: same-group pairs (never to be treated as hard negatives);
        ``sample_labels``: per-row class labels (``labels`` or, failing that, ``group_ids``).
        Stats (tensors) from the two directions are summed into the output dict.
        """
        return contrastive_cross_entropy(logits, target_mask), {}

    def compute(self, image_embeds: Tensor, text_embeds: Tensor, scale: Tensor, batch: int, group_ids: Optional[Tensor],
                labels: Optional[Tensor]) -> Dict[str, Tensor]:
        device = image_embeds.device
        logits = compute_logits(image_embeds, text_embeds, scale)
        target_mask = positive_mask(group_ids, batch, device, self.multi_positive)
        known = same_group_mask(group_ids, batch, device)
        sample_labels = labels if labels is not None else group_ids
        if sample_labels is not None:
            sample_labels = sample_labels.to(device)

        i2t, stats_i = self._direction_loss(logits, target_mask, known, sample_labels)
        t2i, stats_t = self._direction_loss(
            logits.t(), None if target_mask is None else target_mask.t(), known.t(), sample_labels
        )
        out: Dict[str, Tensor] = {
            "loss": (i2t + t2i) / 2,
            "image_to_text_loss": i2t,
            "text_to_image_loss": t2i,
            "logits": logits.detach(),
            "temperature": (1.0 / scale).detach(),
        }
        for key in stats_i:
            out[key] = stats_i[key] + stats_t[key]
        out.update(self._finalise_stats(out))
        return out

    def _finalise_stats(self, out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Hook for derived statistics computed from the summed per-direction stats."""
        return {}


class CLIPContrastiveLoss(ContrastiveLossBase):
    """Symmetric InfoNCE, as in CLIP (Radford et al. 2021), with multi-positive targets.

    ``logits = scale * image @ text.T``; ``loss = (CE(logits, targets) + CE(logits.T, targets.T)) / 2``.

    * ``multi_positive=False`` or ``group_ids=None``: targets are ``arange(B)`` and the loss is
      exactly ``(F.cross_entropy(logits, arange) + F.cross_entropy(logits.T, arange)) / 2``.
    * ``multi_positive=True`` with ``group_ids``: every pair with equal group ids is a positive; the
      targets of row i are uniform over its positives (row-normalised positive mask), so duplicate
      captions/classes in a batch are not pushed apart as false negatives.

    Temperature: fixed, learnable (``log(1/T)`` clamped at ln 100), or the model's ``logit_scale``
    (see :class:`TemperatureMixin`).
    """

    name = "contrastive"


def _check_temperature(value: float) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"temperature must be a positive number; got {value!r}")
