"""The suite's own numerics: the shared tolerances (tests/numerics.py) and the thread count each test runs at."""

from __future__ import annotations

import pytest
import torch
from numerics import EPS, REORDER, assert_all_close, assert_close, eps_times


def test_tolerance_is_relative_to_the_largest_magnitude_compared():
    want = torch.tensor([15.0, 1e-3, 0.0])
    assert_close(want + torch.tensor([0.9 * REORDER * 15.0, 0.0, 0.0]), want)  # inside
    with pytest.raises(AssertionError, match="tolerance 1e-05 x max-abs 15"):
        assert_close(want + torch.tensor([0.0, 0.0, 1.1 * REORDER * 15.0]), want)  # outside, even where want is 0
    # the same relative error on a tensor 1e6 times smaller: the same verdicts
    assert_close((want + torch.tensor([0.9 * REORDER * 15.0, 0.0, 0.0])) * 1e-6, want * 1e-6)
    with pytest.raises(AssertionError):
        assert_close((want + torch.tensor([0.0, 1.1 * REORDER * 15.0, 0.0])) * 1e-6, want * 1e-6)
    assert eps_times(64) == 4 * EPS * 64


def test_gradient_dicts_share_the_step_scale_and_must_have_the_same_keys():
    want = {"big": torch.tensor([10.0]), "zero": torch.tensor([0.0])}
    assert_all_close({"big": torch.tensor([10.0]), "zero": torch.tensor([5e-5])}, want)  # noise of the step's scale
    with pytest.raises(AssertionError, match="zero"):
        assert_all_close({"big": torch.tensor([10.0]), "zero": torch.tensor([2e-4])}, want)
    with pytest.raises(AssertionError):
        assert_all_close({"big": torch.tensor([10.0])}, want)


@pytest.mark.parametrize("earlier_test_set", [7, 1])
def test_each_test_starts_at_the_session_thread_count(request, earlier_test_set):
    config = request.config
    assert torch.get_num_threads() == (config.clipexp_threads or config.clipexp_start_threads)
    torch.set_num_threads(earlier_test_set)  # as a trainer's setup() does; the next test must not see it
