"""Split conformal prediction sets on a head's probabilities (Vovk et al. 2005; Angelopoulos & Bates 2021).

Calibration: the conformity score ``s(x, y)`` of each held-out sample's true class (the validation split);
the threshold is the ``ceil((n + 1)(1 - alpha))``-th smallest of the ``n`` scores (+inf when that rank
exceeds ``n``: too few samples for this ``alpha``, every class is in every set). For a new sample
exchangeable with them, the set contains its class with probability at least ``1 - alpha``, and (LAC,
continuous scores) at most ``1 - alpha + 1 / (n + 1)``.

Scores (``p``: the head's, calibrated, probabilities of one sample):

* ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``s = 1 - p_y``; the set is every
  class with ``1 - p_c <= threshold``. The smallest sets on average; a set can be empty.
* ``aps`` (adaptive prediction sets, Romano et al. 2020): ``s = sum of p_c over classes ranked above y,
  plus (1 - u) p_y`` with ``u`` uniform in [0, 1) (the randomised calibration score; ``u`` drawn by
  ``numpy.random.RandomState(seed)``, so a seed gives the same thresholds); the set takes classes in
  decreasing probability up to and including the one whose cumulative probability reaches the threshold
  (deterministic: the same image always gets the same set). Never empty, sizes follow the sample's
  difficulty, coverage at least ``1 - alpha`` and often more. This is MAPIE's ``aps`` with
  ``include_last_label=True``, set for set (tests/heads). Without ``u`` (the score ``mass above + p_y``)
  the sets grow much larger: 0.99 coverage and 2.8 classes of 3 at alpha 0.1 on the tests' synthetic
  problem, against 0.95 and 1.9.

``mondrian``: one threshold per class from that class's calibration samples (class-conditional, Vovk 2012):
the coverage holds within every class, not only on average over classes.

The thresholds are written here rather than taken from a library: MAPIE 1.6 (its sets are the same, see
tests/heads) has no class-conditional sets in its v1 API and needs a scikit-learn estimator to pickle,
crepes has no APS, torchcp pulls in torch-geometric; these are twenty lines of tensor code, and what must be
saved is a sorted score vector per class (weights_only-safe).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from clipexp.errors import ConfigError
from clipexp.names import CONFORMAL_SCORES


def _ranked_mass(probs: Tensor) -> Tensor:
    """``[M, C]``: for each class, the probability of the classes ranked strictly above it (tied classes
    share one value), from one sort per row: total minus the mass of the classes not above it."""
    ascending, _ = probs.sort(dim=1)
    cumulative = ascending.cumsum(dim=1)
    not_above = cumulative.gather(1, torch.searchsorted(ascending, probs, right=True) - 1)
    return (cumulative[:, -1:] - not_above).clamp(min=0.0)


def class_scores(probs: Any, score: str) -> Tensor:
    """The conformity score ``s(x, c)`` of every class ``[M, C]`` (float64): LAC ``1 - p_c``; APS the mass
    ranked above ``c`` plus ``p_c``."""
    p = torch.as_tensor(probs).double()
    if score == "lac":
        return 1.0 - p
    if score == "aps":
        return _ranked_mass(p) + p
    raise ConfigError("eval.conformal.score", score, "one of " + ", ".join(CONFORMAL_SCORES))


def threshold(scores: Tensor, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``scores`` (+inf when that rank exceeds ``n``)."""
    n = scores.numel()
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # 1e-9: (n + 1)(1 - alpha) = 18.000000000000004 is 18
    if n == 0 or rank > n:
        return math.inf
    return float(torch.sort(scores.double().reshape(-1)).values[max(rank, 1) - 1])


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ConfigError("eval.conformal.alpha", alpha, "a miscoverage rate in (0, 1), e.g. 0.1 for sets that hold the class 90% of the time")
    return float(alpha)


class SplitConformal:
    """Split conformal sets for one head: ``fit(probs, labels)`` on held-out data, then
    ``sets(probs, alpha)`` ``[M, C]`` (bool). Keeps the calibration scores, so any ``alpha`` can be asked
    later; ``state_dict()`` is plain tensors and strings. ``seed``: APS's uniform draws."""

    def __init__(self, score: str = "lac", mondrian: bool = False, seed: int = 0):
        if score not in CONFORMAL_SCORES:
            raise ConfigError("eval.conformal.score", score, "one of " + ", ".join(CONFORMAL_SCORES))
        self.score, self.mondrian, self.seed = score, bool(mondrian), int(seed)
        self.cal_scores = torch.zeros(0, dtype=torch.float64)  # the true class's score per calibration sample
        self.cal_labels = torch.zeros(0, dtype=torch.long)

    def fit(self, probs: Any, labels: Any) -> "SplitConformal":
        p = torch.as_tensor(probs).double()
        y = torch.as_tensor(labels).long().reshape(-1)
        scores = class_scores(p, self.score).gather(1, y[:, None])[:, 0]
        if self.score == "aps":  # randomised: mass above + (1 - u) p_y
            u = torch.from_numpy(np.random.RandomState(self.seed).uniform(size=y.numel()))
            scores = scores - u * p.gather(1, y[:, None])[:, 0]
        self.cal_scores, self.cal_labels = scores, y
        return self

    def thresholds(self, alpha: float, num_classes: int) -> Tensor:
        """One threshold per class ``[C]`` (float64; all equal unless ``mondrian``)."""
        alpha = check_alpha(alpha)
        if not self.mondrian:
            return torch.full((num_classes,), threshold(self.cal_scores, alpha), dtype=torch.float64)
        return torch.tensor([threshold(self.cal_scores[self.cal_labels == c], alpha) for c in range(num_classes)],
                            dtype=torch.float64)

    def sets(self, probs: Any, alpha: float) -> Tensor:
        """Which classes are in each sample's prediction set ``[M, C]`` (bool)."""
        p = torch.as_tensor(probs).double()
        q = self.thresholds(alpha, p.shape[1])[None, :]
        if self.score == "lac":
            return class_scores(p, "lac") <= q
        return _ranked_mass(p) < q  # up to and including the class whose cumulative probability reaches q

    def state_dict(self) -> Dict[str, Any]:
        return {"score": self.score, "mondrian": self.mondrian, "seed": self.seed, "cal_scores": self.cal_scores,
                "cal_labels": self.cal_labels}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "SplitConformal":
        out = cls(state["score"], state["mondrian"], state["seed"])
        out.cal_scores, out.cal_labels = state["cal_scores"], state["cal_labels"]
        return out


def coverage(sets: Tensor, labels: Any, num_classes: Optional[int] = None) -> Tuple[float, Tensor, float]:
    """``(coverage, coverage per class [C] (NaN for a class without samples), mean set size)``."""
    y = torch.as_tensor(labels).long().reshape(-1)
    num_classes = sets.shape[1] if num_classes is None else num_classes
    if not y.numel():
        return float("nan"), torch.full((num_classes,), float("nan"), dtype=torch.float64), float("nan")
    hit = sets.gather(1, y[:, None])[:, 0].double()
    support = torch.bincount(y, minlength=num_classes).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, hit)
    per_class = torch.where(support > 0, per_class / support.clamp(min=1), torch.full_like(support, float("nan")))
    return float(hit.mean()), per_class, float(sets.double().sum(dim=1).mean())
