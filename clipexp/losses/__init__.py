"""Contrastive-family losses and temperature schedules: pure functions of embeddings.

Every loss is an ``nn.Module`` called as ``loss_fn(image_embeds, text_embeds, group_ids=None,
labels=None, logit_scale=None)`` on L2-normalised ``[B, D]`` embeddings and returns a dict with at
least ``loss``, ``image_to_text_loss``, ``text_to_image_loss``, ``logits`` and ``temperature``.
No Hydra, no MLflow: :func:`build_loss` maps a plain dict of the flat ``loss`` config keys.
"""

from __future__ import annotations

from typing import Any, Dict

from clipexp.names import LOSSES  # one list of allowed names, shared with config validation

from .contrastive import MAX_LOGIT_SCALE, CLIPContrastiveLoss, ContrastiveLossBase
from .distributed import gather_with_grad, world_size
from .domain_specific import DOMAINS, DomainSpecificLoss
from .hard_negative import MINING_STRATEGIES, HardNegativeMiningLoss
from .multi_scale import MultiScaleLoss
from .siglip import SigLIPLoss
from .temperature_scheduler import SCHEDULES, TemperatureScheduler

_COMMON = {
    "temperature": "temperature",
    "learnable_temp": "learnable_temp",
    "use_model_logit_scale": "use_model_logit_scale",
    "multi_positive": "multi_positive",
}

# config key -> constructor argument, per loss; any other key is ignored
_CONFIG_KEYS: Dict[str, Dict[str, str]] = {
    "contrastive": dict(_COMMON),
    "hard_negative": {
        **_COMMON,
        "hard_negative_ratio": "hard_negative_ratio",
        "mining_strategy": "mining_strategy",
        "hard_negative_weight": "hard_negative_weight",
    },
    "domain_specific": {**_COMMON, "domain": "domain", "domain_weight": "domain_weight"},
    "multi_scale": {
        **_COMMON,
        "temperature": "base_temperature",
        "scales": "scales",
        "scale_weights": "scale_weights",
        "normalize_weights": "normalize_weights",
    },
    "siglip": {**_COMMON, "siglip_init_bias": "init_bias"},
}

_CLASSES = {
    "contrastive": CLIPContrastiveLoss,
    "hard_negative": HardNegativeMiningLoss,
    "domain_specific": DomainSpecificLoss,
    "multi_scale": MultiScaleLoss,
    "siglip": SigLIPLoss,
}


def build_loss(name: str, /, **config: Any):
    """Build the loss called ``name`` from flat config keys, ignoring keys it does not use.

    Keys: ``temperature, learnable_temp, use_model_logit_scale, multi_positive, hard_negative_ratio,
    mining_strategy, hard_negative_weight, domain, domain_weight, scales, scale_weights,
    normalize_weights, siglip_init_bias``. ``None`` values are skipped (the constructor default applies);
    ``name`` is positional-only, so a whole flat config dict (with its own ``name`` key) can be splatted.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    mapping = _CONFIG_KEYS[name]
    kwargs = {arg: config[key] for key, arg in mapping.items() if config.get(key) is not None}
    for list_arg in ("scales", "scale_weights"):
        if list_arg in kwargs:
            kwargs[list_arg] = [float(v) for v in kwargs[list_arg]]
    return _CLASSES[name](**kwargs)


__all__ = [
    "CLIPContrastiveLoss",
    "ContrastiveLossBase",
    "DOMAINS",
    "DomainSpecificLoss",
    "HardNegativeMiningLoss",
    "LOSSES",
    "MAX_LOGIT_SCALE",
    "MINING_STRATEGIES",
    "MultiScaleLoss",
    "SCHEDULES",
    "SigLIPLoss",
    "TemperatureScheduler",
    "build_loss",
    "gather_with_grad",
    "world_size",
]
