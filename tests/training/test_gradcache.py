"""GradCache exact accumulation: the gradients of 3 micro-batches of 4 equal those of one batch of 12."""

from __future__ import annotations

import contextlib
from typing import Dict, List

import pytest
import torch
from numerics import REORDER, assert_all_close, assert_close, scale_of

from builders import LOSS_OPTIONS, loss_from_conf
from clipexp.models.clip import ArchitectureConfig, build_model, image_features, text_features
from clipexp.names import DOMAINS, MINING_STRATEGIES
from clipexp.training.gradcache import exact_accumulation_step
from clipexp.training.memory import split_batch

RES, SEQ, EOS, BATCH, MICRO = 32, 16, 513, 12, 4
# duplicates inside a micro-batch (0 at 0 and 2) and across micro-batches (1, 2, 3): multi-positive matters
GROUPS = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5, 2, 6, 7, 3])
LABELS = torch.tensor([0, 0, 0, 1, 0, 0, 2, 0, 1, 0, 0, 2])  # imbalanced, for the industrial weights

CASES = {
    "contrastive": dict(),
    "contrastive-learnable_temp": dict(learnable_temp=True),
    "contrastive-model_logit_scale": dict(use_model_logit_scale=True),
    "contrastive-single_positive": dict(multi_positive=False, learnable_temp=True),
    **{f"hard_negative-{s}": dict(mining_strategy=s, learnable_temp=True, hard_negative_ratio=0.3) for s in MINING_STRATEGIES},
    **{f"domain_specific-{d}": dict(domain=d, loss_weight=1.5, learnable_temp=True) for d in DOMAINS},
    "multi_scale": dict(learnable_temp=True),
    "siglip": dict(),  # learnable temperature and bias (the defaults)
    "siglip-model_logit_scale": dict(use_model_logit_scale=True),
}


def _name(case: str) -> str:
    return case.split("-")[0]


def test_cases_cover_every_loss():
    assert {_name(c) for c in CASES} == set(LOSS_OPTIONS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ArchitectureConfig(), RES, SEQ)
    m.train()
    return m


def make_batch(n: int = BATCH, seed: int = 1) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (n, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids[torch.arange(n), lengths - 1] = EOS  # every sequence ends with the eos id
    ids = ids * mask + EOS * (1 - mask)  # padding with eos, as the tokenizer does
    return {
        "pixel_values": torch.randn(n, 3, RES, RES, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "group_ids": GROUPS[:n].clone(),
        "labels": LABELS[:n].clone(),
    }


def _loss_kwargs(model, loss_fn, batch):
    return dict(group_ids=batch["group_ids"], labels=batch["labels"],
                logit_scale=model.logit_scale if loss_fn.use_model_logit_scale else None)


def _logit_scale(model, loss_fn):
    return model.logit_scale if loss_fn.use_model_logit_scale else None


def _plain_loss(model, loss_fn, batch) -> Dict[str, torch.Tensor]:
    img = image_features(model, batch["pixel_values"])
    txt = text_features(model, batch["input_ids"], batch["attention_mask"])
    return loss_fn(img, txt, **_loss_kwargs(model, loss_fn, batch))


def _grads(*modules) -> Dict[str, torch.Tensor]:
    out = {}
    for prefix, module in enumerate(modules):
        for name, p in module.named_parameters():
            if p.grad is not None:
                out[f"{prefix}.{name}"] = p.grad.detach().clone()
    return out


def _zero(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """The largest difference, relative to the largest entry of ``b``."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale_of(*b.values())


# Close, not exact, throughout: GradCache encodes micro-batches of 4 (other matrix shapes than 12, another
# float32 summation order) and adds their parameter gradients one micro-batch at a time.
_assert_grads_close = assert_all_close


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_accumulation_equals_one_big_batch(model, case):
    loss_fn = loss_from_conf(_name(case), **CASES[case])
    batch = make_batch()
    micro = split_batch(batch, MICRO)
    assert len(micro) == 3

    _zero(model, loss_fn)
    big = _plain_loss(model, loss_fn, batch)
    big["loss"].backward()
    want = _grads(model, loss_fn)

    _zero(model, loss_fn)
    got_out = exact_accumulation_step(model, loss_fn, micro, device="cpu", logit_scale=_logit_scale(model, loss_fn))
    got = _grads(model, loss_fn)

    # the loss's own parameters (learnable temperature, SigLIP bias) and model.logit_scale get gradients
    if loss_fn.use_model_logit_scale:
        assert "0.logit_scale" in want
    for name, _ in loss_fn.named_parameters():
        assert f"1.{name}" in want
    _assert_grads_close(got, want)
    for key in ("loss", "image_to_text_loss", "text_to_image_loss", "temperature"):
        assert_close(got_out[key], big[key].detach(), name=key)
        assert not got_out[key].requires_grad
    assert_close(got_out["logits"], big["logits"].detach(), name="logits")

    # the fallback it replaces: averaging the micro-batch losses is a different gradient and loss
    _zero(model, loss_fn)
    naive = 0.0
    for mb in micro:
        out = _plain_loss(model, loss_fn, mb)
        (out["loss"] / len(micro)).backward()
        naive += float(out["loss"].detach()) / len(micro)
    assert _max_diff(_grads(model, loss_fn), want) > 100 * REORDER
    assert abs(naive - float(big["loss"].detach())) > 1e-3
    _zero(model, loss_fn)


def test_unequal_micro_batches_and_accumulation_into_existing_grads(model):
    loss_fn = loss_from_conf("contrastive", learnable_temp=True)
    batch = make_batch()
    _zero(model, loss_fn)
    _plain_loss(model, loss_fn, batch)["loss"].backward()
    want = _grads(model, loss_fn)

    _zero(model, loss_fn)
    parts = [{k: v[a:b] for k, v in batch.items()} for a, b in ((0, 5), (5, 9), (9, 12))]
    exact_accumulation_step(model, loss_fn, parts, device="cpu")
    _assert_grads_close(_grads(model, loss_fn), want)
    # a second call adds to .grad, like any backward
    exact_accumulation_step(model, loss_fn, parts, device="cpu")
    _assert_grads_close(_grads(model, loss_fn), {k: 2 * v for k, v in want.items()})
    _zero(model, loss_fn)


def test_grad_scaler_scales_every_gradient(model):
    loss_fn = loss_from_conf("siglip")
    batch = make_batch()
    _zero(model, loss_fn)
    big = _plain_loss(model, loss_fn, batch)
    big["loss"].backward()
    want = _grads(model, loss_fn)

    _zero(model, loss_fn)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    params = [p for m in (model, loss_fn) for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.0)
    out = exact_accumulation_step(model, loss_fn, split_batch(batch, MICRO), device="cpu", loss_scale=scaler)
    scaled = _grads(model, loss_fn)
    _assert_grads_close(scaled, {k: 256.0 * v for k, v in want.items()})
    scaler.unscale_(optimizer)
    _assert_grads_close(_grads(model, loss_fn), want)
    assert_close(out["loss"], big["loss"].detach())  # unscaled
    # a plain multiplier works the same way
    _zero(model, loss_fn)
    exact_accumulation_step(model, loss_fn, split_batch(batch, MICRO), device="cpu", loss_scale=8.0)
    _assert_grads_close(_grads(model, loss_fn), {k: 8.0 * v for k, v in want.items()})
    _zero(model, loss_fn)


def _set_attention_dropout(model, p: float) -> None:
    for module in model.modules():
        if type(module).__name__ == "CLIPAttention":
            module.dropout = p


def test_dropout_reforward_replays_the_same_masks():
    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(), RES, SEQ)
    _set_attention_dropout(model, 0.3)
    model.train()
    loss_fn = loss_from_conf("contrastive", learnable_temp=True)
    batch = make_batch()
    micro = split_batch(batch, MICRO)

    # dropout is really active: two forwards draw different masks
    a = image_features(model, batch["pixel_values"]).detach()
    b = image_features(model, batch["pixel_values"]).detach()
    assert (a - b).abs().max() > 1e-4

    # reference: the same micro-batch forwards (same RNG draws, in order) kept in one graph
    torch.manual_seed(123)
    imgs, txts = [], []
    for mb in micro:
        imgs.append(image_features(model, mb["pixel_values"]))
        txts.append(text_features(model, mb["input_ids"], mb["attention_mask"]))
    ref = loss_fn(torch.cat(imgs), torch.cat(txts), group_ids=batch["group_ids"], labels=batch["labels"])
    ref["loss"].backward()
    want = _grads(model, loss_fn)
    rng_after_reference = torch.get_rng_state()

    _zero(model, loss_fn)
    torch.manual_seed(123)
    out = exact_accumulation_step(model, loss_fn, micro, device="cpu")
    _assert_grads_close(_grads(model, loss_fn), want)
    assert_close(out["loss"], ref["loss"].detach())
    # the RNG stream ends where one pass over the micro-batches leaves it
    assert torch.equal(torch.get_rng_state(), rng_after_reference)


def test_frozen_image_tower_is_not_reforwarded(model, monkeypatch):
    loss_fn = loss_from_conf("contrastive")
    batch = make_batch()
    for mod in (model.vision_model, model.visual_projection):
        mod.requires_grad_(False)
    try:
        _zero(model, loss_fn)
        _plain_loss(model, loss_fn, batch)["loss"].backward()
        want = _grads(model, loss_fn)
        assert not any(k.startswith("0.vision_model") for k in want)

        calls: List[int] = []
        original = model.vision_model.forward

        def counting_forward(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(model.vision_model, "forward", counting_forward)
        _zero(model, loss_fn)
        exact_accumulation_step(model, loss_fn, split_batch(batch, MICRO), device="cpu")
        _assert_grads_close(_grads(model, loss_fn), want)
        assert len(calls) == 3  # the no-grad pass only
    finally:
        for mod in (model.vision_model, model.visual_projection):
            mod.requires_grad_(True)
        _zero(model, loss_fn)


def test_bf16_autocast_matches_a_bf16_big_batch(model):
    loss_fn = loss_from_conf("contrastive", learnable_temp=True)
    batch = make_batch()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    _zero(model, loss_fn)
    with autocast():
        img = image_features(model, batch["pixel_values"])
        txt = text_features(model, batch["input_ids"], batch["attention_mask"])
    loss_fn(img, txt, group_ids=batch["group_ids"], labels=batch["labels"])["loss"].backward()
    want = _grads(model, loss_fn)
    _zero(model, loss_fn)
    out = exact_accumulation_step(model, loss_fn, split_batch(batch, MICRO), device="cpu", autocast=autocast)
    got = _grads(model, loss_fn)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert got.keys() == want.keys()
    # bf16 matmuls over 4 vs 12 rows round differently: equal up to bf16 precision, as one vector
    flat_got = torch.cat([got[k].flatten() for k in want])
    flat_want = torch.cat([want[k].flatten() for k in want])
    assert float((flat_got - flat_want).norm() / flat_want.norm()) < 2e-2
    _zero(model, loss_fn)


def test_empty_micro_batch_list_is_an_error(model):
    with pytest.raises(ValueError, match="at least one micro-batch"):
        exact_accumulation_step(model, loss_from_conf("contrastive"), [], device="cpu", autocast=contextlib.nullcontext)
