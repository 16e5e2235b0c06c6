"""Fault injection on checkpoints: a truncated or corrupt newest file, a disk that fills while one is
written, a resume with a changed config, a checkpoint whose unpickling would run code, an old format.

One real 6-step run (checkpoints at steps 2, 4, 6; a real SQLite MLflow store) is made once; each test
works on its own copy of that run folder and store, injects its fault, and resumes through
``clipexp.training.trainer.train`` as a user would with ``trainer.resume=...``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BASE = ["experiment=smoke", "trainer.max_steps=6", "trainer.save_steps=2", "trainer.eval_steps=2", "trainer.keep_last=10",
        "tracking.experiment=faults"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(work: Path, *overrides: str):
    from clipexp.config.compose import compose as compose_and_validate

    return compose_and_validate([*BASE, f"tracking.uri=sqlite:///{work / 'mlflow.db'}", *overrides])


def _train(work: Path, *overrides: str):
    from clipexp.training.trainer import train

    return train(_cfg(work, *overrides), output_dir=work / "run")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, one_thread):
    """The reference: 6 steps, uninterrupted; its metrics.json is what every good resume must reproduce
    (at the same thread count as the resumes, so the same float32 sums)."""
    work = tmp_path_factory.mktemp("base")
    _train(work)
    return work


@pytest.fixture
def work(base_run, tmp_path):
    """A private copy of the reference run folder and store, with the reference metrics kept aside."""
    dest = tmp_path / "w"
    shutil.copytree(base_run, dest)
    (dest / "reference_metrics.json").write_bytes((dest / "run" / "metrics.json").read_bytes())
    (dest / "run" / "metrics.json").unlink()
    return dest


def ckpt(work: Path, step: int) -> Path:
    return work / "run" / "checkpoints" / f"step_{step:07d}.pt"


def _run_of(work: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1  # a resume continues the one run, never starts another
    return client, runs[0]


def _assert_same_results_as_reference(work: Path):
    ref = json.loads((work / "reference_metrics.json").read_text())
    got = json.loads((work / "run" / "metrics.json").read_text())
    assert got["steps"] == ref["steps"] == 6
    # the same computation in the same process and thread count: equal up to the last bits of float32
    # losses (values O(1)); the recalls and ranks are exact
    for section in ("final", "best", "test"):
        for key, value in ref[section].items():
            assert got[section][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (section, key)


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------------------ format
def test_every_checkpoint_loads_with_weights_only(base_run):
    from clipexp.training.checkpoint import FORMAT

    files = sorted((base_run / "run" / "checkpoints").glob("*.pt"))
    assert [f.name for f in files] == ["best.pt", "step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]
    summary = json.loads((base_run / "run" / "metrics.json").read_text())
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)  # plain types and tensors only
        assert state["model"] and all(isinstance(v, torch.Tensor) for v in state["model"].values()), f.name
        if f.name == "best.pt":  # the weights of the best evaluation, with what made them the best
            assert (state["step"], state["monitor"], state["value"]) == (summary["best_step"], "val/t2i_R1", summary["best_value"])
        else:  # a step checkpoint: its own step, in the current format
            assert state["step"] == int(f.stem.split("_")[1]) and state["format"] == FORMAT, f.name
        # each with its sha256 manifest beside it, in sha256sum's format
        assert (f.parent / f"{f.name}.sha256").read_text() == f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"


# ---------------------------------------------------------------------------- truncated / corrupt
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scribble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[: 4096] = b"\x00" * 4096        # the zip header and the pickle's first records
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _scribble], ids=["truncated", "zeroed"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(work, damage, caplog):
    damage(ckpt(work, 6))
    with caplog.at_level(logging.WARNING, logger="clipexp"):
        _train(work, "trainer.resume=latest")
    lines = [r.getMessage() for r in caplog.records if str(ckpt(work, 6)) in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines            # one line, naming the damaged file
    assert str(ckpt(work, 4)) in lines[0]                             # ... and the one resumed from instead
    _assert_same_results_as_reference(work)                           # steps 5 and 6 trained again, exactly
    _, run = _run_of(work)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "4"


def test_damaged_checkpoint_named_explicitly_is_refused_in_one_line(work):
    from clipexp.errors import UserError

    _truncate(ckpt(work, 6))
    with pytest.raises(UserError) as info:
        _train(work, f"trainer.resume={ckpt(work, 6)}")
    line = _one_line(info.value)
    assert str(ckpt(work, 6)) in line and "truncated or corrupt" in line and str(ckpt(work, 4)) in line
    assert not (work / "run" / "metrics.json").exists()              # nothing trained from scratch


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(work):
    from clipexp.errors import UserError

    for step in (2, 4, 6):
        _truncate(ckpt(work, step))
    with pytest.raises(UserError) as info:
        _train(work, "trainer.resume=latest")
    line = _one_line(info.value)
    assert all(str(ckpt(work, s)) in line or ckpt(work, s).name in line for s in (2, 4, 6)), line
    assert not (work / "run" / "metrics.json").exists()


def _flip_a_tensor_byte(path: Path) -> None:
    """One bit flipped in the middle of the largest tensor record: the zip's directory and headers are intact and
    torch.load still reads the file (into one wrong weight); only the bytes differ from what was written."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_byte_in_tensor_data_is_detected_and_latest_falls_back(work, caplog):
    """A bit flip inside step 6's tensor data: the manifest names it, ``latest`` resumes from step 4 (which, like a
    checkpoint of an older clipexp, has no manifest and still loads) and trains steps 5-6 again, exactly."""
    from clipexp.errors import UserError

    _flip_a_tensor_byte(ckpt(work, 6))
    assert torch.load(ckpt(work, 6), weights_only=True)["step"] == 6   # torch alone does not notice
    (ckpt(work, 4).parent / "step_0000004.pt.sha256").unlink()       # written before manifests existed
    with pytest.raises(UserError) as info:
        _train(work, f"trainer.resume={ckpt(work, 6)}")
    line = _one_line(info.value)
    assert str(ckpt(work, 6)) in line and "does not match its manifest step_0000006.pt.sha256" in line, line
    assert f"trainer.resume={ckpt(work, 4)}" in line, line
    with caplog.at_level(logging.WARNING, logger="clipexp"):
        _train(work, "trainer.resume=latest")
    lines = [r.getMessage() for r in caplog.records if str(ckpt(work, 6)) in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "its sha256" in lines[0] and "does not match its manifest" in lines[0] and str(ckpt(work, 4)) in lines[0], lines[0]
    _assert_same_results_as_reference(work)
    _, run = _run_of(work)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "4"


# ------------------------------------------------------------------------------------ disk full
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one_and_the_run(work, monkeypatch):
    """A writer that fills the disk half-way through step 4's checkpoint (what ENOSPC looks like; the same fault from the
    kernel, through the CLI: tests/training/test_faults_midrun.py)."""
    import io

    from clipexp.errors import WriteError

    fresh = work / "fresh"
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))  # a path, or the file it opened
        if "step_0000004" in name:
            whole = io.BytesIO()
            real_save(obj, whole, *args, **kwargs)
            with open(name, "r+b") as out:
                out.write(whole.getvalue()[:1000])  # what got onto the disk before it filled
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    from clipexp.training.trainer import train

    with pytest.raises(WriteError) as info:
        train(_cfg(work, "tracking.experiment=disk_full"), output_dir=fresh)
    line = _one_line(info.value)
    target, previous = fresh / "checkpoints" / "step_0000004.pt", fresh / "checkpoints" / "step_0000002.pt"
    assert "No space left on device" in line and str(target.parent) in line and str(previous) in line, line
    assert sorted(p.name for p in target.parent.iterdir()) == ["best.pt", "best.pt.sha256", "step_0000002.pt",
                                                               "step_0000002.pt.sha256"]   # no half-written file
    assert torch.load(previous, weights_only=True)["step"] == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("disk_full").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------- changed config
def test_resume_with_a_changed_config_is_refused_listing_the_keys(work):
    from clipexp.errors import CheckpointError

    with pytest.raises(CheckpointError) as info:
        _train(work, f"trainer.resume={ckpt(work, 4)}", "loss=siglip", "trainer.batch_size=4", "data.max_samples=64")
    line = _one_line(info.value)
    for key in ("loss._target_", "trainer.batch_size", "data.max_samples"):
        assert key in line, line
    assert "trainer.resume_allow_changes" in line
    assert "tracking." not in line and "trainer.resume=" not in line   # where the run logs is not its maths
    assert not (work / "run" / "metrics.json").exists()


def test_resume_with_allowed_changes_goes_on_and_records_them(work):
    from clipexp.errors import UserError

    with pytest.raises(UserError) as info:  # only the keys not allowed are listed
        _train(work, f"trainer.resume={ckpt(work, 4)}", "trainer.max_steps=8", "trainer.learning_rate=5e-4",
               "trainer.resume_allow_changes=[trainer.max_steps]")
    line = _one_line(info.value)
    assert "trainer.learning_rate" in line and "trainer.max_steps" not in line, line

    _train(work, f"trainer.resume={ckpt(work, 4)}", "trainer.max_steps=8", "trainer.learning_rate=5e-4",
           "trainer.resume_allow_changes=[trainer.max_steps,trainer.learning_rate]")
    got = json.loads((work / "run" / "metrics.json").read_text())
    assert got["steps"] == 8
    _, run = _run_of(work)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "4"
    changes = run.data.tags["resume_changes"]
    assert "trainer.max_steps: 6 -> 8" in changes and "trainer.learning_rate: 0.001 -> 0.0005" in changes


# ---------------------------------------------------------------------------- unsafe / old pickles
class _OpensAFile:
    """Unpickling this calls open(marker, "w"): the smallest 'runs code' there is."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_would_run_code_is_refused_and_never_unpickled(work):
    from clipexp.errors import UserError

    marker = work / "pwned"
    state = torch.load(ckpt(work, 6), weights_only=True)
    state["extra"] = _OpensAFile(marker)
    torch.save(state, ckpt(work, 8))
    assert not marker.exists()
    for resume in ("latest", str(ckpt(work, 8))):
        with pytest.raises(UserError) as info:
            _train(work, f"trainer.resume={resume}")
        line = _one_line(info.value)
        assert str(ckpt(work, 8)) in line and "open" in line and "could run code" in line, line
        assert not marker.exists()
    assert not (work / "run" / "metrics.json").exists()


def test_old_format_checkpoint_says_how_to_upgrade_and_the_upgrade_resumes(work):
    import numpy as np

    from clipexp.errors import UserError

    old = torch.load(ckpt(work, 4), weights_only=True)
    name, keys, pos, has_gauss, cached = old["rng"]["numpy"]       # the old format pickled numpy's state
    old["rng"]["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)  # as it is: an array
    old.pop("format", None)
    for step in (4, 6):
        ckpt(work, step).unlink()
        (ckpt(work, step).parent / f"{ckpt(work, step).name}.sha256").unlink()  # an older clipexp wrote no manifest
    torch.save(old, ckpt(work, 4))
    with pytest.raises(UserError) as info:
        _train(work, "trainer.resume=latest")
    line = _one_line(info.value)
    assert str(ckpt(work, 4)) in line and f"clipexp upgrade {ckpt(work, 4)}" in line, line

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "clipexp", "upgrade", str(ckpt(work, 4))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.load(ckpt(work, 4), weights_only=True)["step"] == 4
    _train(work, "trainer.resume=latest")
    _assert_same_results_as_reference(work)


def test_resume_latest_never_continues_a_sibling_run(work):
    """A new run folder beside a run with checkpoints: ``latest`` refuses in one line (the sibling's files are
    not this run's), ``latest_or_new`` starts a new run from step 0, and naming the sibling's folder resumes it."""
    from clipexp.errors import UserError
    from clipexp.training.trainer import train

    sibling = work / "new"
    with pytest.raises(UserError, match=r"^trainer.resume='latest' is invalid: this run's folder has no checkpoint"):
        train(_cfg(work, "trainer.resume=latest"), output_dir=sibling)
    assert not (sibling / "checkpoints").exists() or not list((sibling / "checkpoints").iterdir())
    fresh = train(_cfg(work, "trainer.resume=latest_or_new", "trainer.max_steps=2"), output_dir=sibling)
    assert sorted(p.name for p in (sibling / "checkpoints").glob("step_*.pt")) == ["step_0000002.pt"]
    assert fresh["baseline"] and json.loads((sibling / "metrics.json").read_text()).get("resumed_from") in (None, "")
    named = train(_cfg(work, f"trainer.resume={work / 'run'}"), output_dir=work / "third")  # the run folder, named
    assert named["final"] == json.loads((work / "reference_metrics.json").read_text())["final"]
