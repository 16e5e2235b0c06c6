"""Robust fine-tuning methods as plain library code (no Hydra, no MLflow): weight EMA, WiSE-FT weight
interpolation, LoRA through peft, and layer-wise learning-rate decay. The trainer wires them to
``trainer.ema.*``, ``trainer.wise_ft.*``, ``model.lora.*``, ``trainer.layer_decay``/``head_lr``/``logit_scale_lr``."""

from clipexp.finetune.ema import ModelEMA
from clipexp.finetune.layer_decay import param_groups, tower_depths
from clipexp.finetune.lora import DEFAULT_TARGET_MODULES, apply_lora, is_lora, load_lora_state_dict, lora_state_dict, merge_lora
from clipexp.finetune.wise_ft import alpha_key, interpolate_weights, select_alpha

__all__ = [
    "DEFAULT_TARGET_MODULES", "ModelEMA", "alpha_key", "apply_lora", "interpolate_weights", "is_lora",
    "load_lora_state_dict", "lora_state_dict", "merge_lora", "param_groups", "select_alpha", "tower_depths",
]
