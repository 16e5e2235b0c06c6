"""Contract shared by every loss, each loss built from its YAML (conf/loss/*.yaml), and gather_with_grad in a single process."""

from __future__ import annotations

import pytest
import torch

from builders import LOSS_OPTIONS, loss_from_conf
from clipexp.losses.contrastive import CLIPContrastiveLoss
from clipexp.losses.distributed import gather_with_grad, world_size
from clipexp.losses.domain_specific import DomainSpecificLoss
from clipexp.losses.hard_negative import HardNegativeMiningLoss
from clipexp.losses.multi_scale import MultiScaleLoss
from clipexp.losses.siglip import SigLIPLoss
from clipexp.names import DOMAINS, MINING_STRATEGIES

FACTORIES = {
    "contrastive": lambda: CLIPContrastiveLoss(learnable_temp=True),
    **{f"hard_negative-{s}": (lambda s=s: HardNegativeMiningLoss(mining_strategy=s, learnable_temp=True))
       for s in MINING_STRATEGIES},
    **{f"domain-{d}": (lambda d=d: DomainSpecificLoss(d, domain_weight=1.5, learnable_temp=True)) for d in DOMAINS},
    "multi_scale": lambda: MultiScaleLoss(learnable_temp=True),
    "siglip": lambda: SigLIPLoss(),
}
REQUIRED = ("loss", "image_to_text_loss", "text_to_image_loss", "logits", "temperature")


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_contract_and_finite_gradients(random_batch, name):
    image, text, groups, labels = random_batch
    loss_fn = FACTORIES[name]()
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    out = loss_fn(image, text, group_ids=groups, labels=labels)
    for key in REQUIRED:
        assert key in out
    for key in ("loss", "image_to_text_loss", "text_to_image_loss", "temperature"):
        assert out[key].dim() == 0 and out[key].dtype == torch.float32
    assert out["logits"].shape == (8, 8) and not out["logits"].requires_grad
    torch.testing.assert_close(out["loss"], (out["image_to_text_loss"] + out["text_to_image_loss"]) / 2)
    out["loss"].backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert image.grad.abs().sum() > 0
    assert loss_fn.logit_scale.grad is not None and torch.isfinite(loss_fn.logit_scale.grad)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_permutation_invariance(random_batch, name):
    image, text, groups, labels = random_batch
    loss_fn = FACTORIES[name]()
    perm = torch.tensor([5, 2, 7, 0, 3, 1, 6, 4])
    out = loss_fn(image, text, group_ids=groups, labels=labels)
    permuted = loss_fn(image[perm], text[perm], group_ids=groups[perm], labels=labels[perm])
    for key in ("loss", "image_to_text_loss", "text_to_image_loss"):
        torch.testing.assert_close(out[key], permuted[key])
    torch.testing.assert_close(permuted["logits"], out["logits"][perm][:, perm])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_temperature_setter(name):
    loss_fn = FACTORIES[name]()
    loss_fn.temperature = 0.05
    assert loss_fn.temperature == pytest.approx(0.05)
    image = torch.eye(4)
    assert loss_fn(image, image)["temperature"].item() == pytest.approx(0.05)


def test_each_loss_is_its_yaml_instantiated_with_every_argument_passed():
    """conf/loss/<name>.yaml names the class and holds its arguments: each one reaches the constructor."""
    built = {
        "contrastive": loss_from_conf("contrastive", temperature=0.05, learnable_temp=True, multi_positive=False),
        "hard_negative": loss_from_conf("hard_negative", temperature=0.05, hard_negative_ratio=0.25, mining_strategy="weighted",
                                        hard_negative_weight=3.0),
        "domain_specific": loss_from_conf("domain_specific", domain="medical", loss_weight=2.0, temperature=0.05),
        "multi_scale": loss_from_conf("multi_scale", base_temperature=0.05, scales=[1.0, 0.5], scale_weights=[2.0, 1.0],
                                      normalize_weights=False),
        "siglip": loss_from_conf("siglip", temperature=0.05, init_bias=-5.0),
    }
    assert sorted(built) == LOSS_OPTIONS and all(loss_fn.name == name for name, loss_fn in built.items())
    assert type(built["contrastive"]) is CLIPContrastiveLoss
    assert built["contrastive"].multi_positive is False and built["contrastive"].learnable_temp

    hard = built["hard_negative"]
    assert isinstance(hard, HardNegativeMiningLoss)
    assert (hard.hard_negative_ratio, hard.mining_strategy, hard.hard_negative_weight) == (0.25, "weighted", 3.0)

    domain = built["domain_specific"]
    assert isinstance(domain, DomainSpecificLoss)
    assert (domain.domain, domain.domain_weight) == ("medical", 2.0)  # from the domain section, as the run composes it

    multi = built["multi_scale"]
    assert isinstance(multi, MultiScaleLoss)
    assert multi.scales == [1.0, 0.5] and multi.scale_weights == [2.0, 1.0] and not multi.normalize_weights
    assert multi.base_temperature == pytest.approx(0.05)

    siglip = built["siglip"]
    assert isinstance(siglip, SigLIPLoss)
    assert siglip.logit_bias.item() == -5.0 and siglip.temperature == pytest.approx(0.05)

    for loss_fn in built.values():
        assert loss_fn.temperature == pytest.approx(0.05)


def test_each_yaml_holds_every_argument_of_its_class_with_the_class_default():
    """A loss's YAML documents all of its arguments once, with the values the class itself defaults to (so a loss built
    in Python and the same loss chosen on the command line are the same loss)."""
    import inspect

    from builders import loss_config

    for name in LOSS_OPTIONS:
        config = loss_config(name)
        cls = type(loss_from_conf(name))
        params = {p.name: p.default for p in list(inspect.signature(cls.__init__).parameters.values())[1:]}
        assert set(config) - {"_target_"} == set(params), name
        for key, default in params.items():
            if key not in ("domain", "domain_weight"):  # (the domain's, interpolated)
                assert config[key] == (list(default) if isinstance(default, tuple) else default), (name, key)


def test_gather_with_grad_is_identity_in_one_process():
    assert world_size() == 1
    features = torch.randn(4, 3, requires_grad=True)
    gathered = gather_with_grad(features)
    assert gathered is features
    gathered.sum().backward()
    assert torch.equal(features.grad, torch.ones(4, 3))
    ids = torch.tensor([0, 0, 1, 2])
    assert gather_with_grad(ids) is ids


def test_gather_with_grad_is_identity_with_a_world_of_one(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert world_size() == 1
        features = torch.randn(4, 3, requires_grad=True)
        assert gather_with_grad(features) is features
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_restores_the_temperature(name):
    trained = FACTORIES[name]()
    trained.temperature = 0.03
    fresh = FACTORIES[name]()
    fresh.load_state_dict(trained.state_dict())
    assert fresh.temperature == pytest.approx(0.03)


def test_state_dict_restores_a_fixed_temperature():
    fixed = CLIPContrastiveLoss(temperature=0.07)
    fixed.temperature = 0.02
    restored = CLIPContrastiveLoss(temperature=0.07)
    restored.load_state_dict(fixed.state_dict())
    assert restored.temperature == 0.02
