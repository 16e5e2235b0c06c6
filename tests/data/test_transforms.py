"""ImageTransform / MultiResolutionImageTransform / TextTransform."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import yaml

from clipexp.config import CONF_DIR, AugmentationConfig, CLIPFinetuningConfig
from clipexp.data import ImageTransform, MultiResolutionImageTransform, TextTransform
from clipexp.data.images import resize_shorter
from clipexp.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def solid(h, w, rgb=(255, 0, 51)):
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).contiguous()


def test_eval_transform_resizes_crops_and_normalises_exactly():
    out = ImageTransform(resolution=16)(solid(40, 24))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    want = [(c / 255 - m) / s for c, m, s in zip((255, 0, 51), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    for ch in range(3):
        assert torch.allclose(out[ch], torch.full((16, 16), want[ch]), atol=1e-5)


def test_eval_transform_accepts_pil_and_tensor_alike():
    t = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    pil = Image.fromarray(t.permute(1, 2, 0).numpy())
    tf = ImageTransform(resolution=20)
    assert torch.equal(tf(pil), tf(t))


def test_mean_std_come_from_the_processor(processor):
    class IP:
        image_mean, image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    class P:
        image_processor = IP()

    out = ImageTransform(resolution=8, processor=P())(solid(8, 8, (255, 255, 255)))
    assert torch.allclose(out, torch.full((3, 8, 8), 2.0))
    tf = ImageTransform(resolution=8, processor=processor)
    assert tf.mean == tuple(processor.image_processor.image_mean)


def test_train_policy_builds_the_domain_ops():
    policy = AugmentationConfig(crop_scale_min=0.85, hflip=True, vflip=True, rotation_degrees=90.0, color_jitter=0.1)
    tf = ImageTransform(resolution=32, augment=True, policy=policy)
    kinds = [type(op) for op in tf.transform.transforms]
    assert kinds == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.ToDtype,
                     v2.RandomRotation, v2.ColorJitter, v2.Normalize]
    assert tf.transform.transforms[0].scale == (0.85, 1.0)
    assert tf.is_random
    out = tf(torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_policy_without_random_ops_equals_eval():
    img = torch.randint(0, 256, (3, 32, 44), dtype=torch.uint8)
    tf = ImageTransform(resolution=32, augment=True, policy={"crop_scale_min": 1.0})
    assert not tf.is_random
    assert torch.equal(tf(img), ImageTransform(resolution=32)(img))
    assert not ImageTransform(resolution=32, augment=False, policy={"hflip": True}).is_random


def test_config_gives_resolution_and_the_domain_policy():
    cfg = CLIPFinetuningConfig(domain="industrial", image_resolution=48)
    tf = ImageTransform(cfg, augment=True)
    assert tf.resolution == 48
    for domain in ("industrial", "medical"):
        conf = yaml.safe_load((CONF_DIR / "domain" / f"{domain}.yaml").read_text())["augmentation"]
        tf = ImageTransform(CLIPFinetuningConfig(domain=domain, image_resolution=48), augment=True)
        assert tf.policy == {k: conf[k] for k in ("crop_scale_min", "hflip", "vflip", "rotation_degrees", "color_jitter")}


def test_augmentation_follows_the_seed():
    tf = ImageTransform(resolution=24, augment=True, policy={"crop_scale_min": 0.5, "hflip": True, "color_jitter": 0.2})
    img = torch.randint(0, 256, (3, 24, 30), dtype=torch.uint8)
    torch.manual_seed(5)
    a = tf(img)
    torch.manual_seed(5)
    b = tf(img)
    c = tf(img)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_multi_resolution_transform():
    cfg = CLIPFinetuningConfig(image_resolution=48)
    tf = MultiResolutionImageTransform(cfg, resolutions=[32, 48, 64], augment=True)
    img = Image.fromarray(torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8).numpy())
    assert tf(img).shape == (3, 48, 48)  # default = config resolution
    assert tf(img, resolution=32).shape == (3, 32, 32)
    assert tf(img, resolution=64).shape == (3, 64, 64)
    assert tf(img, resolution=40).shape == (3, 40, 40)  # built on first use
    assert tf.resolution == 64 and tf.is_random


def test_resize_shorter_side():
    assert resize_shorter(solid(40, 80), 20).shape == (3, 20, 40)
    img = solid(20, 33)
    assert resize_shorter(img, 20) is img


def test_text_transform_pads_truncates_and_masks(processor):
    tt = TextTransform(processor, max_length=16)
    ids, mask = tt.encode(["hi", "a caption much longer than sixteen tokens for sure"])
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.long
    # byte-level vocab: "hi" = BOS h i</w> EOS -> 4 real tokens
    assert mask[0].tolist() == [1] * 4 + [0] * 12
    assert mask[1].tolist() == [1] * 16
    direct = processor.tokenizer(["hi"], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ids[0], direct["input_ids"][0])
    one = tt("hi")
    assert torch.equal(one["input_ids"], ids[0]) and torch.equal(one["attention_mask"], mask[0])


def test_text_augmentation_draws_among_caption_and_templates(processor):
    templates = ["a photo of {}.", "an inspection image of {}."]
    tt = TextTransform(processor, 16, templates, augment=True)
    assert tt.candidates(["my caption"], "scratch") == ["my caption", "a photo of scratch.", "an inspection image of scratch."]
    assert tt.candidates(["my caption"], None) == ["my caption"]
    assert TextTransform(processor, 16, templates).candidates(["c"], "scratch") == ["c"]
    seen = {tuple(tt("my caption", "scratch", generator=torch.Generator().manual_seed(s))["input_ids"].tolist()) for s in range(30)}
    assert len(seen) == 3


def test_max_length_defaults_to_the_tokenizer(processor):
    assert TextTransform(processor).max_length == 16
    with pytest.raises(TypeError):
        ImageTransform(resolution=8)("not an image")
