"""LoRA adapters on a CLIP through the ``peft`` library (no Hydra, no MLflow).

``apply_lora`` wraps a ``CLIPModel`` in a ``peft.PeftModel`` whose only trainable parameters are the
adapters (``lora_A`` / ``lora_B``) of ``target_modules`` (default: the attention projections of both
towers). The wrapper forwards attribute access, so ``model.vision_model``, ``model.text_projection``,
``model.logit_scale`` work as on the plain model. ``merge_lora`` folds the adapters into the base
weights and returns the plain ``CLIPModel`` (what ``save_pretrained`` writes and ``from_pretrained``
loads). ``lora_state_dict`` is what a checkpoint needs: the adapters alone.
"""

from __future__ import annotations

import re
from typing import Dict, Sequence

import torch
from torch import nn

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


def apply_lora(model: nn.Module, r: int, alpha: float, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
               dropout: float = 0.0) -> nn.Module:
    """``model`` with rank-``r`` adapters (scaling ``alpha / r``) on every module whose name ends in one
    of ``target_modules``; everything else is frozen. The adapters start at zero (``lora_B = 0``), so the
    adapted model's outputs at step 0 equal the base model's."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA r={r!r} is invalid: an integer >= 1 (0 turns LoRA off)")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in target_modules if t not in names]
    if unknown:
        raise ValueError(f"LoRA target module {unknown[0]!r} is not in the model; CLIP's and SigLIP's attention projections are "
                         f"q_proj, k_proj, v_proj, out_proj and their MLPs fc1, fc2; open_clip's MLPs are c_fc, c_proj")
    # a family names the matching modules whose forward never runs (a weight read by MultiheadAttention): skipped
    exclude = getattr(model, "lora_exclude", None)
    full = [name for name, m in model.named_modules() if name and name.rsplit(".", 1)[-1] in set(target_modules)
            and isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) and not (exclude and re.search(exclude, name))]
    if not full:
        raise ValueError(f"LoRA target modules {list(target_modules)} match no layer this model runs")
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), target_modules=full, lora_dropout=float(dropout), bias="none")
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (``W + alpha/r * B @ A``); ``model``
    itself is consumed (its base layers receive the merged weights). A model without LoRA is returned as is."""
    return model.merge_and_unload() if is_lora(model) else model


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights only (a checkpoint's share of a LoRA model: a few percent of the model)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise KeyError(f"the LoRA checkpoint has adapters this model has not ({unexpected[0]!r}); resume with the same model.lora.*")


def saved_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What a checkpoint holds of ``model``: the adapters alone under LoRA (the base never changes and is
    rebuilt from ``model.*`` on resume), else the whole state dict (not copied: save it before the weights change)."""
    return lora_state_dict(model) if is_lora(model) else model.state_dict()


def load_saved_weights(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Put :func:`saved_weights` back."""
    if is_lora(model):
        load_lora_state_dict(model, state)
    else:
        model.load_state_dict(state)
