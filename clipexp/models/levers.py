"""A model ready to train: loaded, LoRA adapters and the memory levers applied; the two towers as one module for DDP."""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

import torch
from torch import nn

from clipexp.finetune.lora import apply_lora
from clipexp.models.clip import image_features, text_features
from clipexp.models.loading import load_clip

log = logging.getLogger(__name__)


class DualEncoder(nn.Module):
    """A CLIP's two towers as one module whose ``forward`` returns both embeddings.

    This is what DistributedDataParallel wraps: DDP synchronises gradients only for a module whose
    forward it runs. It holds the towers and projections (the same modules as the CLIP, not copies) and
    not ``logit_scale``: the temperature is used by the loss alone, which every rank computes on the
    same gathered batch, so its gradient is already the global one on every rank (the trainer averages
    those few loss-only gradients itself). So no parameter of the wrapped module is ever unused and DDP
    needs no ``find_unused_parameters``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
        self.text_model, self.text_projection = model.text_model, model.text_projection
        self.clipexp_text = getattr(model, "clipexp_text", None)  # the family's text spec (SigLIP), read by text_features

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                text_index: Optional[torch.Tensor] = None):
        return image_features(self, pixel_values), text_features(self, input_ids, attention_mask, text_index=text_index)


def enable_checkpointing(model: nn.Module, towers: str = "both") -> None:
    """Activation (gradient) checkpointing in the transformer layers of ``towers``: both, image or text.

    Non-reentrant (PyTorch's recommendation: works with a frozen tower's inputs and under DDP). The
    other tower's layers are switched back off, whatever the transformers version keeps the flag on
    (the encoder in 4.x, each layer in 5.x).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "set_tower_checkpointing"):  # open_clip: its own grad_checkpointing flags
        model.set_tower_checkpointing(towers)
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (gradient_checkpointing_enable is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    off = {"image": [model.text_model], "text": [model.vision_model]}.get(towers, [])
    for tower in off:
        for module in tower.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False


def apply_levers(model: nn.Module, *, lock_image: bool = False, lock_text: bool = False, gradient_checkpointing: Any = False,
                 channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Locked towers (no gradients), activation checkpointing (``True``/``"image"``/``"text"``),
    channels-last weights, ``torch.compile`` of both towers; returns ``model`` (changed in place)."""
    if lock_image:
        for mod in (model.vision_model, model.visual_projection):
            mod.requires_grad_(False)
    if lock_text:
        for mod in (model.text_model, model.text_projection):
            mod.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model, "both" if gradient_checkpointing is True else gradient_checkpointing)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.vision_model.compile()
        model.text_model.compile()
    return model


def load_training_model(model_cfg: Any) -> Tuple[nn.Module, Any]:
    """``(model, processor)`` of a run config's ``model`` section (any object with the keys of ``ModelConfig``), as
    loaded: a built model's weights follow the caller's seed."""
    m = model_cfg
    arch = dict(m.architecture) if m.architecture is not None else None
    return load_clip(m.name_or_path, arch, m.image_resolution, m.max_sequence_length, image_interpolation=m.image_interpolation,
                     family=getattr(m, "family", None), arch=getattr(m, "arch", None), pretrained=getattr(m, "pretrained", None))


def prepare_for_training(model: nn.Module, model_cfg: Any, device_cfg: Any) -> nn.Module:
    """LoRA adapters (``model.lora.r`` > 0; a locked tower then freezes its adapters too), then the levers: locked
    towers, activation checkpointing, channels-last, ``torch.compile``. Returns the model to train."""
    m = model_cfg
    lora = getattr(m, "lora", None)
    if lora is not None and lora.r:
        model = apply_lora(model, int(lora.r), float(lora.alpha), list(lora.target_modules), float(lora.dropout))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("LoRA r=%d alpha=%g on %s: %d of %d parameters train (%.2f%%)", lora.r, lora.alpha, ",".join(lora.target_modules),
                 n_train, n_all, 100 * n_train / max(1, n_all))
    return apply_levers(model, lock_image=m.lock_image, lock_text=m.lock_text, gradient_checkpointing=m.gradient_checkpointing,
                        channels_last=device_cfg.channels_last, compile=device_cfg.compile)


def build_training_model(model_cfg: Any, device_cfg: Any, device: torch.device) -> Tuple[nn.Module, Any]:
    """``(model, processor)``: :func:`load_training_model` then :func:`prepare_for_training`, on ``device``."""
    model, processor = load_training_model(model_cfg)
    return prepare_for_training(model, model_cfg, device_cfg).to(device), processor


def quiet_transformers() -> None:
    """Our progress bar and log lines are the ones users read; silence transformers' own bars."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
