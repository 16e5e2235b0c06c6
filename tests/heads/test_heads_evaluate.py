"""evaluate_heads without a test or validation split, unlabelled rows, and class names MLflow would refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipexp.heads import evaluate_heads
from clipexp.heads.metrics import class_keys

pytestmark = pytest.mark.usefixtures("one_thread")


def _split(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = np.eye(3, 8)[y] + 0.7 * rng.normal(size=(n, 8))
    return F.normalize(torch.tensor(x, dtype=torch.float32), dim=-1), torch.tensor(y)


TEXT = F.normalize(torch.eye(3, 8) + 0.3, dim=-1)
NAMES = ["a/b", "x y", "x_y"]


def test_without_a_test_split_the_figures_describe_val_and_nothing_is_logged_as_test():
    report = evaluate_heads(_split(90, 0), _split(60, 1), None, NAMES, TEXT, 10.0, heads=["prototype", "knn"], shots=[1, 2])
    assert report.split == "val" and not report.kshot and not any(k.startswith("test/") for k in report.metrics)
    assert set(report.coverage) == set(report.reliability) == {"prototype", "knn"}
    assert "val/knn/chosen_k" in report.metrics and "val/prototype/coverage" not in report.metrics  # in-sample: not logged


def test_without_validation_heads_keep_their_defaults_and_have_no_sets():
    report = evaluate_heads(_split(90, 0), None, _split(40, 2), NAMES, TEXT, 10.0, heads=["zero_shot", "linear"])
    assert report.heads.temperatures == {"zero_shot": 1.0, "linear": 1.0} and report.heads.heads["linear"].c == 1.0
    assert "test/linear/coverage" not in report.metrics and report.metrics["test/linear/ece"] == report.metrics["test/linear/ece_uncalibrated"]
    assert report.heads.predict(_split(5, 3)[0], "linear").sets is None
    assert not any(k.startswith("val/") for k in report.metrics)


def test_unlabelled_rows_are_left_out_and_class_names_become_metric_names():
    x, y = _split(90, 0)
    y_unlabelled = y.clone()
    y_unlabelled[::3] = -1
    tx, ty = _split(40, 2)
    with_unlabelled = evaluate_heads((x, y_unlabelled), _split(60, 1), (tx, ty), NAMES, TEXT, 10.0, heads=["prototype"])
    only_labelled = evaluate_heads((x[y_unlabelled >= 0], y[y_unlabelled >= 0]), _split(60, 1), (tx, ty), NAMES, TEXT, 10.0, heads=["prototype"])
    assert with_unlabelled.metrics == only_labelled.metrics
    assert class_keys(NAMES) == ["a_b", "x_y_1", "x_y_2"]  # '/' and ' ' become '_'; a shared name gets its index
    assert {f"test/prototype/recall/{k}" for k in class_keys(NAMES)} <= set(with_unlabelled.metrics)
