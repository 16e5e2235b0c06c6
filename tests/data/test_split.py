"""split_pairs: sizes, stratification, image-level disjointness, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from clipexp.data.pairs import ImageTextPair
from clipexp.data.split import apportion, split_pairs, stratified_assign


def make_pairs(counts, captions_per_image=1):
    pairs = []
    for label, n in counts.items():
        for i in range(n):
            for k in range(captions_per_image):
                pairs.append(ImageTextPair(Path(f"/d/{label}/{i}.jpg"), [f"{label} {i} caption {k}"], label))
    return pairs


def test_apportion_largest_remainder():
    assert apportion(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
    assert apportion(7, [0.8, 0.1, 0.1]) == [5, 1, 1]  # remainders .6 < .7 = .7
    assert apportion(2000, [0.8, 0.1, 0.1]) == [1600, 200, 200]
    assert apportion(5, [1, 1, 1]) == [2, 2, 1]


def test_stratified_per_class_proportions_are_exact():
    pairs = make_pairs({"nominal": 100, "local defect": 50, "global defect": 50})
    train, val, test = split_pairs(pairs, 0.8, 0.1, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (160, 20, 20)
    assert Counter(p.label for p in train) == {"nominal": 80, "local defect": 40, "global defect": 40}
    assert Counter(p.label for p in val) == {"nominal": 10, "local defect": 5, "global defect": 5}
    assert Counter(p.label for p in test) == {"nominal": 10, "local defect": 5, "global defect": 5}


def test_uneven_classes_keep_totals_and_round_per_class():
    pairs = make_pairs({"a": 7, "b": 3})
    train, val, test = split_pairs(pairs, 0.8, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (8, 1, 1)
    assert Counter(p.label for p in train) == {"a": 5, "b": 3}
    assert Counter(p.label for p in val) == {"a": 1}
    assert Counter(p.label for p in test) == {"a": 1}


def test_no_image_in_two_splits_even_with_several_captions():
    pairs = make_pairs({"x": 20, "y": 10}, captions_per_image=3)
    train, val, test = split_pairs(pairs, 0.6, 0.2, 0.2, seed=1)
    paths = [{str(p.image_path) for p in s} for s in (train, val, test)]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert [len(s) for s in paths] == [18, 6, 6]
    assert (len(train), len(val), len(test)) == (54, 18, 18)  # all 3 captions travel with their image
    assert sorted(map(id, train + val + test)) == sorted(map(id, pairs))


def test_unlabelled_split_sizes_and_order_preserved():
    pairs = [ImageTextPair(Path(f"/d/{i}.jpg"), [f"c{i}"]) for i in range(10)]
    train, val, test = split_pairs(pairs, 0.8, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (8, 1, 1)
    for part in (train, val, test):
        idx = [pairs.index(p) for p in part]
        assert idx == sorted(idx)


def test_split_is_seeded():
    pairs = make_pairs({"a": 30, "b": 30})
    first = [[p.image_path for p in s] for s in split_pairs(pairs, 0.8, 0.1, 0.1, seed=7)]
    again = [[p.image_path for p in s] for s in split_pairs(pairs, 0.8, 0.1, 0.1, seed=7)]
    other = [[p.image_path for p in s] for s in split_pairs(pairs, 0.8, 0.1, 0.1, seed=8)]
    assert first == again
    assert first != other


def test_zero_ratio_gives_empty_split_and_bad_ratios_raise():
    pairs = make_pairs({"a": 4})
    train, val, test = split_pairs(pairs, 1.0, 0.0, 0.0)
    assert (len(train), len(val), len(test)) == (4, 0, 0)
    with pytest.raises(ValueError, match="split ratios must be >= 0"):
        split_pairs(pairs, -0.1, 0.5, 0.6)


def test_stratified_assign_can_fix_the_first_bucket_size():
    labels = ["a"] * 6 + ["b"] * 3 + [None]
    assign = stratified_assign(labels, [0.3, 0.7], seed=0, total_first=3)
    kept = [lab for lab, a in zip(labels, assign) if a == 0]
    assert len(kept) == 3 and Counter(kept) == {"a": 2, "b": 1}
