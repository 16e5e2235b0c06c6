"""CLIPContrastiveLoss: hand-computed values, multi-positive targets, textbook equality, temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipexp.losses.contrastive import CLIPContrastiveLoss
from clipexp.losses.targets import positive_mask, target_distribution


def test_plain_clip_matches_hand_computation(s3_pair, lse):
    image, text = s3_pair
    out = CLIPContrastiveLoss(temperature=1.0)(image, text)
    # S = [[.8,.36,.48],[.6,.48,.64],[0,.8,.6]], T = 1; row loss = log sum_j e^{s_ij} - s_ii
    i2t = (lse(0.8, 0.36, 0.48) - 0.8 + lse(0.6, 0.48, 0.64) - 0.48 + lse(0.0, 0.8, 0.6) - 0.6) / 3
    # columns: [.8,.6,0], [.36,.48,.8], [.48,.64,.6]
    t2i = (lse(0.8, 0.6, 0.0) - 0.8 + lse(0.36, 0.48, 0.8) - 0.48 + lse(0.48, 0.64, 0.6) - 0.6) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert out["temperature"].item() == pytest.approx(1.0)
    assert torch.allclose(out["logits"], image @ text.t())


def test_temperature_scales_logits(s2_pair):
    image, text = s2_pair
    out = CLIPContrastiveLoss(temperature=0.5)(image, text)
    # S = [[.8,.6],[.6,.8]] / 0.5 = [[1.6,1.2],[1.2,1.6]]: every row/col = log(e^1.6+e^1.2) - 1.6 = log(1+e^-0.4)
    expected = math.log(1 + math.exp(-0.4))
    for key in ("loss", "image_to_text_loss", "text_to_image_loss"):
        assert out[key].item() == pytest.approx(expected, rel=1e-6)
    assert out["temperature"].item() == pytest.approx(0.5)


def test_multi_positive_targets_on_duplicate_groups(s3_pair, lse):
    image, text = s3_pair
    groups = torch.tensor([0, 0, 1])
    out = CLIPContrastiveLoss(temperature=1.0)(image, text, group_ids=groups)
    # samples 0 and 1 share a group: targets of rows/cols 0 and 1 are [.5, .5, 0]
    i2t = (
        lse(0.8, 0.36, 0.48) - (0.8 + 0.36) / 2
        + lse(0.6, 0.48, 0.64) - (0.6 + 0.48) / 2
        + lse(0.0, 0.8, 0.6) - 0.6
    ) / 3
    t2i = (
        lse(0.8, 0.6, 0.0) - (0.8 + 0.6) / 2
        + lse(0.36, 0.48, 0.8) - (0.36 + 0.48) / 2
        + lse(0.48, 0.64, 0.6) - 0.6
    ) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_target_distribution_is_row_normalised_mask():
    mask = positive_mask(torch.tensor([0, 0, 1]), 3, torch.device("cpu"))
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(target_distribution(mask), expected)
    assert positive_mask(torch.tensor([0, 0, 1]), 3, torch.device("cpu"), multi_positive=False) is None
    assert positive_mask(None, 3, torch.device("cpu")) is None


def textbook_clip(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@pytest.mark.parametrize("multi_positive, with_groups", [(False, True), (True, False), (False, False)])
def test_without_multi_positive_is_textbook_clip(random_batch, multi_positive, with_groups):
    image, text, groups, _ = random_batch
    loss_fn = CLIPContrastiveLoss(temperature=0.07, multi_positive=multi_positive)
    out = loss_fn(image, text, group_ids=groups if with_groups else None)
    # bit-for-bit the textbook loss on the same logits ...
    assert torch.equal(out["loss"], textbook_clip(out["logits"]))
    # ... and those logits are image @ text.T / T
    torch.testing.assert_close(out["loss"], textbook_clip(image @ text.t() / 0.07))


def test_unique_groups_equal_plain_clip(random_batch):
    image, text, _, _ = random_batch
    loss_fn = CLIPContrastiveLoss(temperature=0.07)
    torch.testing.assert_close(loss_fn(image, text, group_ids=torch.arange(8))["loss"], loss_fn(image, text)["loss"])


def test_duplicate_pairs_are_an_optimum_not_a_penalty():
    # samples 0 and 1 are the same pair (same image, same caption) -> same group
    base = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    loss_fn = CLIPContrastiveLoss(temperature=0.1)
    grouped_image = base.clone().requires_grad_()
    grouped = loss_fn(grouped_image, base, group_ids=torch.tensor([0, 0, 1]))["loss"]
    # logits [[10,10,0],[10,10,0],[0,0,10]]; rows/cols 0,1: targets [.5,.5,0] -> log(2 + e^-10);
    # row/col 2: log(1 + 2 e^-10)
    expected = (2 * math.log(2 + math.exp(-10)) + math.log(1 + 2 * math.exp(-10))) / 3
    assert grouped.item() == pytest.approx(expected, rel=1e-5)
    grouped.backward()
    # softmax already equals the targets: (almost) no gradient separating the duplicates
    assert grouped_image.grad.abs().max() < 1e-3


def test_learnable_temperature_gets_gradient_and_setter_reinitialises(random_batch):
    image, text, groups, _ = random_batch
    loss_fn = CLIPContrastiveLoss(temperature=0.07, learnable_temp=True)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    out = loss_fn(image.requires_grad_(), text, group_ids=groups)
    out["loss"].backward()
    assert torch.isfinite(loss_fn.logit_scale.grad) and loss_fn.logit_scale.grad.abs() > 0
    assert torch.isfinite(image.grad).all()

    loss_fn.temperature = 0.05
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(20.0))
    assert loss_fn.temperature == pytest.approx(0.05)


def test_learnable_scale_is_clamped_at_100(random_batch):
    image, text, _, _ = random_batch
    loss_fn = CLIPContrastiveLoss(temperature=0.005, learnable_temp=True)  # 1/T = 200 > 100
    out = loss_fn(image, text)
    assert out["temperature"].item() == pytest.approx(0.01)
    assert loss_fn.temperature == pytest.approx(0.01)
    out["loss"].backward()
    assert loss_fn.logit_scale.grad.item() == 0.0  # clamped: no gradient, as in CLIP


def test_fixed_temperature_setter():
    loss_fn = CLIPContrastiveLoss(temperature=0.07)
    assert list(loss_fn.parameters()) == []
    loss_fn.temperature = 0.5
    image, text = torch.eye(2), torch.eye(2)
    out = loss_fn(image, text)
    # logits [[2,0],[0,2]]: log(1 + e^-2)
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        loss_fn.temperature = 0.0


def test_model_logit_scale(random_batch):
    image, text, groups, _ = random_batch
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    loss_fn = CLIPContrastiveLoss(use_model_logit_scale=True, learnable_temp=True)
    assert list(loss_fn.parameters()) == []  # the model owns the scale
    out = loss_fn(image, text, group_ids=groups, logit_scale=logit_scale)
    reference = CLIPContrastiveLoss(temperature=0.07)(image, text, group_ids=groups)
    torch.testing.assert_close(out["loss"], reference["loss"])
    out["loss"].backward()
    assert torch.isfinite(logit_scale.grad) and logit_scale.grad.abs() > 0
    with torch.no_grad():
        logit_scale.fill_(math.log(500.0))
    assert loss_fn(image, text, logit_scale=logit_scale)["temperature"].item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="logit_scale"):
        loss_fn(image, text)


def test_low_precision_inputs_give_float32_logits(random_batch):
    image, text, groups, _ = random_batch
    loss_fn = CLIPContrastiveLoss()
    out = loss_fn(image.bfloat16(), text.bfloat16(), group_ids=groups)
    assert out["logits"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    reference = loss_fn(image.bfloat16().float(), text.bfloat16().float(), group_ids=groups)
    assert torch.equal(out["loss"], reference["loss"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(image, text, group_ids=groups)
    assert out["logits"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], loss_fn(image, text, group_ids=groups)["loss"])


def test_bad_inputs_raise_one_line_errors():
    loss_fn = CLIPContrastiveLoss()
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.eye(3), torch.eye(2))
    with pytest.raises(ValueError, match="group_ids"):
        loss_fn(torch.eye(3), torch.eye(3), group_ids=torch.tensor([0, 1]))
