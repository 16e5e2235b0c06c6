"""Contrastive-family losses and temperature schedules: pure functions of embeddings.

Every loss is an ``nn.Module`` called as ``loss_fn(image_embeds, text_embeds, group_ids=None,
labels=None, logit_scale=None)`` on L2-normalised ``[B, D]`` embeddings and returns a dict with at
least ``loss``, ``image_to_text_loss``, ``text_to_image_loss``, ``logits`` and ``temperature``
(:class:`~clipexp.losses.contrastive.TemperatureMixin` holds that call once; a loss implements ``compute``).
A loss is a class and a YAML: ``conf/loss/<name>.yaml`` names the class in ``_target_`` beside its
constructor's arguments, and the trainer instantiates it. No Hydra, no MLflow here.
"""

from .contrastive import MAX_LOGIT_SCALE, CLIPContrastiveLoss, ContrastiveLossBase, TemperatureMixin
from .distributed import gather_with_grad, world_size
from .domain_specific import DOMAINS, DomainSpecificLoss
from .hard_negative import MINING_STRATEGIES, HardNegativeMiningLoss
from .multi_scale import MultiScaleLoss
from .siglip import SigLIPLoss
from .temperature_scheduler import SCHEDULES, TemperatureScheduler

__all__ = [
    "CLIPContrastiveLoss",
    "ContrastiveLossBase",
    "DOMAINS",
    "DomainSpecificLoss",
    "HardNegativeMiningLoss",
    "MAX_LOGIT_SCALE",
    "MINING_STRATEGIES",
    "MultiScaleLoss",
    "SCHEDULES",
    "SigLIPLoss",
    "TemperatureMixin",
    "TemperatureScheduler",
    "gather_with_grad",
    "world_size",
]
