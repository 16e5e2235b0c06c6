"""Optimizer and schedules: AdamW with decay on weight matrices only, warm-up + cosine learning rate, the
run's length (:class:`StepPlan`).

``build_optimizer`` and ``plan_steps`` read the run config's ``trainer`` section; ``lr_at`` is a plain
function, and the parameter groups (weight decay; layer-wise, head and temperature rates) are
:func:`clipexp.finetune.param_groups`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, List, Tuple

import torch

from clipexp.finetune.layer_decay import param_groups

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


@dataclass(frozen=True)
class StepPlan:
    """The run's length and step intervals, worked out once from ``trainer.*`` and the data (logged as
    ``derived.*`` params; the config is never rewritten)."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    eval_steps: int
    save_steps: int

    @property
    def epochs(self) -> float:
        """How many passes over the training split the run makes (``max_steps`` wins over ``num_epochs``)."""
        return self.total_steps / max(1, self.steps_per_epoch)


def plan_steps(trainer_cfg: Any, steps_per_epoch: int) -> StepPlan:
    """``trainer.max_steps`` (else ``num_epochs`` epochs) and the step settings that fit it.

    The defaults (warm-up 500, evaluation every 500, a checkpoint every 1000 steps) suit long runs; a 300-step
    run on a small CSV would otherwise never leave warm-up. So ``warmup_steps >= total_steps`` becomes 10% of
    the steps, and ``eval_steps`` / ``save_steps`` above ``total_steps`` become ``total_steps`` (the run
    evaluates and saves at its last step anyway), named in one warning. Values that fit are kept."""
    t = trainer_cfg
    total = int(t.max_steps or t.num_epochs * steps_per_epoch)
    chosen = {"warmup_steps": int(t.warmup_steps), "eval_steps": int(t.eval_steps), "save_steps": int(t.save_steps)}
    changes = []
    if chosen["warmup_steps"] and chosen["warmup_steps"] >= total:
        changes.append(("warmup_steps", int(WARMUP_FRACTION * total), f"{WARMUP_FRACTION:.0%} of the steps"))
    for key, what in (("eval_steps", "an evaluation at the last step only"), ("save_steps", "a checkpoint at the last step only")):
        if chosen[key] > total:
            changes.append((key, total, what))
    if changes:
        log.warning("this run has %d steps; settings that did not fit are scaled: %s; set them below %d to choose", total,
                    ", ".join(f"trainer.{key} {chosen[key]} -> {new} ({what})" for key, new, what in changes), total)
        chosen.update({key: new for key, new, _ in changes})
    return StepPlan(total_steps=total, steps_per_epoch=int(steps_per_epoch), **chosen)


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
