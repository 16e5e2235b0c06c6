"""Temperature schedules for the contrastive losses (set each step with ``loss_fn.temperature = T``)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from clipexp.names import SCHEDULES  # one list of allowed names, shared with config validation


class TemperatureScheduler:
    """Temperature as a function of the optimizer step (and, for ``adaptive``, of the loss).

    Every value is clamped to ``[min_temp, max_temp]``. With ``s`` the step, ``T0 = initial_temp``,
    ``Wu = warmup_steps``, ``N = total_steps``:

    * ``constant``: ``T0``.
    * ``warmup``: linear from ``max_temp`` at step 0 to ``T0`` at step ``Wu`` (soft targets first,
      sharpening as the model adapts), then ``T0``.
    * ``cosine``: the same warmup, then cosine from ``T0`` down to ``min_temp`` over steps
      ``Wu..N``: ``min + (T0 - min) * (1 + cos(pi * (s - Wu) / (N - Wu))) / 2``; ``min_temp`` after ``N``.
    * ``exponential``: ``T0 * decay_rate ** s``.
    * ``adaptive``: starts at ``T0``; each call with a loss compares it with the best loss so far: an
      improvement is ``loss < best - threshold * |best|`` (relative, sign-safe); after ``patience``
      consecutive calls without one the temperature is multiplied by ``factor`` and the count restarts
      (ReduceLROnPlateau without cooldown). Calls with ``loss=None`` change nothing.

    ``step(step=None, loss=None)`` returns the temperature (``step=None`` means last step + 1);
    ``state_dict()`` / ``load_state_dict()`` hold everything needed for an exact resume.
    """

    def __init__(
        self,
        initial_temp: float = 0.07,
        min_temp: float = 0.01,
        max_temp: float = 0.1,
        warmup_steps: int = 1000,
        total_steps: int = 10000,
        schedule_type: str = "constant",
        decay_rate: float = 0.999,
        patience: int = 100,
        factor: float = 0.9,
        threshold: float = 1e-3,
    ):
        if schedule_type not in SCHEDULES:
            raise ValueError(f"schedule_type must be one of {', '.join(SCHEDULES)}; got {schedule_type!r}")
        if not 0 < min_temp <= max_temp:
            raise ValueError(f"need 0 < min_temp <= max_temp; got min_temp={min_temp}, max_temp={max_temp}")
        if not initial_temp > 0:
            raise ValueError(f"initial_temp must be > 0; got {initial_temp}")
        if warmup_steps < 0 or total_steps < 0:
            raise ValueError(f"warmup_steps and total_steps must be >= 0; got {warmup_steps}, {total_steps}")
        if not decay_rate > 0:
            raise ValueError(f"decay_rate must be > 0; got {decay_rate}")
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1]; got {factor}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1; got {patience}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0; got {threshold}")
        self.initial_temp = float(initial_temp)
        self.min_temp = float(min_temp)
        self.max_temp = float(max_temp)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.schedule_type = schedule_type
        self.decay_rate = float(decay_rate)
        self.patience = int(patience)
        self.factor = float(factor)
        self.threshold = float(threshold)
        # dynamic state (all of it is in state_dict)
        self.last_step: int = -1
        self.current_temp: float = self._clamp(self.initial_temp)
        self.best_loss: Optional[float] = None
        self.num_bad_steps: int = 0
        self.num_reductions: int = 0

    def _clamp(self, value: float) -> float:
        return min(max(value, self.min_temp), self.max_temp)

    def _warmup(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.initial_temp
        return self.max_temp + (self.initial_temp - self.max_temp) * step / self.warmup_steps

    def value_at(self, step: int) -> float:
        """The temperature of a step-only schedule at ``step`` (``adaptive``: the current value)."""
        kind = self.schedule_type
        if kind == "constant":
            value = self.initial_temp
        elif kind == "warmup":
            value = self._warmup(step)
        elif kind == "cosine":
            if step < self.warmup_steps:
                value = self._warmup(step)
            else:
                span = self.total_steps - self.warmup_steps
                progress = 1.0 if span <= 0 else min((step - self.warmup_steps) / span, 1.0)
                value = self.min_temp + (self.initial_temp - self.min_temp) * 0.5 * (1 + math.cos(math.pi * progress))
        elif kind == "exponential":
            value = self.initial_temp * self.decay_rate ** step
        else:  # adaptive
            value = self.current_temp
        return self._clamp(value)

    def step(self, step: Optional[int] = None, loss: Optional[float] = None) -> float:
        """Advance to ``step`` (default: last step + 1) and return the temperature to use."""
        step = self.last_step + 1 if step is None else int(step)
        self.last_step = step
        if self.schedule_type == "adaptive" and loss is not None:
            self._observe(float(loss))
        self.current_temp = self.value_at(step)
        return self.current_temp

    def _observe(self, loss: float) -> None:
        if not math.isfinite(loss):
            self.num_bad_steps += 1
        elif self.best_loss is None or loss < self.best_loss - self.threshold * abs(self.best_loss):
            self.best_loss = loss
            self.num_bad_steps = 0
        else:
            self.num_bad_steps += 1
        if self.num_bad_steps >= self.patience:
            self.current_temp = self._clamp(self.current_temp * self.factor)
            self.num_bad_steps = 0
            self.num_reductions += 1

    def state_dict(self) -> Dict[str, Any]:
        return {
            "schedule_type": self.schedule_type,
            "last_step": self.last_step,
            "current_temp": self.current_temp,
            "best_loss": self.best_loss,
            "num_bad_steps": self.num_bad_steps,
            "num_reductions": self.num_reductions,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("schedule_type", self.schedule_type) != self.schedule_type:
            raise ValueError(
                f"temperature schedule mismatch: checkpoint has {state['schedule_type']!r}, "
                f"this run uses {self.schedule_type!r}"
            )
        self.last_step = int(state["last_step"])
        self.current_temp = float(state["current_temp"])
        self.best_loss = None if state["best_loss"] is None else float(state["best_loss"])
        self.num_bad_steps = int(state["num_bad_steps"])
        self.num_reductions = int(state.get("num_reductions", 0))

    def __repr__(self) -> str:
        return (
            f"TemperatureScheduler({self.schedule_type}, initial={self.initial_temp}, "
            f"range=[{self.min_temp}, {self.max_temp}], current={self.current_temp:.4g})"
        )
