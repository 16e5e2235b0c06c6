"""The k-shot draws: exactly k per class (all of a smaller class), seeded, independent per (seed, k, draw)."""

from __future__ import annotations

import pytest
import torch

from clipexp.errors import ConfigError
from clipexp.heads import kshot_indices, split_exemplars
from clipexp.heads.shots import check_shots

# class 0: 5 examples, class 1: 3, class 2: 10; one unlabelled row (-1)
LABELS = torch.tensor([0, 1, 2, 2, 0, 2, 1, 2, 2, 0, 2, -1, 2, 0, 2, 1, 2, 0, 2])


def test_k_per_class_exactly_and_all_of_a_smaller_class():
    idx = kshot_indices(LABELS, 4, seed=0, draw=0)
    assert torch.bincount(LABELS[idx], minlength=3).tolist() == [4, 3, 4]  # class 1 has only 3
    assert idx.tolist() == sorted(set(idx.tolist())) and (LABELS[idx] >= 0).all()  # ascending, distinct, labelled
    assert torch.bincount(LABELS[kshot_indices(LABELS, 1, 0, 0)], minlength=3).tolist() == [1, 1, 1]


def test_draws_are_seeded_and_independent():
    same = [kshot_indices(LABELS, 2, seed=7, draw=d).tolist() for d in range(4)]
    assert same == [kshot_indices(LABELS, 2, seed=7, draw=d).tolist() for d in range(4)]  # same seed: same subsets
    assert len({tuple(s) for s in same}) == 4  # draws differ
    assert kshot_indices(LABELS, 2, seed=8, draw=0).tolist() != same[0]  # another seed: another subset
    assert kshot_indices(LABELS, 2, seed=7, draw=3).tolist() == same[3]  # draw 3 does not depend on draws 0-2


def test_split_exemplars_keeps_one_per_class_for_fitting():
    fit, cal = split_exemplars(LABELS, 0.5, seed=0)
    assert torch.bincount(LABELS[cal], minlength=3).tolist() == [2, 2, 5]  # round(5/2) = 2, round(3/2) = 2, 5
    assert sorted(fit.tolist() + cal.tolist()) == [i for i in range(len(LABELS)) if LABELS[i] >= 0]
    fit, cal = split_exemplars(torch.tensor([0, 1, 1]), 0.9, seed=0)
    assert LABELS.new_tensor([0, 1, 1])[fit].tolist() == [0, 1] and len(cal) == 1  # never all of a class


@pytest.mark.parametrize("shots,draws,key", [([0, 2], 5, "eval.shots"), ([1.5], 5, "eval.shots"), ([1], 0, "eval.draws")])
def test_bad_shots_and_draws_are_config_errors(shots, draws, key):
    with pytest.raises(ConfigError, match=key):
        check_shots(shots, draws)
