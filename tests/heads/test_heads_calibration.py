"""ECE, NLL and Brier on a 6-sample example by hand; temperature scaling recovers a known temperature."""

from __future__ import annotations

import math

import pytest
import torch

from clipexp.heads.calibration import brier, expected_calibration_error, fit_temperature, nll, reliability_bins

pytestmark = pytest.mark.usefixtures("one_thread")

# six samples, three classes: (probabilities, label); confidences 0.95 / 0.97 (bin 14 of 15: (14/15, 1]),
# 0.69 / 0.72 (bin 10: (10/15, 11/15]), 0.45 (bin 6), 0.55 (bin 8)
PROBS = torch.tensor([
    [0.95, 0.03, 0.02],  # label 0: right
    [0.01, 0.97, 0.02],  # label 0: wrong
    [0.21, 0.10, 0.69],  # label 2: right
    [0.72, 0.18, 0.10],  # label 1: wrong
    [0.30, 0.45, 0.25],  # label 0: wrong
    [0.25, 0.20, 0.55],  # label 2: right
], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 2, 1, 0, 2])


def test_ece_on_six_samples_by_hand():
    # bin 14: accuracy 1/2, confidence 0.96 -> 2/6 x 0.46; bin 10: 1/2 vs 0.705 -> 2/6 x 0.205;
    # bin 6: 0 vs 0.45 -> 1/6 x 0.45; bin 8: 1 vs 0.55 -> 1/6 x 0.45
    expected = 2 / 6 * 0.46 + 2 / 6 * 0.205 + 1 / 6 * 0.45 + 1 / 6 * 0.45
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected, abs=1e-12)
    bins = reliability_bins(PROBS, LABELS)
    assert bins["count"].tolist() == [0] * 6 + [1, 0, 1, 0, 2, 0, 0, 0, 2]
    assert bins["accuracy"][14] == 0.5 and bins["confidence"][10] == pytest.approx(0.705, abs=1e-12)
    # ten bins would put 0.69 and 0.72 apart: the count of bins matters
    assert expected_calibration_error(PROBS, LABELS, bins=10) == pytest.approx(2 / 6 * 0.46 + 0.31 / 6 + 0.72 / 6 + 0.9 / 6, abs=1e-12)


def test_nll_and_brier_on_the_same_six_samples_by_hand():
    p_true = [0.95, 0.01, 0.69, 0.18, 0.30, 0.55]
    assert nll(PROBS.log(), LABELS) == pytest.approx(-sum(math.log(p) for p in p_true) / 6, abs=1e-12)
    per_sample = [0.05 ** 2 + 0.03 ** 2 + 0.02 ** 2, 0.99 ** 2 + 0.97 ** 2 + 0.02 ** 2, 0.21 ** 2 + 0.1 ** 2 + 0.31 ** 2,
                  0.72 ** 2 + 0.82 ** 2 + 0.1 ** 2, 0.7 ** 2 + 0.45 ** 2 + 0.25 ** 2, 0.25 ** 2 + 0.2 ** 2 + 0.45 ** 2]
    assert brier(PROBS, LABELS) == pytest.approx(sum(per_sample) / 6, abs=1e-12)


@pytest.mark.parametrize("true_t", [2.5, 0.4])
def test_temperature_scaling_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z / T): the NLL-minimising temperature of z is T (the MLE; 20,000 samples
    put it within a few percent)."""
    g = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(20_000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / true_t, dim=1), 1, generator=g)[:, 0]
    t = fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.03)
    assert nll(z, y, t) < nll(z, y, 1.0)
