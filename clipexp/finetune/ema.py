"""Exponential moving average of a model's trainable weights (no Hydra, no MLflow).

``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (torch's own
``get_ema_multi_avg_fn``: one foreach lerp). Only parameters that train are averaged: a frozen weight's
average is the weight itself, so LoRA or a locked tower cost no second copy of the frozen part.
The shadow weights start as the model's weights when the EMA is created (the starting model).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class ModelEMA:
    """EMA of ``model``'s trainable parameters, by name.

    * ``update(model)`` after each optimizer step;
    * ``swapped(model)``: a context in which ``model`` holds the EMA weights (evaluation, saving); the
      training weights come back bit-for-bit on exit;
    * ``state_dict()`` / ``load_state_dict()``: decay, number of updates and the shadow weights, for
      exact resume (the update is deterministic, so N steps straight and N/2 + resume + N/2 give the
      same bits).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} is invalid: a number in (0, 1), e.g. 0.999")
        self.decay = float(decay)
        self.num_updates = 0
        self.names: List[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow: Dict[str, torch.Tensor] = {n: params[n].detach().clone() for n in self.names}
        self._avg = get_ema_multi_avg_fn(self.decay)

    def _params(self, model: nn.Module) -> List[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"the model has no parameter {missing[0]!r} that this EMA tracks")
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.names:
            self._avg(list(self.shadow.values()), [p.detach() for p in self._params(model)], self.num_updates)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (for good: e.g. before saving the final model)."""
        for p, s in zip(self._params(model), self.shadow.values()):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holds the EMA weights inside the block, its own weights again after it."""
        params = self._params(model)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow.values()):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": {n: t.detach().clone() for n, t in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if sorted(state["shadow"]) != sorted(self.names):
            extra = sorted(set(state["shadow"]) ^ set(self.names))
            raise KeyError(f"the EMA checkpoint does not match the model's trainable parameters (e.g. {extra[0]!r}); "
                           f"resume with the same model.* and lock/LoRA settings")
        self.decay = float(state["decay"])
        self._avg = get_ema_multi_avg_fn(self.decay)
        self.num_updates = int(state["num_updates"])
        for n in self.names:
            self.shadow[n].copy_(state["shadow"][n])
