"""Pieces of the training loop with exact expected values: LR schedule, weight-decay groups, sampler."""

from __future__ import annotations

import math

import pytest
import torch

from clipexp.finetune.layer_decay import param_groups
from clipexp.training.checkpoint import atomic_save
from clipexp.training.data import EpochSampler
from clipexp.training.optim import lr_at


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 1e-3 * 1 / 10),       # warmup: (step + 1) / warmup
        (4, 1e-3 * 5 / 10),
        (9, 1e-3),                # last warmup step reaches the base LR
        (10, 1e-3),               # cosine starts at the top: progress 0
        (60, 1e-3 * 0.5),         # half-way through the 100 decay steps: cos(pi/2) -> 0.5
        (35, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.25))),
        (110, 0.0),               # the end of the schedule
        (500, 0.0),               # clamped after the end
    ],
)
def test_warmup_then_cosine(step, expected):
    assert lr_at(step, 1e-3, warmup_steps=10, total_steps=110) == pytest.approx(expected, abs=1e-15)


def test_no_warmup_and_min_ratio():
    assert lr_at(0, 2.0, 0, 100) == 2.0
    assert lr_at(100, 2.0, 0, 100, min_ratio=0.1) == pytest.approx(0.2)


def test_weight_decay_groups_skip_norms_biases_embeddings_and_temperatures():
    from clipexp.losses.contrastive import CLIPContrastiveLoss
    from clipexp.models.clip import ArchitectureConfig, build_model

    model = build_model(ArchitectureConfig(), 64, 32)
    loss = CLIPContrastiveLoss(learnable_temp=True)
    decay, no_decay = param_groups(model, base_lr=1e-3, weight_decay=0.1, extra={"loss": loss})
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names.get(id(p), "loss") for p in no_decay["params"]}
    assert "logit_scale" in skipped and "loss" in skipped
    assert "text_model.embeddings.token_embedding.weight" in skipped
    assert "vision_model.embeddings.class_embedding" in skipped
    assert not any("bias" in n or "norm" in n for n in decayed)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in decayed
    assert "visual_projection.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters())) + 1


def test_epoch_sampler_is_seeded_drops_the_tail_and_resumes_mid_epoch():
    s = EpochSampler(n=10, batch_size=3, num_batches=3, seed=7)
    s.set_epoch(0)
    first = list(s)
    assert len(first) == 9 and len(set(first)) == 9           # the 10th index is the dropped tail
    s.set_epoch(0)
    assert list(s) == first                                    # same seed + epoch -> same order
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0, start=6)
    assert list(s) == first[6:] and len(s) == 3                # resume after two micro-batches


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = atomic_save({"x": torch.ones(2)}, tmp_path / "ckpt" / "a.pt")
    assert torch.load(path)["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.pt", "a.pt.sha256"]  # the file and its manifest, no temp file


def test_summary_table_lists_baseline_final_best_and_test():
    from clipexp.tracking.outputs import summary_table

    results = {
        "baseline": {"val/loss": 4.0, "val/zeroshot_acc": 0.25},
        "final": {"val/loss": 3.5, "val/zeroshot_acc": 0.5},
        "best": {"val/loss": 3.6, "val/zeroshot_acc": 0.625},
        "test": {"test/loss": 3.7, "test/zeroshot_acc": 0.6},
    }
    lines = summary_table(results, best_step=40).splitlines()
    assert lines[0].split() == ["metric", "baseline", "final", "best", "test"]
    assert lines[1].split() == ["loss", "4.0000", "3.5000", "3.6000", "3.7000"]
    assert lines[2].split() == ["zeroshot_acc", "0.2500", "0.5000", "0.6250", "0.6000"]
    assert lines[3].startswith("baseline = validation at step 0") and "(step 40)" in lines[3]


def test_default_loader_workers_and_threads_per_device_and_cores():
    from clipexp.data.dataloader import default_num_workers as default_train_workers
    from clipexp.training.data import default_train_threads

    assert [default_train_workers(c, "cpu") for c in (1, 2, 3, 4, 8, 32)] == [0, 0, 0, 1, 2, 4]
    # below 4 cores the step keeps every core, also beside a worker asked for; from 4 the workers get their own
    assert [default_train_threads(c, w) for c, w in ((1, 0), (2, 0), (2, 1), (3, 1), (4, 1), (8, 2))] == [1, 2, 2, 3, 3, 6]
    assert [default_train_workers(c, "cuda") for c in (1, 2, 4, 8, 16)] == [0, 1, 2, 4, 4]


def test_omp_num_threads_pins_the_cpu_step_threads(monkeypatch):
    """A user (or ``make test THREADS=N``) who sets OMP_NUM_THREADS keeps it; unset or invalid: cores - workers rule."""
    from clipexp.training.data import train_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train_threads(2, 0) == 1 and train_threads(8, 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train_threads(2, 0) == 3
    for unusable in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert train_threads(2, 0) == 2 and train_threads(8, 2) == 6
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert train_threads(2, 1) == 2
