"""Split conformal sets: LAC and APS on a hand example, the finite-sample rank, MAPIE's sets on the same
probabilities, and coverage over 200 random splits within the finite-sample bound, global and per class."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipexp.errors import ConfigError
from clipexp.heads.conformal import SplitConformal, coverage, threshold

pytestmark = pytest.mark.usefixtures("one_thread")

P = lambda rows: torch.tensor(rows, dtype=torch.float64)


def test_the_threshold_is_the_ceil_n_plus_1_rank():
    scores = torch.arange(1, 20, dtype=torch.float64)  # 1 ... 19
    assert threshold(scores, 0.1) == 18.0  # n = 19: ceil(20 x 0.9) = 18 (not 19: 20 x 0.9 is 18.000000000000004)
    assert threshold(scores[:8], 0.1) == math.inf  # n = 8: ceil(9 x 0.9) = 9 > 8: every class in every set
    assert threshold(scores[:9], 0.1) == 9.0  # n = 9: ceil(10 x 0.9) = 9
    assert threshold(scores[:4], 0.4) == 3.0  # n = 4: ceil(5 x 0.6) = 3


def test_lac_sets_by_hand():
    # true-class probabilities 0.9, 0.6, 0.5, 0.3 -> scores 0.1, 0.4, 0.5, 0.7; alpha 0.4 -> 3rd smallest = 0.5
    cal = P([[0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.3, 0.2, 0.5], [0.3, 0.4, 0.3]])
    lac = SplitConformal("lac").fit(cal, torch.tensor([0, 1, 2, 0]))
    assert lac.thresholds(0.4, 3).tolist() == [0.5, 0.5, 0.5]
    # a class is in the set when 1 - p <= 0.5, i.e. p >= 0.5
    sets = lac.sets(P([[0.3, 0.6, 0.1], [0.45, 0.45, 0.1], [0.55, 0.0, 0.45], [0.2, 0.2, 0.6]]), 0.4)
    assert sets.tolist() == [[False, True, False], [False, False, False], [True, False, False], [False, False, True]]


def test_aps_sets_by_hand():
    # calibration score: mass ranked above the true class + (1 - u) x its probability, u = RandomState(0)'s
    # first four uniforms 0.5488, 0.7152, 0.6028, 0.5449:
    # 0 + 0.9 x 0.4512 = 0.4061; 0.5 + 0.3 x 0.2848 = 0.5854; 0.9 + 0.1 x 0.3972 = 0.9397; 0.4 x 0.4551 = 0.1820
    # alpha 0.4 -> the 3rd smallest, 0.5854
    u = np.random.RandomState(0).uniform(size=4)
    cal = P([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    aps = SplitConformal("aps", seed=0).fit(cal, torch.tensor([0, 1, 2, 0]))
    expected = [0.9 * (1 - u[0]), 0.5 + 0.3 * (1 - u[1]), 0.9 + 0.1 * (1 - u[2]), 0.4 * (1 - u[3])]
    assert aps.cal_scores.tolist() == pytest.approx(expected, abs=1e-12)
    assert aps.thresholds(0.4, 3)[0] == pytest.approx(0.5 + 0.3 * (1 - u[1]), abs=1e-12)
    # classes join in decreasing probability while the mass above them is below 0.5854 (the last one joins
    # although its cumulative probability passes the threshold): 0.95 -> {0}; 0.7 > 0.5854 -> {0};
    # 0.5 < 0.5854, then 0.8 -> {0, 1}; class 0 (0.45), class 2 (0.45 above it), class 1 (0.75) -> {0, 2}
    sets = aps.sets(P([[0.95, 0.03, 0.02], [0.7, 0.25, 0.05], [0.5, 0.3, 0.2], [0.45, 0.25, 0.3]]), 0.4)
    assert sets.tolist() == [[True, False, False], [True, False, False], [True, True, False], [True, False, True]]


def test_mondrian_thresholds_per_class_and_infinite_when_a_class_has_too_few():
    cal = P([[0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.3, 0.2, 0.5], [0.3, 0.4, 0.3], [0.8, 0.1, 0.1]])
    m = SplitConformal("lac", mondrian=True).fit(cal, torch.tensor([0, 1, 2, 0, 0]))
    # class 0 scores 0.1, 0.7, 0.2 (n = 3): alpha 0.4 -> ceil(4 x 0.6) = 3rd = 0.7; classes 1 and 2 (n = 1):
    # ceil(2 x 0.6) = 2 > 1 -> inf
    assert m.thresholds(0.4, 3).tolist() == pytest.approx([0.7, math.inf, math.inf])
    assert m.sets(P([[0.2, 0.1, 0.7]]), 0.4).tolist() == [[False, True, True]]  # 1 - 0.2 = 0.8 > 0.7


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"eval.conformal.score='raps' is invalid: one of lac, aps"):
        SplitConformal("raps")
    with pytest.raises(ConfigError, match=r"eval.conformal.alpha=1.5 is invalid"):
        SplitConformal().fit(P([[0.5, 0.5]]), torch.tensor([0])).sets(P([[0.5, 0.5]]), 1.5)


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_sets_equal_mapies_on_the_same_probabilities(score):
    """MAPIE's SplitConformalClassifier (prefit, ``include_last_label=True``, APS's uniforms from the same
    seed) on the same probabilities."""
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.7, 0.7, 0.7, 0.7], size=300)
    labels = np.array([rng.choice(4, p=p) for p in probs])

    class Lookup(ClassifierMixin, BaseEstimator):  # a fitted classifier whose input is the row index
        classes_ = np.arange(4)

        def fit(self, x, y):
            return self

        def predict_proba(self, x):
            return probs[np.asarray(x, dtype=int)[:, 0]]

        def predict(self, x):
            return self.predict_proba(x).argmax(axis=1)

    rows = np.arange(300)[:, None]
    mapie = SplitConformalClassifier(Lookup(), confidence_level=0.9, conformity_score=score, prefit=True, random_state=3)
    mapie.conformalize(rows[:150], labels[:150])
    _, theirs = mapie.predict_set(rows[150:])
    ours = SplitConformal(score, seed=3).fit(probs[:150], labels[:150]).sets(probs[150:], 0.1)
    assert np.array_equal(ours.numpy(), theirs[:, :, 0])
    assert 1.5 < ours.sum(dim=1).double().mean() < 3.5  # sets of every size: the comparison means something


def _problem(n=3000, seed=0):
    """Three classes; class 2 is the hard one (its logits are noisier), so one global threshold under-covers it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    noise = torch.tensor([0.6, 0.6, 2.0])[y][:, None]
    logits = 2.0 * torch.nn.functional.one_hot(y, 3).double() + noise * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return torch.softmax(logits, dim=1), y


def _split_coverages(probs, y, alpha, score, mondrian, n_cal_per_class=None, n_cal=None, splits=200):
    g = torch.Generator().manual_seed(1)
    overall, per_class = [], []
    for _ in range(splits):
        perm = torch.randperm(len(y), generator=g)
        if n_cal_per_class:  # stratified: exactly n_cal_per_class of each class in the calibration part
            cal = torch.cat([perm[y[perm] == c][:n_cal_per_class] for c in range(3)])
        else:
            cal = perm[:n_cal]
        test = torch.ones(len(y), dtype=torch.bool)
        test[cal] = False
        sets = SplitConformal(score, mondrian).fit(probs[cal], y[cal]).sets(probs[test], alpha)
        cov, per, _ = coverage(sets, y[test], 3)
        overall.append(cov)
        per_class.append(per)
    return torch.tensor(overall), torch.stack(per_class)


def test_global_coverage_over_200_random_splits_is_within_the_finite_sample_bound():
    """With n calibration samples E[coverage] is in [1 - alpha, 1 - alpha + 1/(n + 1)] (LAC, continuous
    scores); the mean of 200 splits is within 3 standard errors of that interval. n = 50, alpha = 0.1: the
    bound is [0.9, 0.9196]; the rank without the +1 (ceil(n (1 - alpha)) = 45 of 51) would give 0.882."""
    probs, y = _problem()
    alpha, n = 0.1, 50
    cov, _ = _split_coverages(probs, y, alpha, "lac", False, n_cal=n)
    se = float(cov.std()) / math.sqrt(len(cov))
    assert 1 - alpha - 3 * se <= float(cov.mean()) <= 1 - alpha + 1 / (n + 1) + 3 * se, (float(cov.mean()), se)
    aps, _ = _split_coverages(probs, y, alpha, "aps", False, n_cal=n)
    assert float(aps.mean()) >= 1 - alpha - 3 * float(aps.std()) / math.sqrt(len(aps))  # APS: at least 1 - alpha


def test_mondrian_coverage_holds_within_every_class_where_global_does_not():
    """Stratified calibration, 30 per class: every class's mean coverage is in [0.9, 0.9 + 1/31] (3 standard
    errors); one global threshold leaves the hard class well below 0.9."""
    probs, y = _problem()
    alpha, n = 0.1, 30
    _, per_class = _split_coverages(probs, y, alpha, "lac", True, n_cal_per_class=n)
    mean, se = per_class.mean(dim=0), per_class.std(dim=0) / math.sqrt(per_class.shape[0])
    assert ((1 - alpha - 3 * se <= mean) & (mean <= 1 - alpha + 1 / (n + 1) + 3 * se)).all(), (mean, se)
    _, global_per_class = _split_coverages(probs, y, alpha, "lac", False, n_cal_per_class=n)
    assert float(global_per_class.mean(dim=0)[2]) < 1 - alpha - 0.05
