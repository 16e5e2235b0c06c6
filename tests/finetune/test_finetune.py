"""Robust fine-tuning building blocks on the tiny CLIP: EMA, WiSE-FT interpolation, LoRA, layer decay."""

from __future__ import annotations

import io

import pytest
import torch
from numerics import EPS, REORDER, assert_close, scale_of

from clipexp.finetune.ema import ModelEMA
from clipexp.finetune.layer_decay import param_groups, tower_depths
from clipexp.finetune.lora import apply_lora, is_lora, load_lora_state_dict, lora_state_dict, merge_lora
from clipexp.finetune.wise_ft import interpolate_weights, select_alpha
from clipexp.models.clip import ArchitectureConfig, build_model, image_features, text_features

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ArchitectureConfig(), 32, 16)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(0, 512, (4, 16), generator=g)
    ids[:, -1] = 513  # end of text: CLIP pools here
    return pixels, ids, torch.ones_like(ids)


def embed(model, batch):
    pixels, ids, mask = batch
    model.eval()
    with torch.no_grad():
        return image_features(model, pixels), text_features(model, ids, mask)


def sgd_steps(model, n: int, ema=None, seed: int = 0, lr: float = 0.05):
    """n deterministic steps of a contrastive-ish objective (a real gradient, not noise)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for k in range(n):
        model.train()
        img, txt = (t for t in (image_features(model, inputs(seed + k)[0]), text_features(model, *inputs(seed + k)[1:])))
        loss = -(img * txt).sum() + model.logit_scale.exp() * 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model)


def max_abs(state):
    return max(float(t.abs().max()) for t in state.values() if t.is_floating_point() and t.numel())


# ------------------------------------------------------------------------------------------ EMA
def test_ema_follows_the_recurrence():
    model = tiny()
    ema = ModelEMA(model, decay=0.9)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for k in range(3):
        img, txt = image_features(model, inputs(k)[0]), text_features(model, *inputs(k)[1:])
        opt.zero_grad()
        (-(img * txt).sum()).backward()
        opt.step()
        ema.update(model)
        for n, p in model.named_parameters():
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach().double()
    assert ema.num_updates == 3
    scale = scale_of(*ref.values())
    for n, s in ema.shadow.items():
        # a few float32 roundings per update (3 updates), relative to the largest weight
        assert (s.double() - ref[n]).abs().max() <= 8 * EPS * scale, n
    # and it really moved: the EMA is neither the start nor the current weights
    assert not torch.equal(ema.shadow["visual_projection.weight"], model.visual_projection.weight)


def test_ema_swap_is_exact_and_tracks_only_trainable_parameters():
    model = tiny()
    model.vision_model.requires_grad_(False)
    ema = ModelEMA(model, decay=0.5)
    assert not any(n.startswith("vision_model.") for n in ema.names) and "text_projection.weight" in ema.names
    sgd_steps(model, 2, ema)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model):
        assert torch.equal(model.text_projection.weight, ema.shadow["text_projection.weight"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ema_resume_is_bit_exact(tmp_path):
    straight = tiny()
    ema_straight = ModelEMA(straight, decay=0.8)
    sgd_steps(straight, 6, ema_straight)

    first = tiny()
    ema_first = ModelEMA(first, decay=0.8)
    sgd_steps(first, 3, ema_first)
    torch.save({"model": first.state_dict(), "ema": ema_first.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = tiny(seed=7)  # different initial weights: everything must come from the checkpoint
    ema_resumed = ModelEMA(resumed, decay=0.1)
    resumed.load_state_dict(state["model"])
    ema_resumed.load_state_dict(state["ema"])
    sgd_steps(resumed, 3, ema_resumed, seed=3)
    assert ema_resumed.num_updates == 6 and ema_resumed.decay == 0.8
    for n in ema_straight.names:
        assert torch.equal(ema_straight.shadow[n], ema_resumed.shadow[n]), n


def test_ema_rejects_a_bad_decay_and_a_mismatched_checkpoint():
    with pytest.raises(ValueError, match=r"decay=1.0 is invalid: a number in \(0, 1\)"):
        ModelEMA(tiny(), 1.0)
    locked = tiny()
    locked.text_model.requires_grad_(False)
    with pytest.raises(KeyError, match="does not match the model's trainable parameters"):
        ModelEMA(locked, 0.9).load_state_dict(ModelEMA(tiny(), 0.9).state_dict())


# ------------------------------------------------------------------------------------- WiSE-FT
def test_interpolation_end_points_are_exact_and_the_middle_is_the_mean():
    start = tiny().state_dict()
    model = tiny()
    sgd_steps(model, 2)
    finetuned = model.state_dict()
    at0, at1, mid = (interpolate_weights(start, finetuned, a) for a in (0.0, 1.0, 0.5))
    for k in finetuned:
        assert torch.equal(at0[k], start[k]) and torch.equal(at1[k], finetuned[k]), k
    tol = 2 * EPS * max(max_abs(start), max_abs(finetuned))  # one lerp: one or two roundings of the largest weight
    for k, v in finetuned.items():
        if v.is_floating_point():
            expected = (start[k].double() + v.double()) / 2
            assert (mid[k].double() - expected).abs().max() <= tol, k
    ids = {"position_ids": torch.arange(5)}
    assert torch.equal(interpolate_weights(ids, ids, 0.5)["position_ids"], torch.arange(5))  # integers taken as they are


def test_interpolation_errors_name_the_problem():
    start, ft = tiny().state_dict(), tiny().state_dict()
    with pytest.raises(ValueError, match=r"alpha=1.5 is invalid: a number in \[0, 1\]"):
        interpolate_weights(start, ft, 1.5)
    del start["logit_scale"]
    with pytest.raises(KeyError, match="differ in their keys .*logit_scale"):
        interpolate_weights(start, ft, 0.5)


def test_select_alpha():
    values = {0.0: 0.5, 0.25: 0.7, 0.5: 0.7, 1.0: 0.6}
    assert select_alpha(values, "best_val") == 0.25      # ties: the alpha closest to the start model
    assert select_alpha(values, "best_val", mode="min") == 0.0
    assert select_alpha(values, 1.0) == 1.0 and select_alpha(values, "0.5") == 0.5
    with pytest.raises(ValueError, match=r"select=0.3 is invalid: best_val or one of the alphas \[0.0, 0.25, 0.5, 1.0\]"):
        select_alpha(values, 0.3)


# ---------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_merges_to_the_same_embeddings(tmp_path):
    from transformers import CLIPModel

    base = tiny()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    assert is_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 towers x 2 layers x 4 projections x (A, B)
    assert len(trainable) == 32 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    batch = inputs(5)
    before = embed(model, batch)
    base_img, base_txt = embed(tiny(), batch)
    assert torch.equal(before[0], base_img) and torch.equal(before[1], base_txt)  # lora_B starts at 0

    sgd_steps(model, 3, lr=0.5)
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], base_state[k]) for k in base_state)  # nothing else moved
    adapted = embed(model, batch)
    assert not torch.allclose(adapted[0], base_img)  # the adapters did train

    adapters = lora_state_dict(model)
    assert len(adapters) == 32 and sum(v.numel() for v in adapters.values()) < 0.2 * sum(base_state[k].numel() for k in base_state)
    merged = merge_lora(model)
    assert isinstance(merged, CLIPModel) and not is_lora(merged)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = CLIPModel.from_pretrained(tmp_path / "merged")
    for got in (embed(merged, batch), embed(reloaded, batch)):
        for a, b in zip(got, adapted):  # merging sums W x + s B(A x) as (W + s BA) x: same maths, another order
            assert_close(a, b, rel=REORDER)


def test_lora_adapters_round_trip_and_bad_targets():
    model = apply_lora(tiny(), r=2, alpha=2)
    sgd_steps(model, 1, lr=0.5)
    state = lora_state_dict(model)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    other = apply_lora(tiny(), r=2, alpha=2)
    load_lora_state_dict(other, torch.load(io.BytesIO(buffer.getvalue())))
    batch = inputs(2)
    for a, b in zip(embed(other, batch), embed(model, batch)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="target module 'qkv' is not in the model"):
        apply_lora(tiny(), r=2, alpha=2, target_modules=["qkv"])


# ------------------------------------------------------------------------------- layer decay
def _lr_of(groups):
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_gives_the_expected_rate_per_layer():
    from clipexp.losses.contrastive import CLIPContrastiveLoss

    model = tiny()
    assert tower_depths(model) == {"vision": 2, "text": 2}
    loss = CLIPContrastiveLoss(learnable_temp=True)
    groups = param_groups(model, base_lr=1e-3, weight_decay=0.1, layer_decay=0.5, head_lr=2e-3, logit_scale_lr=1e-2,
                          extra={"loss": loss})
    lr = _lr_of(groups)
    named = dict(model.named_parameters())
    # by hand, L = 2 layers per tower, decay 0.5: embeddings 0.5^3, layer 0 0.5^2, layer 1 0.5^1, top 1
    expected = {
        "vision_model.embeddings.patch_embedding.weight": (1.25e-4, 0.0),   # embeddings: no weight decay
        "vision_model.embeddings.class_embedding": (1.25e-4, 0.0),
        "vision_model.pre_layrnorm.weight": (1.25e-4, 0.0),
        "text_model.embeddings.token_embedding.weight": (1.25e-4, 0.0),
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": (2.5e-4, 0.1),
        "vision_model.encoder.layers.0.self_attn.q_proj.bias": (2.5e-4, 0.0),
        "text_model.encoder.layers.0.mlp.fc1.weight": (2.5e-4, 0.1),
        "vision_model.encoder.layers.1.mlp.fc2.weight": (5e-4, 0.1),
        "text_model.encoder.layers.1.layer_norm2.weight": (5e-4, 0.0),
        "vision_model.post_layernorm.weight": (1e-3, 0.0),
        "text_model.final_layer_norm.bias": (1e-3, 0.0),
        "visual_projection.weight": (2e-3, 0.1),
        "text_projection.weight": (2e-3, 0.1),
        "logit_scale": (1e-2, 0.0),
    }
    for name, want in expected.items():
        assert lr[id(named[name])] == want, name
    assert all(lr[id(p)] == (1e-2, 0.0) for p in loss.parameters())
    assert sum(len(g["params"]) for g in groups) == len(named) + len(list(loss.parameters()))
    assert all(g["lr"] == 1e-3 * g["lr_scale"] for g in groups)


def test_without_decay_the_groups_are_the_former_two():
    model = tiny()
    model.vision_model.requires_grad_(False)
    groups = param_groups(model, base_lr=1e-3, weight_decay=0.01)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.01), (1.0, 0.0)]
    order = [p for g in groups for p in g["params"]]
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n and "norm" not in n]
    assert [id(p) for p in order[:len(decay)]] == [id(p) for p in decay] and len(order) == len(params)


def test_layer_decay_through_a_lora_wrapper():
    model = apply_lora(tiny(), r=2, alpha=2)
    lr = {n: g["lr"] for g in param_groups(model, 1e-3, 0.0, layer_decay=0.5) for n, p in model.named_parameters() for q in g["params"] if p is q}
    assert lr["base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight"] == 2.5e-4
    assert lr["base_model.model.text_model.encoder.layers.1.self_attn.out_proj.lora_B.default.weight"] == 5e-4
