"""What a run finds wrong before it trains: an output folder it cannot write, a batch larger than the data, a
config value or a data row that fails validation. Each is one line (or one warning) and leaves nothing behind."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _read_only_mounts_work() -> bool:
    """root ignores file modes, so as root a read-only folder is a read-only mount, in a mount namespace of its own
    (``unshare --mount``: it ends with the process, nothing is left mounted)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def run_with_read_only(folder: Path, args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m clipexp <args>`` in ``cwd`` with ``folder`` read-only: its mode (a user) or a read-only mount (root)."""
    env = {**{k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "clipexp", *args]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        finally:
            folder.chmod(0o755)
    if not _read_only_mounts_work():
        pytest.skip("running as root without the right to mount: no folder here is read-only to this process")
    script = 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, str(folder), *command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_read_only_outputs_folder_is_one_line_naming_hydra_run_dir(tmp_path):
    """``outputs/`` cannot be written: exit code 2 and one line that names the folder and ``hydra.run.dir``, before
    anything is created (no run folder, no MLflow store beside it)."""
    (tmp_path / "outputs").mkdir()
    res = run_with_read_only(tmp_path / "outputs", ["experiment=smoke"], tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith(f"clipexp: error: cannot write the run's output folder {tmp_path / 'outputs'}: ")
    assert "hydra.run.dir=<folder>" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"] and list((tmp_path / "outputs").iterdir()) == []


@pytest.mark.parametrize("args,says", [
    (["experiment=smoke", "trainer.learning_rate=-1"], "trainer.learning_rate=-1.0 is invalid"),
    (["model=tiny", "data=csv", "data.path=pairs.csv"], "image 'missing.jpg' not found"),
], ids=["config-value", "data-row"])
def test_a_run_that_fails_validation_leaves_no_outputs_folder(args, says, run_cli, tmp_path):
    """A bad value (found before Hydra starts) or a bad data row (found while the run sets up, after Hydra made the run
    folder): one line, exit code 2, and no outputs/ folder holding only a log."""
    (tmp_path / "pairs.csv").write_text("image_path,caption\nmissing.jpg,a caption\n")
    res = run_cli(*args, "tracking.enabled=false", timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert says in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "outputs").exists(), sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs").rglob("*"))


def test_a_batch_larger_than_the_training_pairs_is_one_warning_and_the_run_records_what_ran(tmp_path, caplog):
    """trainer.batch_size=1000 on the smoke preset's 77 training pairs: one warning, a micro-batch of 77, and the MLflow
    run says so (derived.batch_size=77 beside the trainer.batch_size=1000 that was asked for)."""
    from mlflow.tracking import MlflowClient

    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_and_validate(["experiment=smoke", "trainer.batch_size=1000", f"tracking.uri={uri}", "tracking.experiment=big_batch"])
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        with caplog.at_level(logging.WARNING):
            trainer.setup()
        assert len(trainer.data.train) == 77
        batch = next(iter(trainer.train_loader))
    finally:
        trainer.cleanup()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "batch_size" in r.getMessage()]
    assert warned == ["trainer.batch_size=1000 is more than the 77 training pairs: the micro-batch is 77"]
    assert batch["pixel_values"].shape[0] == 77
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("big_batch").experiment_id])
    assert run.data.params["derived.batch_size"] == "77" and run.data.params["trainer.batch_size"] == "1000"
