"""The trainer against references that do not share its code: the loss class called on the towers' embeddings, an
independent TemperatureScheduler, early stopping worked out by hand from a run without it, and the unscaled step.

Each run is the tiny CLIP on 96 textile images (``experiment=smoke``), in this process, tracking off; what the trainer
logged is read from ``trainer.history`` (what MLflow and the plots receive). A run with its test evaluation and outputs
takes ~7 s here, so tests of several runs are marked slow, except the adaptive schedule's (the one whose state depends
on the losses). Tolerances: a loss of O(1) computed in float32 by two routes that differ only in how captions are
padded agrees to 1e-5 relative; a temperature is a float32 of the scheduler's float64, so 1e-6 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE = ["experiment=smoke", "tracking.enabled=false"]


def build(output_dir: Path, *overrides: str):
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    return Trainer(compose_and_validate([*SMOKE, *overrides]), output_dir)


def trained(output_dir: Path, *overrides: str):
    """A Trainer that has run ``train()`` to the end (or to early stopping)."""
    trainer = build(output_dir, *overrides)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def logged(trainer, name: str):
    return [value for _, value in trainer.history[name]]


# ----------------------------------------------------------------------------- the loss the step takes
def test_a_step_takes_the_loss_class_on_the_towers_embeddings_with_the_batchs_group_ids(tmp_path):
    """The loss and the gradient norm of ``Trainer.step`` on a batch with several samples per caption group equal those
    of the loss class ``conf/loss/contrastive.yaml`` names, called directly on the towers' embeddings of the unpacked
    batch with the batch's group ids. A trainer that dropped the group ids (the other samples of a group treated as
    negatives) is off by far more than the tolerance on this batch."""
    from builders import loss_from_conf

    from clipexp.models.clip import image_features, text_features
    from clipexp.training.data import DeviceBatches

    trainer = build(tmp_path / "run", "data.augment_text=true")  # each image's caption drawn from its class's prompts
    try:
        trainer.setup()
        batch = next(iter(trainer.train_loader))
        groups, ids = batch["group_ids"].tolist(), batch["input_ids"]
        pairs = [(i, j) for i in range(len(groups)) for j in range(i) if groups[i] == groups[j]]
        assert pairs, groups  # samples of one group: the targets have several positives
        assert any(not torch.equal(ids[i], ids[j]) for i, j in pairs)  # with other wording (identical captions would give
        # identical text embeddings, and then the multi-positive loss equals the plain one, value and gradient)

        b = DeviceBatches(torch.device("cpu"), trainer.data.train.image_transform, pack=False, dedup=False)(batch)
        image = image_features(trainer.model, b["pixel_values"])
        text = text_features(trainer.model, b["input_ids"], b["attention_mask"])
        loss_fn = loss_from_conf("contrastive")
        expected = loss_fn(image, text, group_ids=b["group_ids"], labels=b["labels"])["loss"]
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(expected, params, allow_unused=True)
        expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
        single_positive = loss_fn(image, text, group_ids=None)["loss"]

        out = trainer.step(batch)
    finally:
        trainer.cleanup()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["grad_norm"].item() == pytest.approx(expected_norm.item(), rel=1e-4)
    assert abs(single_positive.item() - expected.item()) > 1e-2  # the group ids change this batch's loss


# ----------------------------------------------------------------------------- temperature schedules
SCHEDULES = {  # the schedule's options on the command line, and the same numbers for the independent scheduler
    "warmup": (["temperature_schedule.warmup_steps=4"], dict(warmup_steps=4)),
    "cosine": (["temperature_schedule.warmup_steps=2"], dict(warmup_steps=2)),
    "exponential": (["temperature_schedule.decay_rate=0.8"], dict(decay_rate=0.8)),
    "adaptive": (["temperature_schedule.patience=1", "temperature_schedule.factor=0.8"], dict(patience=1, factor=0.8)),
}
STEPS = 8


@pytest.mark.parametrize("schedule", [pytest.param(name, marks=[] if name == "adaptive" else [pytest.mark.slow]) for name in sorted(SCHEDULES)])
def test_each_step_uses_the_schedules_temperature_and_a_resume_continues_the_sequence(schedule, tmp_path):
    """``temperature_schedule=<name>``: the temperature each step's loss used (``train/temperature``) is what an
    independent TemperatureScheduler gives for that step (``adaptive``: fed the loss of each step before, as the
    trainer sees it); resumed from step 4's checkpoint, steps 5..8 use the same temperatures and give the same losses."""
    from clipexp.losses.temperature_scheduler import TemperatureScheduler

    options, numbers = SCHEDULES[schedule]
    args = [f"temperature_schedule={schedule}", *options, f"trainer.max_steps={STEPS}", "trainer.save_steps=4", "trainer.eval_steps=4",
            "trainer.eval_at_start=false", "trainer.keep_last=5"]
    whole = trained(tmp_path / "whole", *args)
    temperatures, losses = logged(whole, "train/temperature"), logged(whole, "train/loss")
    assert [s for s, _ in whole.history["train/temperature"]] == list(range(1, STEPS + 1))

    reference = TemperatureScheduler(initial_temp=0.07, min_temp=0.01, max_temp=0.1, total_steps=STEPS, schedule_type=schedule,
                                     **{"warmup_steps": 0, **numbers})
    expected = [reference.step(s, loss=losses[s - 1] if s else None) for s in range(STEPS)]
    assert temperatures == pytest.approx(expected, rel=1e-6)
    assert len({round(t, 6) for t in expected}) >= 3, expected  # the schedule moved during the run

    resumed = trained(tmp_path / "resumed", *args, f"trainer.resume={tmp_path / 'whole' / 'checkpoints' / 'step_0000004.pt'}")
    # (its history holds steps 1..4 from the checkpoint, then its own 5..8)
    assert resumed.history["train/temperature"] == whole.history["train/temperature"]
    assert resumed.history["train/loss"] == whole.history["train/loss"]


# ----------------------------------------------------------------------------- early stopping
def first_stop(values, patience: int):
    """Where early stopping with ``patience`` stops on this sequence of (step, value) evaluations (higher is better),
    worked out from the definition: the step of the ``patience``-th evaluation in a row without a new best, and
    the step of the best value at that point."""
    best, best_step, without = None, None, 0
    for step, value in values:
        if best is None or value > best:
            best, best_step, without = value, step, 0
        else:
            without += 1
            if without >= patience:
                return step, best_step
    return None, best_step


@pytest.mark.slow  # two runs of 12 steps, evaluated at each
def test_early_stopping_stops_after_exactly_patience_evaluations_without_improvement(tmp_path):
    """A run evaluated every step without early stopping gives the sequence of val/t2i_R1; with
    trainer.early_stopping_patience=2 the run stops at the evaluation this sequence says, with best.pt from the
    step that was best then, and the same numbers up to there."""
    from clipexp.training.checkpoint import load_checkpoint

    args = ["trainer.max_steps=12", "trainer.eval_steps=1", "trainer.save_steps=100", "trainer.learning_rate=3e-3"]
    free = trained(tmp_path / "free", *args)
    history = free.history["val/t2i_R1"]
    stop, best_step = first_stop(history, patience=2)
    assert stop is not None and 0 < best_step < stop < 12, history  # the run has a new best, then a plateau

    stopped = trained(tmp_path / "stopped", *args, "trainer.early_stopping_patience=2")
    assert stopped.global_step == stop
    assert stopped.history["val/t2i_R1"] == [(s, v) for s, v in history if s <= stop]
    best = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "best.pt")
    assert best["step"] == best_step == stopped.best_step
    assert (tmp_path / "stopped" / "checkpoints" / f"step_{stop:07d}.pt").is_file()  # the stop is saved too


# ----------------------------------------------------------------------------- the GradScaler path
@pytest.fixture
def grad_scaler_on_cpu(monkeypatch):
    """The trainer's fp16 path (GradScaler: scale the loss, unscale before clipping, skip non-finite steps) on this CPU:
    a device whose use_grad_scaler is true, the forward still in fp32 (so the scaled run can be compared with the
    plain one). torch.amp.GradScaler("cpu") is a real scaler."""
    from dataclasses import dataclass, fields
    from types import SimpleNamespace

    import clipexp.training.trainer as trainer_module
    from clipexp.device import DeviceInfo

    @dataclass(frozen=True)
    class ScaledInfo(DeviceInfo):
        @property
        def use_grad_scaler(self) -> bool:
            return True

    real = trainer_module.build_device

    def build_device(*args, **kwargs):
        info = real(*args, **kwargs).info
        return SimpleNamespace(device=info.device, info=ScaledInfo(**{f.name: getattr(info, f.name) for f in fields(info)}))

    monkeypatch.setattr(trainer_module, "build_device", build_device)


@pytest.mark.slow  # three runs
def test_the_grad_scaler_path_equals_the_plain_step_and_resumes_its_scale_exactly(tmp_path, grad_scaler_on_cpu, monkeypatch):
    """Scaled by 2^16 and unscaled before clipping, the gradients are those of the plain run up to float32 rounding
    (the scale is a power of two), so the losses agree to 1e-6 relative; resumed from step 4, the scaler's state
    (scale, growth tracker) and the losses are exactly those of the run that did not stop."""
    from clipexp.training.checkpoint import load_checkpoint

    args = ["trainer.max_steps=8", "trainer.save_steps=4", "trainer.eval_steps=8", "trainer.eval_at_start=false", "trainer.keep_last=5"]
    scaled = trained(tmp_path / "scaled", *args)
    assert scaled.scaler.is_enabled() and scaled.scaler.get_scale() == 2.0 ** 16
    last = load_checkpoint(tmp_path / "scaled" / "checkpoints" / "step_0000008.pt")
    assert last["scaler"]["_growth_tracker"] == 8  # eight steps taken with finite gradients: the state moves each step

    resumed = trained(tmp_path / "resumed", *args, f"trainer.resume={tmp_path / 'scaled' / 'checkpoints' / 'step_0000004.pt'}")
    assert resumed.scaler.state_dict() == scaled.scaler.state_dict()
    assert resumed.history["train/loss"] == scaled.history["train/loss"]  # steps 1..4 from the checkpoint, 5..8 its own

    monkeypatch.undo()  # the plain path
    plain = trained(tmp_path / "plain", *args)
    assert not plain.scaler.is_enabled()
    assert logged(scaled, "train/loss") == pytest.approx(logged(plain, "train/loss"), rel=1e-6)
