"""WiSE-FT (Wortsman et al., 2022): weight-space ensembles of a start and a fine-tuned model.

``theta(alpha) = (1 - alpha) * theta_start + alpha * theta_finetuned``, one state dict per alpha, no
retraining. ``torch.lerp`` is exact at both ends (alpha 0 gives the start weights' bits, alpha 1 the
fine-tuned ones'), so the curve's end points are the two models themselves.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Mapping, Sequence, Union

import torch
from torch import nn

log = logging.getLogger(__name__)


def interpolate_weights(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """The state dict ``(1 - alpha) * start + alpha * finetuned`` (same keys, shapes, dtypes as ``finetuned``).

    Non-floating entries (position-id buffers) must agree and are taken as they are.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE-FT alpha={alpha!r} is invalid: a number in [0, 1]")
    if set(start) != set(finetuned):
        key = sorted(set(start) ^ set(finetuned))[0]
        raise KeyError(f"the start and fine-tuned weights differ in their keys (e.g. {key!r}): they must be the same architecture")
    out: Dict[str, torch.Tensor] = {}
    for key, ft in finetuned.items():
        s = start[key].to(device=ft.device)
        if s.shape != ft.shape:
            raise ValueError(f"{key}: start shape {tuple(s.shape)} != fine-tuned shape {tuple(ft.shape)}")
        if torch.is_floating_point(ft):
            out[key] = torch.lerp(s.to(ft.dtype), ft, alpha)
        else:
            out[key] = ft.clone()
    return out


def alpha_key(alpha: float) -> str:
    """The metric-name part of an alpha: ``alpha_0.50``."""
    return f"alpha_{alpha:.2f}"


def select_alpha(values: Mapping[float, float], select: Union[str, float], mode: str = "max") -> float:
    """The alpha to keep: ``select="best_val"`` the alpha with the best ``values[alpha]`` (``mode`` max
    or min; ties go to the smallest alpha, the one closest to the start model), or a fixed alpha that
    was evaluated."""
    if select == "best_val":
        finite = {a: v for a, v in values.items() if v is not None and not math.isnan(v)}
        if not finite:
            raise ValueError("no WiSE-FT alpha has a finite validation value to select on")
        sign = 1.0 if mode == "max" else -1.0
        return max(sorted(finite), key=lambda a: (sign * finite[a], -a))
    alpha = float(select)
    if alpha not in values:
        raise ValueError(f"trainer.wise_ft.select={select!r} is invalid: best_val or one of the alphas {sorted(values)}")
    return alpha


def wise_ft(model: nn.Module, start: Mapping[str, torch.Tensor], alphas: Sequence[float], evaluate: Callable[[], Dict[str, float]],
            monitor: str, select: Union[str, float] = "best_val", mode: str = "max") -> Dict[str, Any]:
    """Evaluate ``(1 - alpha) * start + alpha * model`` for every alpha (``evaluate()`` returns the metrics of the
    weights ``model`` holds), then leave in ``model`` the weights of the alpha :func:`select_alpha` picks by
    ``metrics[monitor]``. Returns ``{"alphas": {alpha_key: metrics}, "selected": alpha}``."""
    finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    points: Dict[float, Dict[str, float]] = {}
    for alpha in alphas:
        model.load_state_dict(interpolate_weights(start, finetuned, float(alpha)))
        points[float(alpha)] = evaluate()
        log.info("WiSE-FT alpha %.2f: %s", alpha, "  ".join(f"{k}={v:.4f}" for k, v in points[float(alpha)].items()
                                                            if k.endswith(("zeroshot_balanced_acc", "zeroshot_acc", "/loss"))))
    values = {a: m.get(monitor) for a, m in points.items()}
    selected = select_alpha(values, select, mode)
    model.load_state_dict(interpolate_weights(start, finetuned, selected))
    log.info("WiSE-FT: alpha %.2f selected (%s, %s=%.4f) and kept as the model", selected, select, monitor, values[selected])
    return {"alphas": {alpha_key(a): m for a, m in points.items()}, "selected": selected}
