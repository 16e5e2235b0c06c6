"""Optimizer and schedules: AdamW with decay on weight matrices only, warmup + cosine LR, the temperature.

``build_optimizer`` and ``build_temperature_schedule`` are the trainer's builders (they read the run
config's ``trainer`` and ``loss`` sections); ``lr_at`` and ``param_groups`` are plain functions.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch

from clipexp.losses import TemperatureScheduler


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_ratio * base_lr``.

    ``step`` is the optimizer step about to be taken (0-based).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(modules: Dict[str, torch.nn.Module], weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices; none for norms, biases, embeddings, temperatures."""
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = f"{prefix}.{name}"
            if p.ndim < 2 or "embedding" in full or "logit_scale" in full or "norm" in full or full.startswith("loss."):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(trainer_cfg: Any, model: torch.nn.Module, loss_fn: torch.nn.Module, device_type: str,
                    use_grad_scaler: bool) -> Tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW over the model's and the loss's trainable parameters (fused on CUDA), and its GradScaler
    (enabled for fp16 only)."""
    t = trainer_cfg
    fused = bool(t.fused_adamw and device_type == "cuda")
    optimizer = torch.optim.AdamW(
        param_groups({"model": model, "loss": loss_fn}, t.weight_decay),
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused or None,
    )
    return optimizer, torch.amp.GradScaler(device_type, enabled=use_grad_scaler)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def trainable_parameters(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def build_temperature_schedule(loss_cfg: Any, total_steps: int) -> TemperatureScheduler:
    """The ``loss.temperature_schedule`` over the run's steps (applied every step unless ``constant``)."""
    c = loss_cfg
    return TemperatureScheduler(
        initial_temp=c.temperature, min_temp=c.min_temp, max_temp=c.max_temp, warmup_steps=c.temp_warmup_steps,
        total_steps=total_steps, schedule_type=c.temperature_schedule, decay_rate=c.temp_decay_rate,
        patience=c.temp_patience, factor=c.temp_factor,
    )
