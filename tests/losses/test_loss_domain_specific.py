"""DomainSpecificLoss: each domain's adjustment does what its docstring sentence says."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipexp.losses.contrastive import CLIPContrastiveLoss
from clipexp.losses.domain_specific import DomainSpecificLoss
from clipexp.losses.targets import class_balanced_weights

# S3 = [[.8,.36,.48],[.6,.48,.64],[0,.8,.6]] (see conftest), T = 1 throughout the hand computations.


@pytest.mark.parametrize("with_groups", [True, False])
def test_general_is_exactly_contrastive(random_batch, with_groups):
    image, text, groups, labels = random_batch
    group_ids = groups if with_groups else None
    out = DomainSpecificLoss("general")(image, text, group_ids=group_ids, labels=labels)
    reference = CLIPContrastiveLoss()(image, text, group_ids=group_ids)
    for key in ("loss", "image_to_text_loss", "text_to_image_loss", "logits"):
        assert torch.equal(out[key], reference[key])


# ---- medical: label smoothing eps = min(0.1 * domain_weight, 0.99) ---------------------------------

def test_medical_smoothing_strength():
    assert DomainSpecificLoss("medical", domain_weight=1.5).label_smoothing == pytest.approx(0.15)
    assert DomainSpecificLoss("medical", domain_weight=50.0).label_smoothing == pytest.approx(0.99)
    assert DomainSpecificLoss("industrial", domain_weight=1.5).label_smoothing == 0.0


def test_medical_without_groups_is_label_smoothed_cross_entropy(random_batch):
    image, text, _, _ = random_batch
    out = DomainSpecificLoss("medical", domain_weight=1.5)(image, text)
    labels = torch.arange(8)
    logits = out["logits"]
    expected = (F.cross_entropy(logits, labels, label_smoothing=0.15)
                + F.cross_entropy(logits.t(), labels, label_smoothing=0.15)) / 2
    assert torch.equal(out["loss"], expected)
    assert out["loss"] > CLIPContrastiveLoss()(image, text)["loss"]


def test_medical_smoothed_multi_positive_targets_by_hand(s3_pair, lse):
    image, text = s3_pair
    out = DomainSpecificLoss("medical", temperature=1.0, domain_weight=1.5)(
        image, text, group_ids=torch.tensor([0, 0, 1])
    )
    # eps = 0.15, B = 3: targets = 0.85 * row-normalised mask + 0.05
    #   rows/cols 0 and 1 (group {0,1}): [0.475, 0.475, 0.05]; row/col 2: [0.05, 0.05, 0.9]
    i2t = (
        lse(0.8, 0.36, 0.48) - (0.475 * 0.8 + 0.475 * 0.36 + 0.05 * 0.48)
        + lse(0.6, 0.48, 0.64) - (0.475 * 0.6 + 0.475 * 0.48 + 0.05 * 0.64)
        + lse(0.0, 0.8, 0.6) - (0.05 * 0.0 + 0.05 * 0.8 + 0.9 * 0.6)
    ) / 3
    t2i = (
        lse(0.8, 0.6, 0.0) - (0.475 * 0.8 + 0.475 * 0.6 + 0.05 * 0.0)
        + lse(0.36, 0.48, 0.8) - (0.475 * 0.36 + 0.475 * 0.48 + 0.05 * 0.8)
        + lse(0.48, 0.64, 0.6) - (0.05 * 0.48 + 0.05 * 0.64 + 0.9 * 0.6)
    ) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)


# ---- industrial: inverse-frequency ** domain_weight, mean 1 ------------------------------------------

def test_class_balanced_weights():
    # balanced labels: all ones
    assert torch.equal(class_balanced_weights(torch.tensor([0, 1, 0, 1])), torch.ones(4))
    # labels 0,0,0,1: frequencies 3/4, 1/4 -> 1/f = 4/3, 4 -> mean (3 * 4/3 + 4) / 4 = 2 -> 2/3, 2
    weights = class_balanced_weights(torch.tensor([0, 0, 0, 1]))
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0]))
    # the rare class now counts as much as the nominal class (2 = 3 * 2/3)
    assert weights[3].item() == pytest.approx(weights[:3].sum().item())
    # power 0: no re-weighting; power 2: 1/f^2 = 16/9, 16 -> mean 16/3 -> 1/3, 3
    assert torch.equal(class_balanced_weights(torch.tensor([0, 0, 0, 1]), 0.0), torch.ones(4))
    torch.testing.assert_close(class_balanced_weights(torch.tensor([0, 0, 0, 1]), 2.0),
                               torch.tensor([1 / 3, 1 / 3, 1 / 3, 3.0]))


def test_industrial_weighted_loss_by_hand(s3_pair, lse):
    image, text = s3_pair
    out = DomainSpecificLoss("industrial", temperature=1.0)(image, text, labels=torch.tensor([0, 0, 1]))
    # frequencies 2/3, 2/3, 1/3 -> 1/f = 1.5, 1.5, 3 -> mean 2 -> weights 0.75, 0.75, 1.5 (sum 3)
    r = [lse(0.8, 0.36, 0.48) - 0.8, lse(0.6, 0.48, 0.64) - 0.48, lse(0.0, 0.8, 0.6) - 0.6]
    c = [lse(0.8, 0.6, 0.0) - 0.8, lse(0.36, 0.48, 0.8) - 0.48, lse(0.48, 0.64, 0.6) - 0.6]
    i2t = (0.75 * r[0] + 0.75 * r[1] + 1.5 * r[2]) / 3
    t2i = (0.75 * c[0] + 0.75 * c[1] + 1.5 * c[2]) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)
    # labels fall back to group_ids (here without multi-positive targets, to isolate the weighting)
    fallback = DomainSpecificLoss("industrial", temperature=1.0, multi_positive=False)(
        image, text, group_ids=torch.tensor([0, 0, 1])
    )
    assert fallback["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_industrial_balanced_or_unlabelled_equals_contrastive(random_batch):
    image, text, groups, _ = random_batch
    loss_fn = DomainSpecificLoss("industrial", domain_weight=1.0)
    balanced = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert torch.equal(loss_fn(image, text, group_ids=groups, labels=balanced)["loss"],
                       CLIPContrastiveLoss()(image, text, group_ids=groups)["loss"])
    assert torch.equal(loss_fn(image, text)["loss"], CLIPContrastiveLoss()(image, text)["loss"])


def test_industrial_up_weights_the_rare_class(random_batch):
    image, text, _, _ = random_batch
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1])  # one rare "defect" sample: the last one
    loss_fn = DomainSpecificLoss("industrial", domain_weight=1.0)
    image = image.clone().requires_grad_()
    loss_fn(image, text, labels=labels)["loss"].backward()
    weighted_grad = image.grad[7].norm()
    image.grad = None
    CLIPContrastiveLoss()(image, text)["loss"].backward()
    plain_grad = image.grad[7].norm()
    # weights: 1/f = 8/7 (x7) and 8 -> mean 2 -> 4/7 and 4; the defect row counts 4x, ~4x plain's
    # (the gradient also has column terms, so compare loosely)
    assert weighted_grad > 2 * plain_grad


# ---- scientific: decoupled contrastive learning --------------------------------------------------

def dcl_row(pos: float, negs, lam: float) -> float:
    """log(sum_neg e^l + (1 - lam) e^pos) - pos."""
    return math.log(sum(math.exp(n) for n in negs) + (1 - lam) * math.exp(pos)) - pos


@pytest.mark.parametrize("domain_weight, lam", [(1.0, 1.0), (0.5, 0.5), (3.0, 1.0)])
def test_scientific_removes_positive_from_denominator(s3_pair, domain_weight, lam):
    image, text = s3_pair
    loss_fn = DomainSpecificLoss("scientific", temperature=1.0, domain_weight=domain_weight)
    assert loss_fn.decoupling == lam
    out = loss_fn(image, text)
    i2t = (dcl_row(0.8, [0.36, 0.48], lam) + dcl_row(0.48, [0.6, 0.64], lam) + dcl_row(0.6, [0.0, 0.8], lam)) / 3
    t2i = (dcl_row(0.8, [0.6, 0.0], lam) + dcl_row(0.48, [0.36, 0.8], lam) + dcl_row(0.6, [0.48, 0.64], lam)) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-6)


def test_scientific_multi_positive_by_hand(s3_pair):
    image, text = s3_pair
    out = DomainSpecificLoss("scientific", temperature=1.0)(image, text, group_ids=torch.tensor([0, 0, 1]))
    # rows 0, 1: positives {0, 1}, negative {2}: log(e^{s_i2}) - mean of the two positives
    i2t = ((0.48 - (0.8 + 0.36) / 2) + (0.64 - (0.6 + 0.48) / 2) + dcl_row(0.6, [0.0, 0.8], 1.0)) / 3
    t2i = ((0.0 - (0.8 + 0.6) / 2) + (0.8 - (0.36 + 0.48) / 2) + dcl_row(0.6, [0.48, 0.64], 1.0)) / 3
    assert out["image_to_text_loss"].item() == pytest.approx(i2t, rel=1e-5)
    assert out["text_to_image_loss"].item() == pytest.approx(t2i, rel=1e-5)


def test_scientific_gradient_finite_and_single_group_batch_is_zero(random_batch):
    image, text, groups, _ = random_batch
    image = image.clone().requires_grad_()
    out = DomainSpecificLoss("scientific")(image, text, group_ids=groups)
    out["loss"].backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    # nothing to contrast: every row has no negative -> 0, not -inf
    same = DomainSpecificLoss("scientific")(image, text, group_ids=torch.zeros(8, dtype=torch.long))
    assert same["loss"].item() == 0.0


def test_scientific_zero_weight_is_contrastive(random_batch):
    image, text, groups, _ = random_batch
    torch.testing.assert_close(
        DomainSpecificLoss("scientific", domain_weight=0.0)(image, text, group_ids=groups)["loss"],
        CLIPContrastiveLoss()(image, text, group_ids=groups)["loss"],
    )


def test_unknown_domain():
    with pytest.raises(ValueError, match="general, medical, industrial, scientific"):
        DomainSpecificLoss("legal")
