"""Every memory/speed lever composes from the config and trains through the real Trainer.

Each test runs one optimizer step of the tiny model on 96 real textile images on CPU and checks what
the lever promises, exactly where it can be exact: a locked tower's parameters are bit-identical after
the step, gradient checkpointing recomputes every layer and gives the gradient of the plain run, GradCache
gives the gradient of the whole logical batch, autocast runs the matmuls in bf16 while the weights stay
fp32. ``device.compile=true`` compiles on first use (37-106 s on a 2-core CPU), so it is ``slow``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from numerics import REORDER, assert_all_close, scale_of

from clipexp.config.compose import compose as compose_and_validate
from clipexp.training.trainer import Trainer

BASE = [
    "experiment=smoke", "tracking.enabled=false", "data.num_workers=0", "trainer.eval_at_start=false",
    "trainer.eval_steps=1000", "trainer.save_steps=1000", "trainer.progress=false", "trainer.max_steps=1",
]
IMAGE_TOWER = ("vision_model.", "visual_projection.")
TEXT_TOWER = ("text_model.", "text_projection.")


def _layers(model):
    return [("vision", i, layer) for i, layer in enumerate(model.vision_model.encoder.layers)] + \
           [("text", i, layer) for i, layer in enumerate(model.text_model.encoder.layers)]


def run_step(tmp_path: Path, *overrides: str, watch=None) -> SimpleNamespace:
    """Compose ``BASE + overrides``, set up, train (one step by default) and record: parameters before and
    after, the gradients of each accumulation, the micro-batch sizes, the train-mode calls of every
    transformer layer's MLP (a sub-module: inside the checkpointed region), and what ``watch(trainer)``
    sets up."""
    cfg = compose_and_validate([*BASE, *overrides])
    trainer = Trainer(cfg, tmp_path).setup()
    model = trainer.model
    rec = SimpleNamespace(grads=[], micro=[], mlp_calls={}, dtypes=set(), trainer=trainer)
    rec.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    accumulate = trainer._forward_backward

    def recording_accumulate(micro_batches):
        rec.micro.append([int(mb["pixel_values"].shape[0]) for mb in micro_batches])
        out = accumulate(micro_batches)
        rec.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return out

    trainer._forward_backward = recording_accumulate  # an instance attribute shadows the method for train()

    def counter(key):
        # a *pre*-hook: checkpoint's recomputation stops as soon as it has the tensors backward needs
        # (early stop), before the MLP returns, so a forward hook would not see the recomputation
        def hook(module, args):
            if module.training and torch.is_grad_enabled():
                rec.mlp_calls[key] = rec.mlp_calls.get(key, 0) + 1
        return hook

    for tower, i, layer in _layers(model):
        layer.mlp.register_forward_pre_hook(counter((tower, i)))
    if watch is not None:
        watch(trainer, rec)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    rec.after = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec.loss = trainer.history["train/loss"][0][1]
    return rec


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """No lever: micro-batch 8, no accumulation, fp32, one step."""
    return run_step(tmp_path_factory.mktemp("baseline"))


def _changed(rec, prefixes):
    return {n for n in rec.before if n.startswith(prefixes) and not torch.equal(rec.before[n], rec.after[n])}


def _assert_same_grads(got: dict, want: dict):
    """Exact: the same operations on the same numbers (bit-identical on any CPU and thread count)."""
    assert got.keys() == want.keys() and got
    assert not [n for n in got if not torch.equal(got[n], want[n])]


def test_baseline_step_trains_both_towers(baseline):
    assert baseline.trainer.status == "FINISHED" and baseline.trainer.global_step == 1
    assert baseline.micro == [[8]]
    assert _changed(baseline, IMAGE_TOWER) and _changed(baseline, TEXT_TOWER)
    assert set(baseline.mlp_calls.values()) == {1}  # one forward per layer, no recomputation
    assert all(p.dtype == torch.float32 for p in baseline.after.values())


def test_gradient_checkpointing_recomputes_every_layer_and_keeps_the_gradient(tmp_path, baseline):
    rec = run_step(tmp_path, "model.gradient_checkpointing=true")
    assert rec.trainer.model.is_gradient_checkpointing
    # every layer of both towers ran twice in the step: forward, then again during backward
    assert rec.mlp_calls == {key: 2 for key in baseline.mlp_calls}
    # exact: recomputation replays the same operations, so the gradient is that of the plain run, bit for bit
    _assert_same_grads(rec.grads[0], baseline.grads[0])
    assert rec.loss == baseline.loss


@pytest.mark.parametrize("tower", ["image", "text"])
def test_gradient_checkpointing_of_one_tower(tmp_path, baseline, tower):
    rec = run_step(tmp_path, f"model.gradient_checkpointing={tower}")
    recomputed = {"image": "vision", "text": "text"}[tower]
    assert rec.mlp_calls == {key: 2 if key[0] == recomputed else 1 for key in baseline.mlp_calls}
    _assert_same_grads(rec.grads[0], baseline.grads[0])


def test_gradient_checkpointing_rejects_other_values():
    from clipexp.errors import ConfigError

    with pytest.raises(ConfigError, match="model.gradient_checkpointing.*true, false, image or text"):
        compose_and_validate([*BASE, "model.gradient_checkpointing=vision"])


@pytest.mark.parametrize("lock, frozen, trained", [
    ("model.lock_image=true", IMAGE_TOWER, TEXT_TOWER),
    ("model.lock_text=true", TEXT_TOWER, IMAGE_TOWER),
])
def test_a_locked_tower_is_bit_identical_after_a_step(tmp_path, baseline, lock, frozen, trained):
    rec = run_step(tmp_path, lock)
    model, optimizer = rec.trainer.model, rec.trainer.optimizer
    frozen_names = [n for n in rec.before if n.startswith(frozen)]
    assert frozen_names
    # frozen: no grad, not in the optimizer, exactly unchanged (weight decay included)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(frozen))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for n, p in model.named_parameters() if n.startswith(frozen))
    assert not any(n.startswith(frozen) for n in rec.grads[0])
    assert not _changed(rec, frozen)
    # the other tower trained: its projection and every layer's weights moved
    changed = _changed(rec, trained)
    assert f"{trained[1]}weight" in changed
    assert len(changed) >= len([n for n in baseline.before if n.startswith(trained)]) // 2
    # its gradient does not depend on the other tower being frozen: exact, the frozen tower's features are
    # the same numbers with or without autograd
    _assert_same_grads(rec.grads[0], {n: baseline.grads[0][n] for n in rec.grads[0]})


def test_bf16_autocast_on_cpu_runs_matmuls_in_bf16_and_keeps_fp32_weights(tmp_path, baseline):
    def watch(trainer, rec):
        def hook(module, args, output):
            if module.training:
                rec.dtypes.add(output.dtype)
        trainer.model.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(hook)
        trainer.model.text_model.encoder.layers[0].self_attn.q_proj.register_forward_hook(hook)

    rec = run_step(tmp_path, "device.type=cpu", "device.precision=bf16", watch=watch)
    assert rec.trainer.device_info.precision == "bf16" and not rec.trainer.device_info.use_grad_scaler
    assert rec.dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in rec.after.values())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in rec.grads[0].values())
    assert _changed(rec, IMAGE_TOWER) and _changed(rec, TEXT_TOWER)
    # bf16 keeps ~3 significant digits: the loss is the fp32 loss to about 1%
    assert rec.loss == pytest.approx(baseline.loss, rel=2e-2)


def test_channels_last_keeps_the_conv_weight_channels_last_and_the_maths(tmp_path, baseline):
    rec = run_step(tmp_path, "device.channels_last=true")
    weight = rec.trainer.model.vision_model.embeddings.patch_embedding.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert not torch.equal(rec.before["vision_model.embeddings.patch_embedding.weight"], weight.detach())
    # close: the patch embedding's convolution runs another kernel on channels-last memory
    assert rec.loss == pytest.approx(baseline.loss, rel=REORDER)
    assert_all_close(rec.grads[0], baseline.grads[0])


@pytest.mark.parametrize("fused", [True, False])
def test_fused_adamw_is_used_only_on_cuda(tmp_path, fused):
    rec = run_step(tmp_path, "device.type=cpu", f"trainer.fused_adamw={str(fused).lower()}")
    defaults = rec.trainer.optimizer.defaults
    assert not defaults["fused"]  # None on CPU whatever the key says
    assert defaults["lr"] == pytest.approx(1e-3) and defaults["betas"] == (0.9, 0.98) and defaults["eps"] == 1e-6
    assert rec.trainer.global_step == 1 and _changed(rec, IMAGE_TOWER)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_adamw_on_cuda(tmp_path):
    rec = run_step(tmp_path, "device.type=cuda", "trainer.fused_adamw=true")
    assert rec.trainer.optimizer.defaults["fused"] is True and rec.trainer.global_step == 1


def test_exact_accumulation_gives_the_logical_batch_gradient(tmp_path, baseline, monkeypatch):
    import clipexp.training.trainer as train_module

    calls = []
    real = train_module.exact_accumulation_step

    def spy(model, loss_fn, micro_batches, **kwargs):
        calls.append([int(mb["pixel_values"].shape[0]) for mb in micro_batches])
        return real(model, loss_fn, micro_batches, **kwargs)

    monkeypatch.setattr(train_module, "exact_accumulation_step", spy)
    split = ("trainer.batch_size=4", "trainer.gradient_accumulation_steps=2")
    exact = run_step(tmp_path / "exact", *split, "trainer.accumulation=exact")
    assert calls == [[4, 4]] and exact.micro == [[4, 4]]
    assert exact.trainer.logical_batch == 8
    # same 8 samples as the baseline's single micro-batch of 8: the same loss and gradient
    # close: each micro-batch packs its own captions: other shapes, another float summation order than the
    # batch of 8
    assert exact.loss == pytest.approx(baseline.loss, rel=REORDER)
    assert_all_close(exact.grads[0], baseline.grads[0])

    # plain accumulation of the same 4 x 2 split is not that gradient (fewer negatives per sample)
    plain = run_step(tmp_path / "plain", *split, "trainer.accumulation=plain")
    assert len(calls) == 1 and plain.micro == [[4, 4]]
    assert plain.loss != pytest.approx(baseline.loss, rel=1e-3)
    name = "text_projection.weight"
    want = baseline.grads[0][name]
    assert float((plain.grads[0][name] - want).abs().max()) > 1e-3 * scale_of(want)


def _text_rows(trainer, rec):
    """Record the shape of every ``input_ids`` the text tower receives."""
    rec.text_shapes = []
    trainer.model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: rec.text_shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)


def test_pack_captions_encodes_each_distinct_caption_once_with_the_same_gradient(tmp_path):
    packed = run_step(tmp_path / "packed", watch=_text_rows)  # on by default
    full = run_step(tmp_path / "full", "trainer.pack_captions=false", watch=_text_rows)
    # the smoke set's captions are class-level: 8 samples, at most 3 distinct captions, the longest 65 tokens of 77
    (rows, length), train_full = packed.text_shapes[0], full.text_shapes[0]  # the training step (evaluation follows)
    assert train_full == (8, 77) and rows <= 3 and length < 77
    # close: other sequence lengths, another summation order (see tests/test_models.py)
    assert packed.loss == pytest.approx(full.loss, rel=REORDER)
    assert_all_close(packed.grads[0], full.grads[0])
    assert packed.trainer.dedup_captions and not full.trainer.dedup_captions


def test_text_dropout_turns_caption_dedup_off(tmp_path):
    # a checkpoint whose text tower has dropout: copies of a caption must draw their own masks
    from clipexp.models.clip import build_model, build_processor

    arch = compose_and_validate(["model=tiny"]).model.architecture
    model = build_model(dict(arch), 64, 77)
    model.config.text_config.attention_dropout = 0.1
    model.save_pretrained(tmp_path / "ckpt")
    build_processor(64, 77).save_pretrained(tmp_path / "ckpt")
    rec = run_step(tmp_path / "run", f"model.name_or_path={tmp_path / 'ckpt'}", watch=_text_rows)
    assert not rec.trainer.dedup_captions
    assert rec.text_shapes[0][0] == 8 and rec.text_shapes[0][1] < 77  # the padding is still cut


@pytest.mark.slow
def test_compile_runs_a_step_with_the_same_maths(tmp_path, baseline):
    # Inductor compiles the train graphs on the first step and the eval (no-grad) graphs again at the last
    # step's evaluation: 37 s on an idle 2-core CPU with a cold cache, 106 s when that CPU was shared: slow
    rec = run_step(tmp_path, "device.compile=true")
    model = rec.trainer.model
    assert model.vision_model._compiled_call_impl is not None and model.text_model._compiled_call_impl is not None
    assert rec.trainer.global_step == 1
    # close, more loosely: Inductor fuses kernels and may reorder and split the reductions
    assert rec.loss == pytest.approx(baseline.loss, rel=10 * REORDER)
    assert_all_close(rec.grads[0], baseline.grads[0], rel=10 * REORDER)
