"""clipexp.training.checkpoint on real files: atomic writes, keep-last, best, what ``resume`` finds, RNG states.
(Damaged, unsafe and old-format files, full disks and changed configs: tests/test_faults_checkpoints.py.)"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from clipexp.errors import ConfigError
from clipexp.training import checkpoint
from clipexp.training.checkpoint import pick_checkpoint


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_is_plain_types_and_tensors_and_restores_every_generator(tmp_path):
    checkpoint.seed_everything(7)
    path = checkpoint.save_checkpoint(checkpoint.step_path(tmp_path, 3), {"rng": checkpoint.rng_state(), "step": 3})
    want = _draws()
    _draws()  # move every generator on
    state = torch.load(path, weights_only=True)  # no pickled NumPy object: loads with weights_only
    checkpoint.set_rng_state(state["rng"])
    assert _draws() == want and state["step"] == 3 and path.name == "step_0000003.pt"


def test_set_rng_state_reads_the_older_numpy_state_tuple():
    checkpoint.seed_everything(1)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    want = _draws()
    checkpoint.set_rng_state(old)
    assert _draws() == want


def test_save_keeps_the_last_k_steps_and_never_the_temp_file_or_best(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpoint.save_best(ckpt, {"w": torch.ones(1)}, {}, step=1, monitor="val/loss", value=0.5)
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(checkpoint.step_path(ckpt, step), {"step": step}, keep_last=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "best.pt.sha256", "step_0000003.pt", "step_0000003.pt.sha256",
                                                      "step_0000004.pt", "step_0000004.pt.sha256"]  # pruned with their manifests
    best = checkpoint.load_checkpoint(ckpt / checkpoint.BEST)
    assert (best["step"], best["monitor"], best["value"], best["model"]["w"].tolist()) == (1, "val/loss", 0.5, [1.0])


def test_latest_looks_only_in_this_runs_folder_never_in_a_sibling(tmp_path):
    outputs = tmp_path / "outputs"
    sibling, this = (outputs / "2026-01-01" / t for t in ("11-00-00", "12-00-00"))
    checkpoint.save_checkpoint(checkpoint.step_path(sibling / "checkpoints", 2), {"step": 2})  # someone else's run, newer file
    assert checkpoint.find_latest_checkpoint(this) is None
    with pytest.raises(ConfigError, match=r"^trainer.resume='latest' is invalid: this run's folder has no checkpoint "
                                          r"\(.*12-00-00/checkpoints\); .*trainer.resume=latest_or_new"):
        pick_checkpoint("latest", this)
    assert pick_checkpoint("latest_or_new", this) is None  # a new run, not the sibling's
    checkpoint.save_checkpoint(checkpoint.step_path(this / "checkpoints", 1), {"step": 1})
    assert checkpoint.find_latest_checkpoint(this) == this / "checkpoints" / "step_0000001.pt"
    assert pick_checkpoint("latest", this)[0] == pick_checkpoint("latest_or_new", this)[0] == this / "checkpoints" / "step_0000001.pt"
    # a run folder named explicitly: its newest checkpoint
    path, state = pick_checkpoint(str(sibling), this)
    assert (path, state["step"]) == (sibling / "checkpoints" / "step_0000002.pt", 2)


def test_resume_with_nothing_to_resume_names_the_key(tmp_path):
    run = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    with pytest.raises(ConfigError, match=r"^trainer.resume='latest' is invalid: this run's folder has no checkpoint"):
        pick_checkpoint("latest", run)
    with pytest.raises(ConfigError, match=r"trainer.resume='/nope.pt' is invalid: /nope.pt is neither a checkpoint file nor a run folder"):
        pick_checkpoint("/nope.pt", run)


def test_resuming_another_runs_checkpoint_adopts_its_best(tmp_path):
    other, this = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    checkpoint.save_best(other, {"w": torch.zeros(2)}, {}, step=5, monitor="val/t2i_R1", value=0.25)
    checkpoint.adopt_best(checkpoint.step_path(other, 6), this)
    assert checkpoint.load_checkpoint(this / checkpoint.BEST)["step"] == 5
    checkpoint.adopt_best(checkpoint.step_path(this, 6), this)  # its own folder: nothing to copy
    assert sorted(p.name for p in this.iterdir()) == ["best.pt", "best.pt.sha256"]  # copied with its manifest


def test_a_trainers_checkpoint_is_plain_types_and_tensors_and_resumes_its_position(tmp_path):
    """A real run's step checkpoint loads with ``weights_only=True`` (what a safe loader will use) and
    holds every key a resume reads."""
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import train

    cfg = compose_and_validate(["experiment=smoke", "tracking.enabled=false", "data.num_workers=0", "trainer.eval_at_start=false",
                                "trainer.max_steps=2", "trainer.save_steps=1", "trainer.eval_steps=2", "trainer.keep_last=1"])
    train(cfg, output_dir=tmp_path / "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt"))  # (each with its .sha256 manifest)
    assert ckpts == ["best.pt", "step_0000002.pt"]  # keep_last=1 pruned step 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert set(state) == {"model", "robust", "loss_fn", "optimizer", "scaler", "temp_schedule", "loss_temperature", "oom", "step",
                          "epoch", "batch_in_epoch", "best_value", "best_step", "evals_without_improvement", "history", "results",
                          "rng", "run_id", "config", "format"}
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["best_step"]) == (2, 0, 2, 2)
    assert [s for s, _ in state["history"]["train/loss"]] == [1, 2] and state["config"]["trainer"]["max_steps"] == 2
    assert torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["step"] == 2
