"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and the figures that judge it.

* :func:`fit_temperature`: the one scalar ``T`` minimising the mean negative log-likelihood of
  ``softmax(logits / T)`` on held-out logits (the validation split), found by bounded Brent search over
  ``log T`` in ``[log 0.01, log 100]`` (the NLL is convex in ``1 / T``, so it has one minimum).
* :func:`expected_calibration_error`: 15 equal-width confidence bins ``(0, 1/15], (1/15, 2/15], ...``
  (right-closed, as Guo et al.'s code); ``ECE = sum_b n_b / N * |accuracy_b - confidence_b|`` where the
  confidence is the top-class probability.
* :func:`nll`: mean ``-log p(true class)``; :func:`brier`: mean over samples of ``sum_c (p_c - [y = c])^2``
  (the multi-class Brier score, 0 ... 2).

These few lines are written here rather than taken from ``netcal``: netcal 1.4 pulls in gpytorch, pyro-ppl
and tensorboard (ten packages) for what is ten lines of tensor code; its ``ECE(bins=15)`` gives the same
number on the same inputs (docs/heads.md).
"""

from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np
import torch
from torch import Tensor

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.01, 100.0)


def _logits_labels(logits: Any, labels: Any):
    return torch.as_tensor(logits).double(), torch.as_tensor(labels).long().reshape(-1)


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (log-softmax: no log of 0)."""
    z, y = _logits_labels(logits, labels)
    if not y.numel():
        return float("nan")
    return float(-torch.log_softmax(z / temperature, dim=1).gather(1, y[:, None]).mean())


def brier(probs: Any, labels: Any) -> float:
    """Mean over samples of the squared distance between the probabilities and the one-hot label."""
    p, y = _logits_labels(probs, labels)
    if not y.numel():
        return float("nan")
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def reliability_bins(probs: Any, labels: Any, bins: int = ECE_BINS) -> Dict[str, np.ndarray]:
    """Per equal-width confidence bin: ``count``, mean ``confidence`` and ``accuracy`` (NaN where empty),
    and the bin ``edges`` ``[bins + 1]``. A confidence ``c`` falls in bin ``ceil(c * bins) - 1``."""
    p, y = _logits_labels(probs, labels)
    conf, pred = p.max(dim=1)
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, (pred == y).double())
    nan = torch.full_like(count, float("nan"))
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1),
        "count": count.numpy(),
        "confidence": torch.where(count > 0, conf_sum / count.clamp(min=1), nan).numpy(),
        "accuracy": torch.where(count > 0, hit_sum / count.clamp(min=1), nan).numpy(),
    }


def expected_calibration_error(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """``sum_b n_b / N * |accuracy_b - confidence_b|`` over :func:`reliability_bins`."""
    r = reliability_bins(probs, labels, bins)
    n = r["count"].sum()
    if not n:
        return float("nan")
    full = r["count"] > 0
    return float((r["count"][full] / n * np.abs(r["accuracy"][full] - r["confidence"][full])).sum())


def fit_temperature(logits: Any, labels: Any, bounds=TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` minimising :func:`nll` of ``logits / T`` on ``(logits, labels)``; 1.0 without
    samples. Bounded to ``bounds``: a split the head classifies perfectly pushes ``T`` to the lower bound."""
    from scipy.optimize import minimize_scalar

    z, y = _logits_labels(logits, labels)
    if not y.numel():
        return 1.0
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(lambda log_t: nll(z, y, math.exp(log_t)), bounds=(lo, hi), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def probabilities(logits: Any, temperature: float = 1.0) -> Tensor:
    """``softmax(logits / temperature)`` in float32."""
    return torch.softmax(torch.as_tensor(logits).double() / temperature, dim=1).float()


def calibration_figures(logits: Any, labels: Any, temperature: float = 1.0) -> Dict[str, float]:
    """``{"ece", "nll", "brier"}`` of ``softmax(logits / temperature)``."""
    p = probabilities(logits, temperature).double()
    return {"ece": expected_calibration_error(p, labels), "nll": nll(logits, labels, temperature), "brier": brier(p, labels)}
