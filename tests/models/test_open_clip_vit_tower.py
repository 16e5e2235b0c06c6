"""``model=tiny_open_clip model.architecture.vision_tower=vit``: the open_clip model that open_clip's own trainer
builds from the config clipexp writes (benchmarks/peer_open_clip.py compares the two trainers on it), and
``trainer.decay_embeddings``: the weight-decay groups open_clip's trainer uses."""

from __future__ import annotations

import json

import pytest
import torch

from clipexp.models.loading import load_clip
from clipexp.models.open_clip_family import tiny_open_clip_config

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = dict(projection_dim=64, patch_size=20, vision_hidden_size=64, vision_layers=2, vision_heads=2, vision_intermediate_size=128,
            text_hidden_size=64, text_layers=2, text_heads=2, text_intermediate_size=128, vision_tower="vit")


def _block(width: int, mlp: int) -> int:
    """One pre-norm transformer block: two LayerNorms, in/out attention projections, a two-layer MLP (all with biases)."""
    return 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) + (width * mlp + mlp) + (mlp * width + width)


def test_vit_tower_is_the_model_open_clip_builds_from_the_written_config(tmp_path):
    import open_clip
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    ours, processor = load_clip(None, ARCH, 160, 77, family="open_clip")
    config = tiny_open_clip_config(ARCH, 160, 77)
    (tmp_path / "peer_vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path))
    torch.manual_seed(0)
    theirs = open_clip.create_model("peer_vit", precision="fp32", device="cpu")

    assert isinstance(ours.oc.visual, VisionTransformer)
    a, b = ours.open_clip_state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed: the same initial weights, key by key
    # by hand: vision = patch conv (no bias) + class token + (64 patches + 1) positions + ln_pre + 2 blocks + ln_post + proj;
    # text = 49,408 BPE token embeddings + 77 positions + 2 blocks + ln_final + projection; + the logit scale
    vision = 3 * 64 * 20 * 20 + 64 + (8 * 8 + 1) * 64 + 2 * 64 + 2 * _block(64, 128) + 2 * 64 + 64 * 64
    text = 49408 * 64 + 77 * 64 + 2 * _block(64, 128) + 2 * 64 + 64 * 64
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == vision + text + 1 == 3_390_529
    assert processor.image_processor.crop_size == {"height": 160, "width": 160}


def test_conv_stays_the_default_and_a_wrong_tower_is_one_line():
    from open_clip.modified_resnet import ModifiedResNet

    from clipexp.errors import ModelLoadError

    torch.manual_seed(0)
    conv, _ = load_clip(None, {**ARCH, "vision_tower": None}, 64, 77, family="open_clip")
    assert isinstance(conv.oc.visual, ModifiedResNet)
    with pytest.raises(ModelLoadError) as err:
        load_clip(None, {**ARCH, "vision_tower": "vti"}, 64, 77, family="open_clip")
    assert str(err.value) == "model.architecture.vision_tower='vti' is invalid: conv (a ModifiedResNet) or vit (a ViT of the vision_* sizes)"
    with pytest.raises(ModelLoadError, match=r"^model.architecture.vision_tower='conv' is invalid for a built clip model"):
        load_clip(None, {**ARCH, "vision_tower": "conv"}, 64, 32)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_embeddings_gives_open_clip_trainers_weight_decay_groups(compose_cfg, decay_embeddings):
    """With ``trainer.decay_embeddings=true`` the optimiser decays exactly the parameters open_clip_train's rule decays
    (``main.py``: not ``ndim < 2`` nor ``bn``, ``ln``, ``bias``, ``logit_scale`` in the name); without it, those
    minus the token and position embeddings."""
    from clipexp.losses.contrastive import CLIPContrastiveLoss
    from clipexp.training.optim import build_optimizer

    cfg = compose_cfg("model=tiny_open_clip", "model.architecture.vision_tower=vit", "model.image_resolution=40",
                      "trainer.weight_decay=0.05", f"trainer.decay_embeddings={str(decay_embeddings).lower()}")
    torch.manual_seed(0)
    model, _ = load_clip(None, dict(cfg.model.architecture), 40, 77, family="open_clip")
    optimizer, _ = build_optimizer(cfg.trainer, model, CLIPContrastiveLoss(learnable_temp=True), "cpu", False)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.05) for g in optimizer.param_groups)

    def open_clip_decays(name: str, p: torch.Tensor) -> bool:
        return not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)

    theirs = {name for name, p in model.oc.named_parameters() if open_clip_decays(name, p)}
    ours = {name for name, p in model.oc.named_parameters() if id(p) in decayed}
    embeddings = {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"}
    assert ours == (theirs if decay_embeddings else theirs - embeddings)
    assert embeddings <= theirs and "visual.conv1.weight" in ours and "text_projection" in ours
