"""HardNegativeMiningLoss: the three strategies by hand, and known positives never mined."""

from __future__ import annotations

import math

import pytest
import torch

from clipexp.losses.contrastive import CLIPContrastiveLoss
from clipexp.losses.hard_negative import HardNegativeMiningLoss
from clipexp.losses.targets import same_group_mask

# S3 = [[.8,.36,.48],[.6,.48,.64],[0,.8,.6]] (see conftest); T = 1, W = 2 (3 for weighted), ratio = .5.
# Every row/column has n = 2 true negatives, so "hard" mines ceil(.5 * 2) = 1 per row.


def test_hard_strategy_by_hand(s3_pair, lse):
    image, text = s3_pair
    out = HardNegativeMiningLoss(temperature=1.0, hard_negative_ratio=0.5, mining_strategy="hard",
                                 hard_negative_weight=2.0)(image, text)
    ln2 = math.log(2.0)
    # i2t rows: the most similar negative gets + log 2 in the denominator
    #   row 0 negs {.36, .48} -> .48; row 1 negs {.6, .64} -> .64; row 2 negs {0, .8} -> .8
    i2t = (
        lse(0.8, 0.36, 0.48 + ln2) - 0.8
        + lse(0.6, 0.48, 0.64 + ln2) - 0.48
        + lse(0.0, 0.8 + ln2, 0.6) - 0.6
    ) / 3
    # t2i columns [.8,.6,0] -> .6; [.36,.48,.8] -> .8; [.48,.64,.6] -> .64
    t2i = (
        lse(0.8, 0.6 + ln2, 0.0) - 0.8
        + lse(0.36, 0.48, 0.8 + ln2) - 0.48
        + lse(0.48, 0.64 + ln2, 0.6) - 0.6
    ) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert int(out["hard_negative_count"]) == 6  # one per row, 3 rows x 2 directions
    assert int(out["true_negative_count"]) == 12
    assert out["hard_negative_ratio_actual"].item() == pytest.approx(0.5)


def test_semi_hard_strategy_by_hand(s3_pair, lse):
    image, text = s3_pair
    out = HardNegativeMiningLoss(temperature=1.0, hard_negative_ratio=0.5, mining_strategy="semi-hard",
                                 hard_negative_weight=2.0)(image, text)
    ln2 = math.log(2.0)
    # candidates = negatives less similar than the row's own positive; mine ceil(.5 * |C|) of them
    #   row 0 (pos .8): C = {.36, .48} -> .48;  row 1 (pos .48): C = {} -> nothing (plain term);
    #   row 2 (pos .6): C = {0} -> 0
    i2t = (
        lse(0.8, 0.36, 0.48 + ln2) - 0.8
        + lse(0.6, 0.48, 0.64) - 0.48
        + lse(0.0 + ln2, 0.8, 0.6) - 0.6
    ) / 3
    #   col 0 (pos .8): C = {.6, 0} -> .6;  col 1 (pos .48): C = {.36} -> .36;  col 2 (pos .6): C = {.48} -> .48
    t2i = (
        lse(0.8, 0.6 + ln2, 0.0) - 0.8
        + lse(0.36 + ln2, 0.48, 0.8) - 0.48
        + lse(0.48 + ln2, 0.64, 0.6) - 0.6
    ) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)
    assert int(out["hard_negative_count"]) == 5
    assert out["hard_negative_ratio_actual"].item() == pytest.approx(5 / 12)


def test_weighted_strategy_by_hand(s3_pair, lse):
    image, text = s3_pair
    out = HardNegativeMiningLoss(temperature=1.0, mining_strategy="weighted", hard_negative_weight=3.0)(image, text)
    # w = 1 + (W - 1) * exp(l - max_neg l): the hardest negative counts 3 times, the other 1 + 2 e^{-gap}
    # (adding log w to a logit x is the same as multiplying e^x by w)
    def term(pos, hardest, other):
        return math.log(math.exp(pos) + 3 * math.exp(hardest)
                        + (1 + 2 * math.exp(other - hardest)) * math.exp(other)) - pos

    i2t = (term(0.8, 0.48, 0.36) + term(0.48, 0.64, 0.6) + term(0.6, 0.8, 0.0)) / 3
    t2i = (term(0.8, 0.6, 0.0) + term(0.48, 0.8, 0.36) + term(0.6, 0.64, 0.48)) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)
    # "mined" = above-average importance: the harder of the two negatives in each of the 6 rows
    assert int(out["hard_negative_count"]) == 6
    assert out["hard_negative_ratio_actual"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("strategy", ["hard", "semi-hard", "weighted"])
@pytest.mark.parametrize("multi_positive", [True, False])
def test_never_mines_a_known_positive(random_batch, strategy, multi_positive):
    image, text, groups, _ = random_batch
    loss_fn = HardNegativeMiningLoss(temperature=0.07, hard_negative_ratio=1.0, mining_strategy=strategy,
                                     multi_positive=multi_positive)
    logits = image @ text.t() / 0.07
    known = same_group_mask(groups, 8, torch.device("cpu"))
    for direction in (logits, logits.t()):
        mined, log_weights = loss_fn.mine(direction, known)
        assert mined.any()
        assert not (mined & known).any()
        assert torch.all(log_weights[known] == 0)
    out = loss_fn(image, text, group_ids=groups)
    assert int(out["true_negative_count"]) == 2 * int((~known).sum())
    if strategy == "hard":  # ratio 1: every true negative is mined, and nothing else
        assert int(out["hard_negative_count"]) == int(out["true_negative_count"])


def test_ratio_uses_ceil_without_float_noise():
    loss_fn = HardNegativeMiningLoss(hard_negative_ratio=0.3, mining_strategy="hard")
    logits = torch.arange(121, dtype=torch.float32).reshape(11, 11)  # 10 negatives per row
    mined, _ = loss_fn.mine(logits, torch.eye(11, dtype=torch.bool))
    assert mined.sum(dim=1).tolist() == [3] * 11  # ceil(0.3 * 10) = 3, not 4


def test_weight_one_is_plain_contrastive(random_batch):
    image, text, groups, _ = random_batch
    for strategy in ("hard", "semi-hard", "weighted"):
        out = HardNegativeMiningLoss(hard_negative_weight=1.0, mining_strategy=strategy)(image, text, group_ids=groups)
        torch.testing.assert_close(out["loss"], CLIPContrastiveLoss()(image, text, group_ids=groups)["loss"])


def test_up_weighting_raises_the_loss(random_batch):
    image, text, groups, _ = random_batch
    plain = CLIPContrastiveLoss()(image, text, group_ids=groups)["loss"]
    mined = HardNegativeMiningLoss(mining_strategy="hard", hard_negative_weight=4.0)(image, text, group_ids=groups)
    assert mined["loss"] > plain


def test_invalid_arguments():
    with pytest.raises(ValueError, match="semi-hard, hard, weighted"):
        HardNegativeMiningLoss(mining_strategy="hardest")
    with pytest.raises(ValueError, match="hard_negative_ratio"):
        HardNegativeMiningLoss(hard_negative_ratio=1.5)
    with pytest.raises(ValueError, match="hard_negative_weight"):
        HardNegativeMiningLoss(hard_negative_weight=0.0)
