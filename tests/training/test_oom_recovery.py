"""Out-of-memory recovery mid-run, through the real Trainer (tiny model, 96 real textile images, CPU).

An OOM is injected with a forward pre-hook on the vision tower that raises ``torch.OutOfMemoryError``
(the exception a CUDA allocation failure raises) while the micro-batch is larger than ``limit``, during
the first ``steps`` optimizer steps only. The trainer must halve the micro-batch, double the
accumulation (logical batch unchanged), retry the *same* logical batch, and go on with the same data
order as an OOM-free run.

Plain accumulation averages micro-batch losses, so a run that recovered from an OOM trains exactly
like an OOM-free run configured with the final micro-batch x accumulation from the start (bit for bit
on CPU), not like the run with the original micro-batch (each micro-batch sees fewer negatives). With
``trainer.accumulation=exact`` (GradCache) the gradient is that of the whole logical batch, so the
recovered run matches the OOM-free run with the original micro-batch up to float summation order.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from numerics import REORDER, assert_all_close

from clipexp.config.compose import compose as compose_and_validate
from clipexp.training.trainer import Trainer

# 96 textile images (76 train), the tiny model; no baseline eval, no mid-run eval or checkpoint (the last
# step still evaluates, saves and runs the test split: the run really finishes). Workers 0: the injected
# hook and the recorders live in this process, and forking a loader per epoch only costs time here.
BASE = [
    "experiment=smoke", "tracking.enabled=false", "data.num_workers=0", "trainer.eval_at_start=false",
    "trainer.eval_steps=1000", "trainer.save_steps=1000", "trainer.progress=false",
]


def _inject_oom(trainer: Trainer, limit: int, steps: int, skip_first: int = 0):
    """Raise a fake OOM in the vision tower's forward while the micro-batch is > ``limit`` during the first
    ``steps`` optimizer steps; the first ``skip_first`` such forwards go through (an OOM part-way through
    an accumulation, after earlier micro-batches already added their gradients)."""
    state = {"raised": 0, "passed": 0}

    def hook(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if module.training and trainer.global_step < steps and pixels.shape[0] > limit:
            if state["passed"] < skip_first:
                state["passed"] += 1
                return None
            state["raised"] += 1
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test at micro-batch {pixels.shape[0]})")
        return None

    trainer.model.vision_model.register_forward_pre_hook(hook, with_kwargs=True)
    return state


def _run(tmp_path: Path, name: str, *overrides: str, oom: Optional[dict] = None) -> SimpleNamespace:
    """Set up and train one run, recording per step the logical batch's dataset indices, the micro-batch
    sizes of every attempt, the gradients of each successful accumulation, and the tags set."""
    cfg = compose_and_validate([*BASE, *overrides])
    trainer = Trainer(cfg, tmp_path / name).setup()
    rec = SimpleNamespace(indices=[], attempts=[], grads=[], tags={}, injected=None)

    batches = trainer._logical_batches

    def recording_batches():
        for batch in batches():
            rec.indices.append(batch["indices"].tolist())
            yield batch

    accumulate = trainer._forward_backward

    def recording_accumulate(micro_batches):
        rec.attempts.append((trainer.global_step, [int(mb["pixel_values"].shape[0]) for mb in micro_batches]))
        out = accumulate(micro_batches)
        rec.grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return out

    # instance attributes shadow the methods: train() and step() look them up on the instance
    trainer._logical_batches = recording_batches
    trainer._forward_backward = recording_accumulate
    trainer.tracker.set_tags = lambda tags: rec.tags.update(tags)
    if oom is not None:
        rec.injected = _inject_oom(trainer, **oom)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    rec.trainer = trainer
    rec.params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rec.losses = [v for _, v in trainer.history["train/loss"]]
    return rec


def _final_params(rec: SimpleNamespace):
    """Parameters after the last optimizer step (finish() reloads best.pt, saved at that same last step)."""
    return rec.params


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} parameters differ, e.g. {different[:3]}"


def test_oom_halves_the_micro_batch_keeps_the_logical_batch_and_the_data_order(tmp_path):
    steps = ["trainer.max_steps=3"]
    recovered = _run(tmp_path, "oom", *steps, "trainer.batch_size=8", oom=dict(limit=4, steps=1))
    oom_free = _run(tmp_path, "ref8", *steps, "trainer.batch_size=8")
    final_split = _run(tmp_path, "ref4x2", *steps, "trainer.batch_size=4", "trainer.gradient_accumulation_steps=2")

    t = recovered.trainer
    # the run finished all its steps
    assert t.status == "FINISHED" and t.global_step == 3 and "test" in t.results
    # one OOM: micro-batch 8 -> 4, accumulation 1 -> 2, the logical batch still 8
    assert recovered.injected["raised"] == 1
    assert t.micro.history == [(8, 1), (4, 2)]
    assert (t.micro.size, t.micro.accumulation, t.micro.logical_batch) == (4, 2, 8)
    assert recovered.tags == {"oom_recovery": "step 1: micro-batch 8 -> 4"}
    # step 1 was retried on the same logical batch, split in two; later steps use the smaller micro-batch
    assert recovered.attempts == [(0, [8]), (0, [4, 4]), (1, [4, 4]), (2, [4, 4])]
    # the samples of every step are exactly those of the OOM-free run (same sampler, same order)
    assert len(recovered.indices) == 3 and all(len(ix) == 8 for ix in recovered.indices)
    assert recovered.indices == oom_free.indices == final_split.indices
    # plain accumulation of the same samples with the same 4 x 2 split: bit-identical training
    assert recovered.losses == final_split.losses
    _assert_same_params(_final_params(recovered), _final_params(final_split))
    # ...which is not the micro-batch-8 run: its micro-batches had twice the negatives
    assert recovered.losses[0] != oom_free.losses[0]
    assert any(not torch.equal(recovered.params[n], oom_free.params[n]) for n in recovered.params)


def test_oom_part_way_through_an_accumulation_discards_the_partial_gradients(tmp_path):
    steps = ["trainer.max_steps=2"]
    # micro 4 x 2: the first micro-batch's backward has run when the second one "runs out of memory"
    recovered = _run(tmp_path, "oom", *steps, "trainer.batch_size=4", "trainer.gradient_accumulation_steps=2",
                     oom=dict(limit=2, steps=1, skip_first=1))
    final_split = _run(tmp_path, "ref2x4", *steps, "trainer.batch_size=2", "trainer.gradient_accumulation_steps=4")

    t = recovered.trainer
    assert t.status == "FINISHED" and t.global_step == 2
    assert recovered.injected == {"raised": 1, "passed": 1}
    assert t.micro.history == [(4, 2), (2, 4)] and t.micro.logical_batch == 8
    assert recovered.attempts == [(0, [4, 4]), (0, [2, 2, 2, 2]), (1, [2, 2, 2, 2])]
    assert recovered.indices == final_split.indices
    # had the half-done step's gradients been kept, step 1 would differ from the clean 2 x 4 run
    for got, want in zip(recovered.grads, final_split.grads):
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    assert recovered.losses == final_split.losses
    _assert_same_params(recovered.params, final_split.params)


def test_oom_with_exact_accumulation_keeps_the_logical_batch_gradient(tmp_path):
    steps = ["trainer.max_steps=2", "trainer.accumulation=exact", "trainer.batch_size=8"]
    # two halvings within the first step: 8 -> 4 -> 2 (accumulation 4), then GradCache over 4 micro-batches
    recovered = _run(tmp_path, "oom", *steps, oom=dict(limit=2, steps=1))
    oom_free = _run(tmp_path, "ref8", *steps)

    t = recovered.trainer
    assert t.status == "FINISHED" and t.global_step == 2
    assert recovered.injected["raised"] == 2
    assert t.micro.history == [(8, 1), (4, 2), (2, 4)]
    assert recovered.attempts == [(0, [8]), (0, [4, 4]), (0, [2, 2, 2, 2]), (1, [2, 2, 2, 2])]
    assert recovered.indices == oom_free.indices
    # the contrastive gradient of the whole logical batch, whatever the split (up to float summation order,
    # which the captions packed per micro-batch change most in the shared token embeddings)
    assert len(recovered.grads) == len(oom_free.grads) == 2
    for got, want in zip(recovered.grads, oom_free.grads):
        assert_all_close(got, want)
    assert recovered.losses == pytest.approx(oom_free.losses, rel=REORDER)
    assert_all_close(recovered.params, oom_free.params)


def test_oom_at_micro_batch_one_stops_with_advice(tmp_path):
    cfg = compose_and_validate([*BASE, "trainer.max_steps=1", "trainer.batch_size=4"])
    trainer = Trainer(cfg, tmp_path / "run").setup()
    injected = _inject_oom(trainer, limit=0, steps=1)  # even one sample "does not fit"
    try:
        with pytest.raises(RuntimeError, match="out of memory at micro-batch 1.*gradient_checkpointing"):
            trainer.train()
    finally:
        trainer.cleanup("FAILED")
    assert injected["raised"] == 3  # 4 -> 2 -> 1 -> give up
    assert trainer.micro.history == [(4, 1), (2, 2), (1, 4)] and trainer.global_step == 0
