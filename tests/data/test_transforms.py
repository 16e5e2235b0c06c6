"""ImageTransform / MultiResolutionImageTransform / TextTransform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clipexp.config.schema import AugmentationConfig
from clipexp.config.notes import CLIPFinetuningConfig
from clipexp.data.augment import GRAY_WEIGHTS, AugmentParams, color_matrix
from clipexp.data.images import resize_shorter
from clipexp.data.normalize import PixelNormalizer
from clipexp.data.text import TextTransform
from clipexp.data.transforms import ImageTransform, MultiResolutionImageTransform
from clipexp.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from clipexp.paths import CONF_DIR


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


def test_train_policy_lists_the_domain_ops():
    policy = AugmentationConfig(crop_scale_min=0.85, hflip=True, vflip=True, rotation_degrees=90.0, color_jitter=0.1)
    tf = ImageTransform(resolution=32, augment=True, policy=policy)
    assert tf.ops == ("random_resized_crop", "hflip", "vflip", "rotation", "color_jitter") and tf.is_random
    out = tf(torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert ImageTransform(resolution=32, augment=True, policy={"crop_scale_min": 1.0, "vflip": True}).ops == ("vflip",)


def gradient_image(h=32, w=32):
    """A smooth uint8 image (bilinear resampling of it is accurate to well under one level)."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([40 + 5 * x, 40 + 5 * y, 120 + 2 * (x - y)]).round().to(torch.uint8)


def params(r, **kw):
    return AugmentParams(**{"top": 0, "left": 0, "height": r, "width": r, **kw})


def test_flips_and_quarter_turns_are_exact():
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    tf = ImageTransform(resolution=16, output="uint8")
    assert torch.equal(tf.apply(img, params(16, hflip=True)), img.flip(-1))
    assert torch.equal(tf.apply(img, params(16, vflip=True)), img.flip(-2))
    assert torch.equal(tf.apply(img, params(16, hflip=True, vflip=True)), img.flip(-1, -2))
    # counter-clockwise, as torchvision's rotate
    assert torch.equal(tf.apply(img, params(16, angle=90.0)), torch.rot90(img, 1, dims=(1, 2)))
    assert torch.equal(tf.apply(img, params(16, angle=90.0)), TF.rotate(img, 90.0))
    # a box of the output size is a plain crop
    big = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    assert torch.equal(tf.apply(big, AugmentParams(3, 5, 16, 16)), big[:, 3:19, 5:21])


def test_crop_resize_and_rotation_match_torchvision_bilinear():
    img = gradient_image(32, 40)
    tf = ImageTransform(resolution=24, output="uint8")
    p = AugmentParams(top=4, left=6, height=26, width=29)
    ours = tf.apply(img, p).float()
    ref = TF.resized_crop(img.float(), 4, 6, 26, 29, [24, 24], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
    assert (ours - ref).abs().max() <= 1.0  # uint8 rounding
    # rotation by 10 degrees about the centre (the interior: the corners differ by design, see the module doc)
    square = gradient_image(24, 24)
    ours = tf.apply(square, params(24, angle=10.0)).float()
    ref = TF.rotate(square.float(), 10.0, interpolation=v2.InterpolationMode.BILINEAR)
    assert (ours - ref)[:, 6:18, 6:18].abs().max() <= 1.0


def test_one_warp_fills_rotated_corners_from_around_the_crop():
    img = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    tf = ImageTransform(resolution=20, output="uint8")
    inner = tf.apply(img, AugmentParams(10, 10, 20, 20, angle=30.0))  # the box has image all around it
    assert inner.min() == 200
    edge = tf.apply(img, AugmentParams(0, 0, 40, 40, angle=30.0))  # the whole image: corners leave it -> black
    assert edge[:, 0, 0].tolist() == [0, 0, 0] and edge[:, 10, 10].tolist() == [200, 200, 200]


def test_rgb_warp_equals_warping_each_channel_alone():
    """uint8 RGB is warped as RGBA (OpenCV vectorises 4 channels only): bit-identical to warping each
    channel on its own, for a scaled crop, flips and a rotation, and after an INTER_AREA shrink."""
    import numpy as np

    from clipexp.data.augment import warp

    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=g).permute(1, 2, 0).contiguous().numpy()
    cases = [AugmentParams(3, 5, 31, 37, hflip=True, angle=7.5), AugmentParams(0, 2, 40, 50, vflip=True, angle=-3.0),
             AugmentParams(1, 1, 24, 24, angle=12.0)]
    for p in cases:
        whole = warp(src, p, 20)
        per_channel = np.stack([warp(np.ascontiguousarray(src[..., c : c + 1]), p, 20) for c in range(3)], -1)
        assert whole.shape == (20, 20, 3) and whole.dtype == np.uint8
        assert np.array_equal(whole, per_channel.reshape(whole.shape))


def test_large_shrink_is_anti_aliased():
    stripes = torch.zeros(3, 16, 64, dtype=torch.uint8)
    stripes[:, :, ::2] = 255  # one-pixel stripes: bilinear sampling every 4th column would see only 255s or 0s
    out = ImageTransform(resolution=16, output="uint8").apply(stripes, AugmentParams(0, 0, 16, 64))
    assert out.shape == (3, 16, 16) and (out.float() - 127.5).abs().max() <= 1.0


def test_color_matrix_by_hand():
    w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
    gray = color_matrix(1.0, 1.0, 0.0, 0.0)  # saturation 0: every channel becomes the gray level
    assert torch.allclose(torch.from_numpy(gray[:, :3]).double(), w.expand(3, 3), atol=1e-7) and not gray[:, 3].any()
    assert torch.allclose(torch.from_numpy(color_matrix(2.0, 1.0, 1.0, 50.0)).double(),
                          torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]], dtype=torch.float64))
    # contrast 0.5 around mean gray 100: x -> 0.5 x + 50
    assert torch.allclose(torch.from_numpy(color_matrix(1.0, 0.5, 1.0, 100.0)).double(),
                          torch.tensor([[0.5, 0, 0, 50.0], [0, 0.5, 0, 50.0], [0, 0, 0.5, 50.0]], dtype=torch.float64))


def test_color_jitter_matches_torchvision_in_any_order():
    img = torch.randint(70, 180, (3, 16, 16), dtype=torch.uint8)  # mid-range: no clamping on the way
    tf = ImageTransform(resolution=16, output="uint8")
    b, c, s = 1.08, 0.93, 1.1
    ours = tf.apply(img, params(16, brightness=b, contrast=c, saturation=s)).float() / 255
    x = img.float() / 255
    orders = [(TF.adjust_brightness, b), (TF.adjust_contrast, c), (TF.adjust_saturation, s)]
    for order in (orders, orders[::-1], [orders[1], orders[2], orders[0]]):
        ref = x
        for fn, f in order:
            ref = fn(ref, f)
        assert (ours - ref).abs().max() <= 1.01 / 255


def test_sampled_parameters_stay_in_the_policy():
    tf = ImageTransform(resolution=32, augment=True,
                        policy={"crop_scale_min": 0.6, "hflip": True, "vflip": False, "rotation_degrees": 15.0, "color_jitter": 0.2})
    torch.manual_seed(0)
    draws = [tf.sample(40, 50) for _ in range(300)]
    for p in draws:
        assert 0 <= p.top and p.top + p.height <= 40 and 0 <= p.left and p.left + p.width <= 50
        assert 0.6 - 0.05 <= p.height * p.width / 2000 <= 1.0 and 3 / 4 - 0.05 <= p.width / p.height <= 4 / 3 + 0.05
        assert -15 <= p.angle <= 15 and not p.vflip
        assert all(0.8 <= f <= 1.2 for f in (p.brightness, p.contrast, p.saturation))
    assert 100 < sum(p.hflip for p in draws) < 200
    assert ImageTransform(resolution=32).sample(40, 50) == AugmentParams(4, 9, 32, 32)  # eval: the centre crop


def test_uint8_output_normalised_per_batch_equals_float_output():
    img = torch.randint(0, 256, (3, 30, 36), dtype=torch.uint8)
    kw = dict(resolution=24, augment=True, policy={"crop_scale_min": 0.7, "hflip": True, "rotation_degrees": 10.0, "color_jitter": 0.2})
    as_float, as_u8 = ImageTransform(**kw), ImageTransform(**kw, output="uint8")
    torch.manual_seed(3)
    f = as_float(img)
    torch.manual_seed(3)
    u = as_u8(img)
    assert u.dtype == torch.uint8 and u.shape == (3, 24, 24)
    batch = torch.stack([u, u])
    assert torch.allclose(as_u8.normalizer(batch), torch.stack([f, f]), atol=1e-6)
    assert as_u8.normalizer(f) is f  # float batches pass through
    # a channels-last batch (as collate_fn stacks clipexp's uint8 images) normalises to standard layout
    cl = batch.contiguous(memory_format=torch.channels_last)
    for normalizer in (as_u8.normalizer, PixelNormalizer(as_u8.mean, as_u8.std, reuse_cpu_buffer=True)):
        out = normalizer(cl)
        assert out.is_contiguous() and torch.allclose(out, torch.stack([f, f]), atol=1e-6)
    with pytest.raises(ValueError, match="output='half'"):
        ImageTransform(output="half")


def test_float_input_is_augmented_like_uint8():
    img = gradient_image(24, 24)
    tf = ImageTransform(resolution=24, output="uint8")
    p = params(24, angle=7.0, brightness=1.1, contrast=0.9, saturation=1.05)
    from_u8 = tf.apply(img, p).float() / 255
    from_float = tf.apply(img.float() / 255, p)
    assert from_float.dtype == torch.float32 and (from_u8 - from_float).abs().max() <= 2 / 255  # uint8 rounds after each op


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


# ------------------------------------------------------------------------- model.image_interpolation
def test_nearest_resize_is_pils_nearest_and_keeps_source_pixels():
    """``nearest`` picks the source pixel under each output pixel's centre (PIL's NEAREST, exactly), so an
    isolated one-pixel speckle keeps its full value where bicubic's antialiasing spreads and dims it."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 50, 75), dtype=torch.uint8, generator=g)
    out = resize_shorter(img, 32, "nearest")
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((48, 32), Image.NEAREST)
    assert out.shape == (3, 32, 48) and torch.equal(out.permute(1, 2, 0), torch.from_numpy(np.array(pil)))
    speckle = torch.zeros(3, 250, 250, dtype=torch.uint8)
    speckle[:, 125, 125] = 255  # under output pixel (80, 80) of a 160 px nearest resize: 125 = floor((80 + 0.5) * 250 / 160)
    assert int(resize_shorter(speckle, 160, "nearest").max()) == 255
    assert int(resize_shorter(speckle, 160, "bicubic").max()) < 160  # averaged with its black surroundings


def test_interpolation_reaches_the_resize_and_the_augmentation_warp():
    cfg = CLIPFinetuningConfig(image_resolution=16, image_interpolation="nearest")
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=g)
    source_values = {tuple(v) for v in img.reshape(3, -1).T.tolist()}
    eval_tf = ImageTransform(cfg, output="uint8")
    assert eval_tf.interpolation == "nearest" and "interpolation='nearest'" in repr(eval_tf)
    out = eval_tf(img)
    assert torch.equal(out, resize_shorter(img, 16, "nearest"))
    train_tf = ImageTransform(cfg, augment=True, output="uint8",
                              policy=dict(crop_scale_min=0.5, hflip=True, vflip=True, rotation_degrees=0.0))
    for seed in range(5):  # random crops, rescaled and flipped: still only the source's colours
        out = train_tf(img, generator=torch.Generator().manual_seed(seed))
        assert {tuple(v) for v in out.reshape(3, -1).T.tolist()} <= source_values
    bicubic = ImageTransform(resolution=16, output="uint8")
    assert bicubic.interpolation == "bicubic" and not torch.equal(bicubic(img), out)


def test_unknown_interpolation_is_one_clear_error():
    with pytest.raises(ValueError, match="image interpolation 'lanczos' is invalid: one of bicubic, bilinear, nearest"):
        ImageTransform(resolution=16, interpolation="lanczos")
