"""The trainer's loader workers: started once for the whole run, stopped by cleanup, and yielding exactly
the data items built in the main process give, across epochs and across a resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from clipexp.config.compose import compose as compose_and_validate
from clipexp.training.trainer import Trainer

# 96 textile images (76 train), the tiny model; micro-batch 16: 4 steps per epoch, so 10 steps span 3 epochs
BASE = [
    "experiment=smoke", "tracking.enabled=false", "trainer.eval_at_start=false", "trainer.eval_steps=1000",
    "trainer.save_steps=6", "trainer.progress=false", "trainer.batch_size=16", "trainer.max_steps=10",
]


def _children() -> list:
    return sorted(c.pid for c in psutil.Process().children(recursive=True))


def _run(tmp_path: Path, name: str, *overrides: str) -> SimpleNamespace:
    """Train one run, recording per step its epoch, dataset indices, uint8 pixels and the live child processes."""
    trainer = Trainer(compose_and_validate([*BASE, *overrides]), tmp_path / name).setup()
    rec = SimpleNamespace(steps=[])
    batches = trainer._logical_batches

    def recording_batches():
        for batch in batches():
            rec.steps.append(SimpleNamespace(epoch=trainer.epoch, indices=batch["indices"].tolist(),
                                             pixels=batch["pixel_values"].clone(), children=_children()))
            yield batch

    trainer._logical_batches = recording_batches  # an instance attribute shadows the method train() calls
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    rec.after_cleanup = _children()
    rec.workers = trainer.train_loader.num_workers
    rec.losses = [v for _, v in trainer.history["train/loss"]]
    rec.params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rec.output = tmp_path / name
    return rec


def _same_data(a: list, b: list) -> None:
    assert [s.indices for s in a] == [s.indices for s in b]
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, b))


def test_persistent_workers_give_the_in_process_data_and_stop_with_the_run(tmp_path):
    before = _children()
    inline = _run(tmp_path, "inline", "data.num_workers=0")
    worker = _run(tmp_path, "worker", "data.num_workers=1")
    assert (inline.workers, worker.workers) == (0, 1)
    assert [s.epoch for s in worker.steps] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]

    # the same items (indices, augmentation draws, pixels) epoch after epoch, and the same training
    _same_data(inline.steps, worker.steps)
    assert worker.losses == pytest.approx(inline.losses, rel=1e-5)

    # one worker process served all three epochs (not re-started per epoch), and cleanup stopped it
    started = [sorted(set(s.children) - set(before)) for s in worker.steps]
    assert len(started[0]) == 1 and all(pids == started[0] for pids in started)
    assert all(set(s.children) <= set(before) for s in inline.steps)
    assert set(worker.after_cleanup) <= set(before)


def test_resume_mid_epoch_with_persistent_workers_continues_the_same_data(tmp_path):
    full = _run(tmp_path, "full", "data.num_workers=1")
    checkpoint = full.output / "checkpoints" / "step_0000006.pt"  # half-way through epoch 1
    assert checkpoint.is_file()
    resumed = _run(tmp_path, "resumed", "data.num_workers=1", f"trainer.resume={checkpoint}")

    assert [s.epoch for s in resumed.steps] == [1, 1, 2, 2]
    _same_data(full.steps[6:], resumed.steps)
    assert resumed.params.keys() == full.params.keys()
    assert all(torch.equal(resumed.params[n], full.params[n]) for n in full.params)
