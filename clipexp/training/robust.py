"""The trainer's side of robust fine-tuning (README "Robust fine-tuning").

Reads ``model.lora.*``, ``trainer.ema.*`` and ``trainer.wise_ft.*`` and applies the plain library
pieces of :mod:`clipexp.finetune` at the points of the training loop where they belong (the
per-layer, head and temperature rates are :func:`clipexp.training.optim.build_optimizer`'s; the ``eval_data``
set is :func:`clipexp.training.data.build_eval_data`'s):

* ``prepare_model``: keeps the start weights (for WiSE-FT: alpha 0 is the model the run started
  from, e.g. stage 1 of a two-stage run), then wraps the model in LoRA adapters;
* ``start_ema`` / ``after_step``: the weight EMA, updated after every optimizer step;
* ``model_state`` / ``load_model_state``: what checkpoints hold of the model (the adapters alone
  under LoRA, else the full state dict), plus ``state_dict`` for the EMA;
* ``final_model``: LoRA merged into plain ``CLIPModel`` weights;
* ``wise_ft``: the interpolated models, one per alpha, each evaluated by a callback; the selected
  alpha's weights are left in the model (then tested and saved).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from clipexp.finetune.ema import ModelEMA
from clipexp.finetune.lora import apply_lora, is_lora, load_lora_state_dict, lora_state_dict, merge_lora
from clipexp.finetune.wise_ft import alpha_key, interpolate_weights, select_alpha

log = logging.getLogger(__name__)

EMA_PREFIX = "ema/"


class RobustFineTuning:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        t, lora = cfg.trainer, cfg.model.lora
        self.lora = OmegaConf.to_container(lora, resolve=True) if lora.r else None
        self.ema_decay = float(t.ema.decay) if t.ema.decay else None
        self.alphas = [float(a) for a in t.wise_ft.alphas]
        self.ema: Optional[ModelEMA] = None
        self.start_state: Optional[Dict[str, torch.Tensor]] = None

    # ----------------------------------------------------------------------------------- the model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.alphas:  # a CPU copy of the start weights: one model's worth of host memory
            self.start_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if self.lora:
            model = apply_lora(model, self.lora["r"], self.lora["alpha"], list(self.lora["target_modules"]), self.lora["dropout"])
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            n_all = sum(p.numel() for p in model.parameters())
            log.info("LoRA r=%d alpha=%g on %s: %d of %d parameters train (%.2f%%)", self.lora["r"], self.lora["alpha"],
                     ",".join(self.lora["target_modules"]), n_train, n_all, 100 * n_train / max(1, n_all))
        return model

    def model_state(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The model's share of a checkpoint: the adapters alone under LoRA (the base never changes; it is
        rebuilt from ``model.*`` on resume). Not copied: save it before the weights change."""
        return lora_state_dict(model) if is_lora(model) else model.state_dict()

    def load_model_state(self, model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
        if is_lora(model):
            load_lora_state_dict(model, state)
        else:
            model.load_state_dict(state)

    def final_model(self, model: nn.Module) -> nn.Module:
        """The plain CLIPModel to evaluate at the end and save: LoRA merged into the weights."""
        return merge_lora(model)

    # ----------------------------------------------------------------------------------------- EMA
    def start_ema(self, model: nn.Module) -> None:
        if self.ema_decay:
            self.ema = ModelEMA(model, self.ema_decay)
            log.info("EMA of %d weight tensors, decay %g", len(self.ema.names), self.ema_decay)

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def state_dict(self) -> Dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.ema is not None:
            if "ema" not in state:
                raise KeyError("the checkpoint has no EMA weights: resume it with trainer.ema.decay=null, or start a new run")
            self.ema.load_state_dict(state["ema"])

    @property
    def monitors_ema(self) -> bool:
        return str(self.cfg.trainer.monitor).startswith(EMA_PREFIX)

    def monitored_weights(self, model: nn.Module):
        """A context in which ``model`` holds the weights ``trainer.monitor`` measures (the EMA's for
        ``ema/...``): what the best checkpoint saves."""
        return self.ema.swapped(model) if self.monitors_ema else contextlib.nullcontext(model)

    # ------------------------------------------------------------------------------------- WiSE-FT
    def wise_ft(self, model: nn.Module, evaluate: Callable[[], Dict[str, float]]) -> Optional[Dict[str, Any]]:
        """Evaluate ``(1 - alpha) * start + alpha * model`` for every alpha (``evaluate()`` returns the
        metrics of whatever weights ``model`` holds), then leave in ``model`` the weights of the selected
        alpha. Returns ``{"alphas": {alpha_key: metrics}, "selected": alpha}``, or None when off."""
        if not self.alphas or self.start_state is None:
            return None
        t = self.cfg.trainer
        finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
        monitor = t.monitor[len(EMA_PREFIX):] if self.monitors_ema else t.monitor
        points: Dict[float, Dict[str, float]] = {}
        for alpha in self.alphas:
            model.load_state_dict(interpolate_weights(self.start_state, finetuned, alpha))
            points[alpha] = evaluate()
            log.info("WiSE-FT alpha %.2f: %s", alpha, "  ".join(f"{k}={v:.4f}" for k, v in points[alpha].items()
                                                                 if k.endswith(("zeroshot_balanced_acc", "zeroshot_acc", "/loss"))))
        values = {a: m.get(monitor) for a, m in points.items()}
        selected = select_alpha(values, t.wise_ft.select, t.monitor_mode)
        model.load_state_dict(interpolate_weights(self.start_state, finetuned, selected))
        log.info("WiSE-FT: alpha %.2f selected (%s, %s=%.4f) and kept as the model", selected, t.wise_ft.select, monitor, values[selected])
        return {"alphas": {alpha_key(a): m for a, m in points.items()}, "selected": selected}

    @property
    def wise_ft_metric(self) -> str:
        """The metric the WiSE-FT plot and table show: ``trainer.monitor``'s, without its split."""
        return str(self.cfg.trainer.monitor).rsplit("/", 1)[-1]

    def plot_wise_ft(self, wise: Dict[str, Any], path: Path, retention: Optional[str]) -> Path:
        from clipexp.tracking import plots

        metric, points = self.wise_ft_metric, list(wise["alphas"].values())
        ret = [m.get(f"{retention}/{metric}") for m in points] if retention else None
        return plots.wise_ft_curve(self.alphas, [m.get(f"val/{metric}") for m in points], ret, path,
                                   retention_name=retention or "retention", metric=metric)


def wise_ft_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """Flat MLflow metrics: ``wise_ft/alpha_0.50/val/zeroshot_balanced_acc``, ..., ``wise_ft/selected_alpha``."""
    out = {f"wise_ft/{key}/{name}": value for key, metrics in result["alphas"].items() for name, value in metrics.items()}
    out["wise_ft/selected_alpha"] = result["selected"]
    return out


def wise_ft_table(result: Dict[str, Any], target: str = "val", retention: Optional[str] = None,
                  metric: str = "zeroshot_balanced_acc") -> str:
    """The printed WiSE-FT table: alpha, target metric, retention metric."""
    cols = [target] + ([retention] if retention else [])
    lines = [f"{'wise_ft alpha':<16}" + "".join(f"{c + '/' + metric:>34}" for c in cols)]
    for key, metrics in result["alphas"].items():
        mark = " *" if key == alpha_key(result["selected"]) else ""
        lines.append(f"{key[len('alpha_'):]:<16}" + "".join(f"{metrics.get(f'{c}/{metric}', float('nan')):>34.4f}" for c in cols) + mark)
    lines.append("* = the selected alpha: the saved model and the test column (0 = the start model, 1 = the fine-tuned one)")
    return "\n".join(lines)
