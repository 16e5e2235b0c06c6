"""Seeded, stratified train/val/test splits that never put one image in two splits.

Rules (:func:`split_pairs`):

* Pairs are first grouped by image path: all captions of one image go to the same split.
* Split sizes come from the ratios by largest-remainder rounding over all images, so the three
  sizes always add up and match the ratios as closely as integers can (10 images at 0.8/0.1/0.1
  give 8/1/1).
* When labels exist, every class is split in the same proportions (stratification): each class's
  share of each split is its exact share rounded, with the roundings chosen so that the totals
  above still hold. An image's class is its first pair's label; unlabelled images form their own
  stratum.
* Within a class, which images go where is a seeded shuffle (``random.Random(seed)``); each split
  keeps the original order of the pairs.
"""

from __future__ import annotations

import math
import random
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from clipexp.data.pairs import ImageTextPair
from clipexp.data.problems import DataValidationError

SPLITS = ("train", "val", "test")


def apportion(n: int, ratios: Sequence[float]) -> List[int]:
    """Integer sizes summing to ``n``, proportional to ``ratios`` (largest remainder)."""
    total = float(sum(ratios))
    exact = [n * r / total for r in ratios]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(ratios)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def _check_ratios(ratios: Sequence[float]) -> List[float]:
    if any(r is None or r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be >= 0 and not all 0; got {list(ratios)}")
    total = float(sum(ratios))
    return [r / total for r in ratios]


def stratified_assign(
    labels: Sequence[Optional[Hashable]],
    ratios: Sequence[float],
    seed: int = 0,
    total_first: Optional[int] = None,
) -> List[int]:
    """Bucket index (0..len(ratios)-1) for each item, stratified by label, seeded.

    ``total_first`` forces the size of bucket 0 (used to draw exactly ``max_samples`` items).
    """
    ratios = _check_ratios(ratios)
    n = len(labels)
    targets = apportion(n, ratios)
    if total_first is not None:
        targets = [total_first] + apportion(n - total_first, ratios[1:] if sum(ratios[1:]) > 0 else [1.0] * (len(ratios) - 1))
    strata: Dict[Hashable, List[int]] = {}
    for i, lab in enumerate(labels):
        strata.setdefault(lab, []).append(i)
    keys = sorted(strata, key=lambda k: (k is not None, str(k)))
    share = [t / n if n else 0.0 for t in targets]

    # controlled rounding: floors first, then the largest fractional parts, keeping row and column sums
    counts = {s: [math.floor(len(strata[s]) * share[k]) for k in range(len(share))] for s in keys}
    left = {s: len(strata[s]) - sum(counts[s]) for s in keys}
    need = [targets[k] - sum(counts[s][k] for s in keys) for k in range(len(share))]
    cells = sorted(
        ((s, k) for s in keys for k in range(len(share))),
        key=lambda sk: (-(len(strata[sk[0]]) * share[sk[1]] - counts[sk[0]][sk[1]]), keys.index(sk[0]), sk[1]),
    )
    for s, k in cells:
        if left[s] > 0 and need[k] > 0:
            counts[s][k] += 1
            left[s] -= 1
            need[k] -= 1
    for s in keys:
        for k in range(len(share)):
            give = min(left[s], need[k])
            counts[s][k] += give
            left[s] -= give
            need[k] -= give

    rng = random.Random(seed)
    out = [0] * n
    for s in keys:
        idx = list(strata[s])
        rng.shuffle(idx)
        start = 0
        for k, c in enumerate(counts[s]):
            for i in idx[start : start + c]:
                out[i] = k
            start += c
    return out


def images_needed(ratios: Sequence[float]) -> int:
    """The fewest images for which every split with a ratio above 0 gets at least one (these sizes)."""
    ratios = _check_ratios(ratios)
    n = 1
    while any(r > 0 and c == 0 for r, c in zip(ratios, apportion(n, ratios))):
        n += 1
    return n


def split_pairs(
    pairs: Sequence[ImageTextPair],
    train_split: float = 0.8,
    val_split: float = 0.1,
    test_split: float = 0.1,
    seed: int = 0,
) -> Tuple[List[ImageTextPair], List[ImageTextPair], List[ImageTextPair]]:
    """Split pairs into ``(train, val, test)`` (see the module doc for the rules)."""
    units: Dict[str, List[int]] = {}
    for i, p in enumerate(pairs):
        units.setdefault(str(p.image_path), []).append(i)
    unit_items = list(units.values())
    labels = [pairs[idx[0]].label for idx in unit_items]
    assign = stratified_assign(labels, [train_split, val_split, test_split], seed)
    bucket_of = [0] * len(pairs)
    for idx, b in zip(unit_items, assign):
        for i in idx:
            bucket_of[i] = b
    out: Tuple[List[ImageTextPair], ...] = ([], [], [])
    for p, b in zip(pairs, bucket_of):
        out[b].append(p)
    return out  # type: ignore[return-value]


def check_split_sizes(pairs: Sequence[ImageTextPair], splits: Sequence[Sequence[ImageTextPair]],
                      ratios: Sequence[float]) -> None:
    """One line when a split with a ratio above 0 got no pairs (too few images for the ratios)."""
    empty = [name for name, part, ratio in zip(SPLITS, splits, ratios) if ratio > 0 and not part]
    if not empty:
        return
    n = len({str(p.image_path) for p in pairs})
    shown = "/".join(f"{r:g}" for r in ratios)
    raise DataValidationError(
        f"{n} image{'s' if n != 1 else ''} are too few for train/val/test = {shown}: the {' and '.join(empty)} split "
        f"got none; every split needs at least 1 image, so these ratios need at least {images_needed(ratios)} images "
        f"(add images, or set data.{empty[-1]}_split=0 with the other ratios summing to 1)")
