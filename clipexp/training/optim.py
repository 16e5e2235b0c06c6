"""Optimizer and schedules: AdamW with decay on weight matrices only, warmup + cosine LR, the temperature.

``build_optimizer`` and ``build_temperature_schedule`` are the trainer's builders (they read the run
config's ``trainer`` and ``loss`` sections); ``lr_at`` is a plain function, and the parameter groups
(weight decay; layer-wise, head and temperature rates) are :func:`clipexp.finetune.param_groups`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, List, Tuple

import torch
from omegaconf import read_write

from clipexp.finetune.layer_decay import param_groups
from clipexp.losses.temperature_scheduler import TemperatureScheduler

log = logging.getLogger(__name__)
WARMUP_FRACTION = 0.1


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


def fit_step_settings(trainer_cfg: Any, total_steps: int) -> int:
    """Scale, in place, the step-based settings that do not fit a run of ``total_steps`` and name them in one
    warning (before the first step); returns ``total_steps``. The defaults (warm-up 500, evaluation every 500,
    a checkpoint every 1000 steps) suit long runs; a 300-step run on a small CSV would otherwise never leave
    warm-up. ``warmup_steps >= total_steps`` becomes 10% of the steps; ``eval_steps`` / ``save_steps`` above
    ``total_steps`` become ``total_steps`` (the run evaluates and saves at its last step anyway: the logged
    config then says what happens). Values that fit are never touched."""
    t, changes = trainer_cfg, []
    if t.warmup_steps and t.warmup_steps >= total_steps:
        changes.append(("warmup_steps", int(WARMUP_FRACTION * total_steps), f"{WARMUP_FRACTION:.0%} of the steps"))
    for key, what in (("eval_steps", "an evaluation at the last step only"), ("save_steps", "a checkpoint at the last step only")):
        if t[key] > total_steps:
            changes.append((key, total_steps, what))
    if changes:
        said = ", ".join(f"trainer.{key} {t[key]} -> {new} ({what})" for key, new, what in changes)
        with read_write(t):
            for key, new, _ in changes:
                t[key] = new
        log.warning("this run has %d steps; settings that did not fit are scaled: %s; set them below %d to choose",
                    total_steps, said, total_steps)
    return total_steps


def build_optimizer(trainer_cfg: Any, model: torch.nn.Module, loss_fn: torch.nn.Module, device_type: str,
                    use_grad_scaler: bool) -> Tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW over the model's and the loss's trainable parameters (fused on CUDA), and its GradScaler
    (enabled for fp16 only). The groups carry ``lr_scale`` (``trainer.layer_decay``, ``head_lr``,
    ``logit_scale_lr``; all 1 when those are null) for :func:`set_lr`."""
    t = trainer_cfg
    fused = bool(t.fused_adamw and device_type == "cuda")
    groups = param_groups(model, t.learning_rate, t.weight_decay, layer_decay=t.layer_decay, head_lr=t.head_lr,
                          logit_scale_lr=t.logit_scale_lr, extra={"loss": loss_fn}, decay_embeddings=t.decay_embeddings)
    optimizer = torch.optim.AdamW(
        groups,
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused or None,
    )
    return optimizer, torch.amp.GradScaler(device_type, enabled=use_grad_scaler)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's ``lr`` for this step, scaled per group (layer decay, head and temperature rates)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
