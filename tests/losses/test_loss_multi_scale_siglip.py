"""MultiScaleLoss and SigLIPLoss: hand-computed values, outputs, learnable parameters."""

from __future__ import annotations

import math

import pytest
import torch

from clipexp.losses.contrastive import CLIPContrastiveLoss
from clipexp.losses.multi_scale import MultiScaleLoss
from clipexp.losses.siglip import SigLIPLoss


def clip_2x2(temperature: float) -> float:
    """Plain CLIP on S2 = [[.8,.6],[.6,.8]]: every row and column is log(1 + e^{-(.8-.6)/T})."""
    return math.log(1 + math.exp(-0.2 / temperature))


# ---- multi-scale ----------------------------------------------------------------------------------

def test_multi_scale_by_hand(s2_pair):
    image, text = s2_pair
    out = MultiScaleLoss(scales=[1.0, 0.5], base_temperature=1.0, scale_weights=[1.0, 3.0])(image, text)
    # T_k = 1 * [1, .5]; weights [1, 3] normalised to [.25, .75]
    expected = 0.25 * clip_2x2(1.0) + 0.75 * clip_2x2(0.5)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["image_to_text_loss"].item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(out["scale_losses"], torch.tensor([clip_2x2(1.0), clip_2x2(0.5)]))
    torch.testing.assert_close(out["temperatures"], torch.tensor([1.0, 0.5]))
    assert out["temperature"].item() == pytest.approx(1.0)


def multi_positive_3x3(temperature: float, lse) -> float:
    """The symmetric multi-positive InfoNCE on S3 with groups (0, 0, 1) at ``temperature``, term by term: samples 0
    and 1 share a caption, so rows 0 and 1 (and columns 0 and 1) each have two positives, whose mean logit is the target."""
    t = temperature
    rows = [lse(.8 / t, .36 / t, .48 / t) - (.8 + .36) / 2 / t,
            lse(.6 / t, .48 / t, .64 / t) - (.6 + .48) / 2 / t,
            lse(.0 / t, .8 / t, .6 / t) - .6 / t]
    columns = [lse(.8 / t, .6 / t, .0 / t) - (.8 + .6) / 2 / t,
               lse(.36 / t, .48 / t, .8 / t) - (.36 + .48) / 2 / t,
               lse(.48 / t, .64 / t, .6 / t) - .6 / t]
    return (sum(rows) / 3 + sum(columns) / 3) / 2


def test_multi_scale_with_repeated_captions_by_hand(s3_pair, lse):
    """Multi-positive targets at every scale: a loss that used them at the first scale only (the diagonal at the
    others) gives 0.25 * this + 0.75 * the plain 3x3 loss at T=0.5, which differs by ~0.2."""
    image, text = s3_pair
    out = MultiScaleLoss(scales=[1.0, 0.5], base_temperature=1.0, scale_weights=[1.0, 3.0])(image, text, group_ids=torch.tensor([7, 7, 2]))
    torch.testing.assert_close(out["scale_losses"], torch.tensor([multi_positive_3x3(1.0, lse), multi_positive_3x3(0.5, lse)]), rtol=1e-6, atol=0)
    assert out["loss"].item() == pytest.approx(0.25 * multi_positive_3x3(1.0, lse) + 0.75 * multi_positive_3x3(0.5, lse), rel=1e-6)


def test_multi_scale_unnormalised_weights(s2_pair):
    image, text = s2_pair
    out = MultiScaleLoss(scales=[1.0, 0.5], base_temperature=1.0, scale_weights=[1.0, 3.0],
                         normalize_weights=False)(image, text)
    assert out["loss"].item() == pytest.approx(clip_2x2(1.0) + 3 * clip_2x2(0.5), rel=1e-6)


def test_multi_scale_default_weights_and_temperature_setter(s2_pair):
    image, text = s2_pair
    loss_fn = MultiScaleLoss()  # scales [1, .75, .5], weights [1, .75, .5] / 2.25
    assert loss_fn.scale_weights == pytest.approx([1 / 2.25, 0.75 / 2.25, 0.5 / 2.25])
    loss_fn.temperature = 0.5
    assert loss_fn.base_temperature == 0.5
    out = loss_fn(image, text)
    torch.testing.assert_close(out["temperatures"], torch.tensor([0.5, 0.375, 0.25]))
    expected = (clip_2x2(0.5) + 0.75 * clip_2x2(0.375) + 0.5 * clip_2x2(0.25)) / 2.25
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_single_scale_is_contrastive(random_batch):
    image, text, groups, _ = random_batch
    out = MultiScaleLoss(scales=[1.0], scale_weights=[1.0])(image, text, group_ids=groups)
    assert torch.equal(out["loss"], CLIPContrastiveLoss()(image, text, group_ids=groups)["loss"])


def test_multi_scale_validation():
    with pytest.raises(ValueError, match="one weight per scale"):
        MultiScaleLoss(scales=[1.0, 0.5], scale_weights=[1.0])
    with pytest.raises(ValueError, match="scales"):
        MultiScaleLoss(scales=[1.0, 0.0], scale_weights=[1.0, 1.0])


# ---- SigLIP ---------------------------------------------------------------------------------------

def test_siglip_by_hand(s2_pair):
    image, text = s2_pair
    out = SigLIPLoss()(image, text)  # t = 10, b = -10
    # logits = 10 * S - 10 = [[-2, -4], [-4, -2]]; -log sigmoid(z * x) = log(1 + e^{-z x})
    #   diagonal (z = +1, x = -2): log(1 + e^2); off-diagonal (z = -1, x = -4): log(1 + e^-4); / B = 2
    expected = (2 * math.log(1 + math.exp(2)) + 2 * math.log(1 + math.exp(-4))) / 2
    for key in ("loss", "image_to_text_loss", "text_to_image_loss"):
        assert out[key].item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(out["logits"], torch.tensor([[-2.0, -4.0], [-4.0, -2.0]]))
    assert out["temperature"].item() == pytest.approx(0.1)
    assert out["bias"].item() == -10.0


def test_siglip_multi_positive(s2_pair):
    image, text = s2_pair
    out = SigLIPLoss()(image, text, group_ids=torch.tensor([3, 3]))
    # one group: all four pairs are positives: 2 log(1 + e^2) + 2 log(1 + e^4), / 2
    expected = (2 * math.log(1 + math.exp(2)) + 2 * math.log(1 + math.exp(4))) / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    plain = SigLIPLoss(multi_positive=False)(image, text, group_ids=torch.tensor([3, 3]))
    assert plain["loss"].item() == pytest.approx(SigLIPLoss()(image, text)["loss"].item())


def test_siglip_learnable_parameters(random_batch):
    image, text, groups, _ = random_batch
    loss_fn = SigLIPLoss()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss_fn.logit_bias.item() == -10.0
    loss_fn(image, text, group_ids=groups)["loss"].backward()
    for param in (loss_fn.logit_scale, loss_fn.logit_bias):
        assert torch.isfinite(param.grad) and param.grad.abs() > 0
    # the bias gradient is sum_ij (sigmoid(x_ij) - [z_ij = 1]) / B; at b = -10 it is about -(#positives)/B
    n_pos = int((groups[:, None] == groups[None, :]).sum())
    assert loss_fn.logit_bias.grad.item() == pytest.approx(-n_pos / 8, abs=0.05)
    loss_fn.temperature = 0.05
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(20.0))


def test_siglip_fixed_parameters():
    loss_fn = SigLIPLoss(temperature=0.1, learnable_temp=False, learnable_bias=False, init_bias=-5.0)
    assert list(loss_fn.parameters()) == []
    image, text = torch.eye(2), torch.eye(2)
    # logits = 10 * I - 5 = [[5, -5], [-5, 5]]: every term log(1 + e^-5); 4 terms / 2
    assert loss_fn(image, text)["loss"].item() == pytest.approx(2 * math.log(1 + math.exp(-5)), rel=1e-6)
