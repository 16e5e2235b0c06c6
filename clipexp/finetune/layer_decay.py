"""AdamW parameter groups with layer-wise learning-rate decay and separate head / temperature rates.

Per tower, as in the BEiT / FLYP fine-tuning recipes: with ``L`` transformer layers in the tower,
layer ``i`` (0-based) gets ``lr * decay ** (L - i)``, the embeddings (and the vision tower's pre-norm)
``lr * decay ** (L + 1)``, and what sits above the last layer (the final layer norm) the full ``lr``.
The projection heads (``visual_projection``, ``text_projection``) get ``head_lr`` and the temperature
(the model's ``logit_scale``, and a loss module's own parameters: a learnable temperature, SigLIP's
bias) ``logit_scale_lr``; null means the base rate. Names are matched anywhere in the parameter name,
so a ``peft`` LoRA wrapper (``base_model.model.vision_model...``) gets the same groups.

Every group carries ``lr_scale`` (its rate divided by the base rate): a schedule sets
``group["lr"] = lr_at(step) * group["lr_scale"]``, so warmup and decay apply to all groups alike.
Weight decay is off for norms, biases, embeddings and temperatures; ``decay_embeddings=True``
puts it on the token and position embeddings (2-D: open_clip's trainer does, ``trainer.decay_embeddings``).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

_TOWERS = {"vision_model": "vision", "text_model": "text"}
# Transformer (or convolutional stage) index per family, inside ``vision_model.`` / ``text_model.``:
# HF CLIP / SigLIP ``encoder.layers.N``, open_clip ``transformer.resblocks.N``, an HF BERT text tower
# (BiomedCLIP) ``encoder.layer.N``, a timm trunk ``trunk.stages.N`` / ``trunk.blocks.N``, open_clip's
# ModifiedResNet ``visual.layerN`` (1-based: stage N is layer N-1).
_LAYER = re.compile(r"(?:^|\.)(vision_model|text_model)\.(?:.*?\.)?(?:encoder\.layers?\.(\d+)|transformer\.resblocks\.(\d+)"
                    r"|trunk\.(?:stages|blocks)\.(\d+)|visual\.layer(\d+))\.")
# Below the first layer: HF embeddings / pre-norm; open_clip token and position embeddings, the ViT's patch
# conv, class token and pre-norm, the ResNet stem, the timm stem.
_EMBED = re.compile(r"(?:^|\.)(vision_model|text_model)\.(?:embeddings\.|pre_layrnorm\.|token_embedding\.|positional_embedding$"
                    r"|visual\.(?:conv\d|bn\d|class_embedding$|positional_embedding$|ln_pre\.)|visual\.trunk\.(?:stem|patch_embed|cls_token$|pos_embed$)"
                    r"|text\.transformer\.embeddings\.)")
# The projection heads: CLIP's projections; SigLIP's heads inside its towers; open_clip's text projection
# (a parameter), the ViT's ``proj``, the ResNet's attention pool, a timm / HF tower's head or proj.
_HEAD = re.compile(r"(?:^|\.)(?:(visual_projection|text_projection)\.|(?:vision_model|text_model)\.head\."
                   r"|text_model\.(?:text_projection$|text_proj\.|text\.proj\.)|vision_model\.visual\.(?:proj$|attnpool\.|head\.))")


def _layer(m: "re.Match[str]") -> int:
    groups = m.groups()[1:]
    index = next(int(g) for g in groups if g is not None)
    return index - 1 if groups[-1] is not None else index  # ModifiedResNet's layer1..layer4


def tower_depths(model: nn.Module) -> Dict[str, int]:
    """Transformer layers (convolutional stages) per tower, counted from the parameter names (frozen ones included)."""
    depths = {"vision": 0, "text": 0}
    for name, _ in model.named_parameters():
        m = _LAYER.search(name)
        if m:
            tower = _TOWERS[m.group(1)]
            depths[tower] = max(depths[tower], _layer(m) + 1)
    return depths


def no_weight_decay(name: str, ndim: int, decay_embeddings: bool = False) -> bool:
    return (ndim < 2 or ("embedding" in name and not decay_embeddings) or "logit_scale" in name or "logit_bias" in name
            or "norm" in name)


def lr_scale(name: str, depths: Mapping[str, int], base_lr: float, layer_decay: Optional[float] = None,
             head_lr: Optional[float] = None, logit_scale_lr: Optional[float] = None) -> Tuple[str, float]:
    """``(group name, rate / base rate)`` of the model parameter ``name``."""
    if name in ("logit_scale", "logit_bias") or name.endswith((".logit_scale", ".logit_bias")):
        return "logit_scale", (logit_scale_lr / base_lr) if logit_scale_lr is not None else 1.0
    if _HEAD.search(name):
        return "head", (head_lr / base_lr) if head_lr is not None else 1.0
    d = layer_decay if layer_decay is not None else 1.0
    m = _LAYER.search(name)
    if m:
        tower, i = _TOWERS[m.group(1)], _layer(m)
        return f"{tower}.layer_{i}", d ** (depths[tower] - i)
    m = _EMBED.search(name)
    if m:
        tower = _TOWERS[m.group(1)]
        return f"{tower}.embeddings", d ** (depths[tower] + 1)
    return "top", 1.0


def param_groups(model: nn.Module, base_lr: float, weight_decay: float, layer_decay: Optional[float] = None,
                 head_lr: Optional[float] = None, logit_scale_lr: Optional[float] = None,
                 extra: Optional[Mapping[str, nn.Module]] = None, decay_embeddings: bool = False) -> List[Dict[str, Any]]:
    """AdamW groups over ``model``'s trainable parameters (and those of ``extra`` modules, e.g.
    ``{"loss": loss_fn}``, which count as temperatures): one group per (rate, weight decay) pair, in
    order of first appearance (decaying groups first), each with ``params``, ``lr``, ``lr_scale``,
    ``weight_decay`` and ``name`` (the parts it holds, e.g. ``vision.layer_0``, ``head``,
    ``top/no_decay``). With no decay and no separate rates this is the two groups decay / no decay,
    in the former order."""
    depths = tower_depths(model)
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}

    def add(p, label: str, scale: float, wd: float) -> None:
        key = (scale, wd)
        if key not in groups:
            groups[key] = {"params": [], "lr": base_lr * scale, "lr_scale": scale, "weight_decay": wd, "name": label}
        elif label not in groups[key]["name"].split(","):
            groups[key]["name"] += "," + label
        groups[key]["params"].append(p)

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        label, scale = lr_scale(name, depths, base_lr, layer_decay, head_lr, logit_scale_lr)
        nd = no_weight_decay(name, p.ndim, decay_embeddings)
        add(p, label + ("/no_decay" if nd else ""), scale, 0.0 if nd else weight_decay)
    for prefix, module in (extra or {}).items():
        for _, p in module.named_parameters():
            if p.requires_grad:
                scale = (logit_scale_lr / base_lr) if logit_scale_lr is not None else 1.0
                add(p, f"{prefix}/no_decay", scale, 0.0)
    # decaying groups first (then first appearance): with every scale 1 the parameter order, and so the
    # summation order of the gradient norm, is the one of the former two-group split
    return sorted(groups.values(), key=lambda g: g["weight_decay"] == 0.0)
