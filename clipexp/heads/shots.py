"""The k-shot protocol (CoOp, Zhou et al. 2022): ``k`` training examples per class, drawn without
replacement from the training split, ``draws`` times with seeded, independent draws.

A class with fewer than ``k`` examples contributes all of them (as CoOp's ``generate_fewshot_dataset``).
Draw ``d`` of ``k`` shots under ``seed`` depends on ``(seed, k, d)`` only, so adding a ``k`` or a draw
never changes the others, and the same seed gives the same subsets on any machine.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from clipexp.errors import ConfigError


def kshot_indices(labels: Any, k: int, seed: int, draw: int = 0) -> Tensor:
    """Indices (ascending) of ``k`` examples of every class in ``labels`` (all of a class's examples when it
    has ``k`` or fewer), drawn by ``numpy.random.default_rng([seed, k, draw])``."""
    y = torch.as_tensor(labels).long().reshape(-1).numpy()
    rng = np.random.default_rng([int(seed), int(k), int(draw)])
    picked = []
    for c in np.unique(y[y >= 0]):
        members = np.flatnonzero(y == c)
        picked.append(members if len(members) <= k else rng.choice(members, size=k, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(picked))) if picked else torch.zeros(0, dtype=torch.long)


def split_exemplars(labels: Any, share: float = 0.5, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``(fit, calibration)`` indices (ascending) of an exemplar bank: per class, ``round(n * share)`` examples
    held out for calibration (the temperature and the prediction sets), never all of them (one is kept for
    fitting), drawn by ``numpy.random.default_rng(seed)``."""
    y = torch.as_tensor(labels).long().reshape(-1).numpy()
    rng = np.random.default_rng(int(seed))
    held = [rng.permutation(m)[: min(int(round(len(m) * share)), len(m) - 1)]
            for m in (np.flatnonzero(y == c) for c in np.unique(y[y >= 0]))]
    cal = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    fit = np.setdiff1d(np.flatnonzero(y >= 0), cal)
    return torch.from_numpy(fit).long(), torch.from_numpy(cal).long()


def check_shots(shots: Sequence[int], draws: int) -> None:
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
        raise ConfigError("eval.shots", list(shots), "a list of integers >= 1 (examples per class), e.g. [1,2,4,8,16], or [] for none")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError("eval.draws", draws, "an integer >= 1 (seeded draws per number of shots)")
