"""The end-of-run evaluation of the heads: :func:`evaluate_heads` fits every head on the training split's
embeddings, calibrates it on validation, scores validation and test, runs the k-shot protocol, and returns a
:class:`HeadsReport` (flat metrics, the fitted :class:`~clipexp.heads.fitted.HeadSet`, the data of the plots).

Metric names (``<head>``: ``zero_shot``, ``prototype``, ``knn``, ``linear``, ``tip``; ``<class>``: the class
name with characters MLflow refuses and spaces as ``_``):

* ``test/<head>/acc``, ``balanced_acc``, ``recall/<class>``;
* ``test/<head>/ece``, ``nll``, ``brier``: of the probabilities the head serves (after temperature scaling
  when ``calibrate``, else the raw ones), and ``ece_uncalibrated``, ``nll_uncalibrated``, ``brier_uncalibrated``
  always of the raw ``softmax(scores)``;
* ``test/<head>/coverage``, ``set_size``, ``coverage/<class>``: conformal sets at ``alpha``;
* ``test/<head>/shots_<k>/balanced_acc_mean`` and ``_std`` (sample std over the draws; 0 for one draw);
* ``val/<head>/acc``, ``balanced_acc``, ``recall/<class>``, ``*_uncalibrated``, ``temperature`` (fitted on
  val) and ``chosen_<name>`` for each hyper-parameter validation chose (``chosen_k``, ``chosen_C``,
  ``chosen_alpha``, ``chosen_beta``). Calibrated figures and coverage on val would be in-sample: not logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from clipexp.errors import ConfigError
from clipexp.heads.calibration import calibration_figures, probabilities, reliability_bins
from clipexp.heads.conformal import check_alpha, coverage
from clipexp.heads.fitted import HeadSet, Split, fit_heads, labelled
from clipexp.heads.heads import build_head
from clipexp.heads.metrics import accuracy, balanced_accuracy, class_keys, recall_per_class
from clipexp.heads.shots import check_shots, kshot_indices
from clipexp.names import CONFORMAL_SCORES, HEADS

log = logging.getLogger(__name__)

DEFAULT_HEADS = HEADS


@dataclass
class HeadsReport:
    """What :func:`evaluate_heads` found. ``metrics``: the flat metrics (module docstring); ``heads``: the fitted
    heads to save beside the model; ``kshot``: ``{head: {k: [test balanced accuracy per draw]}}``;
    ``reliability``: ``{head: {"uncalibrated" | "calibrated": reliability_bins(...)}}`` and ``coverage``:
    ``{head: {"coverage", "set_size", "per_class"}}`` on ``split`` (test, or val without a test split);
    ``seconds``: wall time per head (fit + calibration) and ``kshot/<head>``."""

    metrics: Dict[str, float]
    heads: HeadSet
    alpha: float
    split: str
    kshot: Dict[str, Dict[int, List[float]]] = field(default_factory=dict)
    reliability: Dict[str, Dict[str, Dict[str, np.ndarray]]] = field(default_factory=dict)
    coverage: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def class_names(self) -> List[str]:
        return self.heads.class_names

    def save_heads(self, path: Union[str, Path]) -> Path:
        return self.heads.save(path)


def check_options(heads: Sequence[str], shots: Sequence[int], draws: int, alpha: float, score: str) -> None:
    """The ``eval`` options' ranges: raises :class:`~clipexp.errors.ConfigError` naming the key. ``heads=[]``: no heads."""
    if any(h not in HEADS for h in heads):
        raise ConfigError("eval.heads", list(heads), "a list of " + ", ".join(HEADS) + " ([] for none)")
    check_shots(shots, draws)
    check_alpha(alpha)
    if score not in CONFORMAL_SCORES:
        raise ConfigError("eval.conformal.score", score, "one of " + ", ".join(CONFORMAL_SCORES))


def _accuracy_figures(prefix: str, logits: Tensor, labels: Tensor, keys: List[str]) -> Dict[str, float]:
    pred = logits.argmax(dim=1)
    out = {f"{prefix}/acc": accuracy(pred, labels), f"{prefix}/balanced_acc": balanced_accuracy(pred, labels, len(keys))}
    recall = recall_per_class(pred, labels, len(keys))
    out.update({f"{prefix}/recall/{k}": float(r) for k, r in zip(keys, recall) if not torch.isnan(r)})
    return out


def _calibration(prefix: str, logits: Tensor, labels: Tensor, temperature: Optional[float]) -> Dict[str, float]:
    out = {f"{prefix}/{k}_uncalibrated": v for k, v in calibration_figures(logits, labels).items()}
    if temperature is not None:
        out.update({f"{prefix}/{k}": v for k, v in calibration_figures(logits, labels, temperature).items()})
    return out


def _coverage(prefix: str, sets: Tensor, labels: Tensor, keys: List[str]) -> Dict[str, Any]:
    overall, per_class, size = coverage(sets, labels, len(keys))
    metrics = {f"{prefix}/coverage": overall, f"{prefix}/set_size": size}
    metrics.update({f"{prefix}/coverage/{k}": float(v) for k, v in zip(keys, per_class) if not torch.isnan(v)})
    return {"metrics": metrics, "table": {"coverage": overall, "set_size": size, "per_class": per_class.tolist()}}


def _kshot(name: str, train, val, test, class_names, text_embeds, scale, shots, draws, seed, grids) -> Dict[int, List[float]]:
    out: Dict[int, List[float]] = {}
    for k in shots:
        out[k] = []
        for draw in range(draws):
            idx = kshot_indices(train[1], k, seed, draw)
            head = build_head(name, len(class_names), class_embeds=text_embeds, scale=scale, **(grids or {}).get(name, {}))
            head.fit(train[0][idx], train[1][idx], *(val if val is not None else (None, None)))
            out[k].append(balanced_accuracy(head.scores(test[0]).argmax(dim=1), test[1], len(class_names)))
    return out


def evaluate_heads(train: Split, val: Optional[Split], test: Optional[Split], class_names: Sequence[str],
                   text_class_embeds: Any, logit_scale: float, *, heads: Sequence[str] = DEFAULT_HEADS,
                   shots: Sequence[int] = (), draws: int = 5, calibrate: bool = True, alpha: float = 0.1,
                   score: str = "lac", mondrian: bool = False, seed: int = 0,
                   grids: Optional[Dict[str, Dict[str, Any]]] = None) -> HeadsReport:
    """Fit ``heads`` on ``train``, choose their hyper-parameters, temperature and conformal thresholds on
    ``val``, and measure them on ``val`` and ``test`` (each ``(embeddings [N, D], labels [N])``, L2-normalised
    image embeddings, labels indexing ``class_names``, -1 = unlabelled). ``text_class_embeds`` ``[C, D]``: the
    classes' prompt-ensemble text embeddings (zero_shot and tip), ``logit_scale``: the model's 1 / temperature.
    ``shots``/``draws``/``seed``: the k-shot protocol on the training split (not for zero_shot, which has no
    training examples). Without ``test`` the k-shot protocol is skipped and the plots' data describe val."""
    heads, shots = list(heads), list(shots)
    check_options(heads, shots, draws, alpha, score)
    keys, c = class_keys(class_names), len(class_names)
    tr, va, te = labelled(train, c, "training"), labelled(val, c, "validation"), labelled(test, c, "test")
    va = va if va is not None and va[1].numel() else None
    te = te if te is not None and te[1].numel() else None
    split, where = ("test", te) if te is not None else ("val", va)  # what the figures describe
    fitted: Dict[str, HeadSet] = {}
    metrics: Dict[str, float] = {}
    kshot: Dict[str, Dict[int, List[float]]] = {}
    reliability: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    tables: Dict[str, Dict[str, Any]] = {}
    seconds: Dict[str, float] = {}
    for name in dict.fromkeys(heads):
        start = time.perf_counter()
        fitted[name] = fit_heads(tr, va, class_names, heads=[name], class_text_embeds=text_class_embeds, logit_scale=logit_scale,
                                 calibrate=calibrate, alpha=alpha, score=score, mondrian=mondrian, grids=grids)
        seconds[name] = time.perf_counter() - start
        head, temperature, conformal = fitted[name].heads[name], fitted[name].temperatures[name], fitted[name].conformal[name]
        if va is not None:
            logits = head.scores(va[0])
            metrics.update(_accuracy_figures(f"val/{name}", logits, va[1], keys))
            metrics.update(_calibration(f"val/{name}", logits, va[1], None))
            metrics[f"val/{name}/temperature"] = temperature
            metrics.update({f"val/{name}/chosen_{k}": float(v) for k, v in head.chosen.items()})
        if where is not None:
            logits = head.scores(where[0])
            reliability[name] = {"uncalibrated": reliability_bins(probabilities(logits).double(), where[1]),
                                 "calibrated": reliability_bins(probabilities(logits, temperature).double(), where[1])}
            if conformal is not None:
                cov = _coverage(f"{split}/{name}", conformal.sets(probabilities(logits, temperature), alpha), where[1], keys)
                tables[name] = cov["table"]
            if te is not None:
                metrics.update(_accuracy_figures(f"test/{name}", logits, te[1], keys))
                metrics.update(_calibration(f"test/{name}", logits, te[1], temperature))
                metrics.update(cov["metrics"] if conformal is not None else {})
        if te is not None and shots and head.needs_training:
            start = time.perf_counter()
            kshot[name] = _kshot(name, tr, va, te, class_names, text_class_embeds, logit_scale, shots, draws, seed, grids)
            seconds[f"kshot/{name}"] = time.perf_counter() - start
            for k, accs in kshot[name].items():
                metrics[f"test/{name}/shots_{k}/balanced_acc_mean"] = float(np.mean(accs))
                metrics[f"test/{name}/shots_{k}/balanced_acc_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        log.info("heads: %s in %.2f s%s", name, seconds[name] + seconds.get(f"kshot/{name}", 0.0),
                 "".join(f", {k}={v:g}" for k, v in head.chosen.items()))
    head_set = HeadSet(class_names, {n: f.heads[n] for n, f in fitted.items()}, {n: f.temperatures[n] for n, f in fitted.items()},
                       {n: f.conformal[n] for n, f in fitted.items()}, alpha)
    return HeadsReport(metrics, head_set, alpha, split, kshot, reliability, tables, seconds)
