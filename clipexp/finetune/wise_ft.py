"""WiSE-FT (Wortsman et al., 2022): weight-space ensembles of a start and a fine-tuned model.

``theta(alpha) = (1 - alpha) * theta_start + alpha * theta_finetuned``, one state dict per alpha, no
retraining. ``torch.lerp`` is exact at both ends (alpha 0 gives the start weights' bits, alpha 1 the
fine-tuned ones'), so the curve's end points are the two models themselves.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Union

import torch


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
