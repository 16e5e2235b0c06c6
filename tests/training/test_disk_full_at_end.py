"""A disk that fills at the end of a run, while it writes metrics.json, model/, the plots or the MLflow LoggedModel:
the checkpoints and the MLflow run are kept (FAILED, the reason in its ``failure`` tag), the error is one line
with the command that finishes the export, and that command, run once there is space, writes the outputs from
the checkpoints: a model/ that loads and passes its manifest, metrics.json with the test metrics, a FINISHED run.

Each case is a real tiny run (experiment=smoke, a real SQLite MLflow store) with one writer made to raise ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _fill_the_disk_at(where: str, monkeypatch) -> None:
    """Make the writer of ``where`` fail as a full disk does (after writing part of its file, where it has one)."""
    if where == "metrics.json":
        real = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if "metrics.json" in self.name:
                real(self, data[:10], *args, **kwargs)
                raise _enospc(self)
            return real(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    elif where == "model":
        from transformers import PreTrainedModel

        def save_pretrained(self, save_directory, *args, **kwargs):
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 100)  # what got onto the disk
            raise _enospc(Path(save_directory) / "model.safetensors")

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    elif where == "plots":
        from matplotlib.figure import Figure

        def savefig(self, fname, *args, **kwargs):
            raise _enospc(fname)

        monkeypatch.setattr(Figure, "savefig", savefig)
    else:  # the LoggedModel: MLflow wraps the OSError of its artifact copy
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        def log(cls, *args, **kwargs):
            try:
                raise _enospc("/mlartifacts/clip/artifacts/model.safetensors")
            except OSError as err:
                raise MlflowException("failed to log the model's artifacts") from err

        monkeypatch.setattr(Model, "log", classmethod(log))


@pytest.mark.parametrize("where", ["metrics.json", "model", "plots", "logged_model"])
def test_disk_full_at_the_end_keeps_the_checkpoint_and_the_run_and_the_export_command_finishes(where, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.files import checksum_problem
    from clipexp.serving.inference import CLIPInference
    from clipexp.cli.main import export as export_main
    from clipexp.errors import WriteError
    from clipexp.training.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    cfg = compose_and_validate(["experiment=smoke", f"tracking.uri={uri}", "tracking.experiment=end_full", "tracking.pyfunc_model=true"])
    _fill_the_disk_at(where, monkeypatch)
    with pytest.raises(WriteError) as info:
        train(cfg, output_dir=run_dir)
    monkeypatch.undo()
    line = str(info.value)
    best = run_dir / "checkpoints" / "best.pt"
    assert "\n" not in line and "No space left on device" in line, line
    assert str(best) in line and str(run_dir / "checkpoints" / "step_0000004.pt") in line, line
    assert line.endswith(f"then write the outputs from the checkpoints with `clipexp export {run_dir}`"), line
    assert best.is_file() and checksum_problem(best) is None
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("end_full").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["failure"] == line
    assert "test/zeroshot_acc" in run.data.metrics  # the test evaluation ran before the writes failed

    capsys.readouterr()
    assert export_main([str(run_dir)]) == 0, capsys.readouterr().err[-2000:]
    assert f"model:   {run_dir / 'model'}" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test"]["test/zeroshot_acc"] == pytest.approx(run.data.metrics["test/zeroshot_acc"])
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    inference = CLIPInference.from_pretrained(run_dir / "model", device="cpu")  # passes its SHA256SUMS
    assert inference.spec.class_names and (run_dir / "model" / "SHA256SUMS").is_file()
    [run] = client.search_runs([client.get_experiment_by_name("end_full").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["exported_by"] == f"clipexp export {run_dir}"
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string="name = 'clip'")
    assert any(m.source_run_id == run.info.run_id for m in models)


def test_export_of_a_folder_without_checkpoints_is_one_line(tmp_path, capsys):
    from clipexp.cli.main import export as export_main

    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipexp: error: ") and "no checkpoint" in err[0], err


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_the_cli_prints_one_line_with_the_finishing_command(run_cli, tmp_path):
    """``python -m clipexp`` whose disk fills at metrics.json (a startup hook makes that write fail): exit code 1, the
    last stderr line is the one line with the command, and the command then finishes the run's outputs."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, pathlib\n"
        "_real = pathlib.Path.write_text\n"
        "def _write_text(self, data, *a, **k):\n"
        "    if 'metrics.json' in self.name:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(self))\n"
        "    return _real(self, data, *a, **k)\n"
        "pathlib.Path.write_text = _write_text\n")
    root = Path(__file__).resolve().parents[2]
    res = run_cli("experiment=smoke", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "hydra.run.dir=run",
                  env={"PYTHONPATH": f"{hook}{os.pathsep}{root}"})
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    run_dir = tmp_path / "run"
    assert last.startswith("clipexp: error: could not write the run's outputs (") and "Traceback" not in res.stderr
    assert last.endswith(f"with `clipexp export {run_dir}`"), last
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "best.pt").is_file()
    done = subprocess.run([sys.executable, "-m", "clipexp", "export", str(run_dir)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4 and (run_dir / "model" / "SHA256SUMS").is_file()
