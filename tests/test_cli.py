"""The one command line: ``clipexp train | predict | replay | upgrade | ui`` (and ``python -m clipexp``), each
with a short ``--help``; the short top-level help; Hydra's long help behind ``--help-all``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clipexp(*args, cwd, env=None, module="clipexp.cli.main", timeout=180):
    """``clipexp ...`` as the console script runs it (``module``: ``clipexp`` for ``python -m clipexp``)."""
    full = {k: v for k, v in os.environ.items() if k not in ("CLIPEXP_RUN_STAMP", "MLFLOW_TRACKING_URI")}
    full.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def test_console_script_is_the_dispatcher():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'clipexp = "clipexp.cli.main:main"' in text


@pytest.mark.parametrize("module,args", [("clipexp", ["--help"]), ("clipexp.cli.main", ["--help"]), ("clipexp.cli.main", []),
                                         ("clipexp.cli.main", ["train", "--help"])])
def test_short_help_lists_commands_groups_and_examples(tmp_path, module, args):
    from clipexp.cli.help import GROUP_DESCRIPTIONS, group_options

    res = clipexp(*args, cwd=tmp_path, module=module)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert len(out.splitlines()) <= 40, out
    for command in ("train", "predict", "export", "shards", "replay", "upgrade", "ui"):
        assert f"\n  {command} " in out
    for group, options in group_options().items():
        assert group in GROUP_DESCRIPTIONS, f"conf/{group}: no one-line description in clipexp/cli/help.py"
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(group + " "))
        assert GROUP_DESCRIPTIONS[group] in line and all(o in line for o in options), line
    assert "clip_vit_b32*" in out and "hydra/launcher" in out and "parallel, slurm" in out
    assert "Examples:" in out and "clipexp train experiment=smoke" in out and "--help-all" in out


def test_help_all_is_hydras_long_help(tmp_path):
    res = clipexp("--help-all", cwd=tmp_path, module="clipexp")
    assert res.returncode == 0, res.stderr
    assert "== Config ==" in res.stdout and "monitor: val/t2i_R1" in res.stdout
    assert len(res.stdout.splitlines()) > 100


def test_train_runs_through_the_dispatcher_like_python_m_clipexp(tmp_path):
    a = clipexp("train", "--cfg", "job", "model=tiny", "domain=medical", cwd=tmp_path)
    b = clipexp("--cfg", "job", "model=tiny", "domain=medical", cwd=tmp_path, module="clipexp")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "name: medical" in a.stdout


def test_unknown_command_is_one_line(tmp_path):
    res = clipexp("trian", "experiment=smoke", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("clipexp: error: unknown command 'trian': one of train, predict, export, shards, replay, upgrade, ui")


@pytest.mark.parametrize("command", ["predict", "export", "shards", "replay", "upgrade", "ui"])
def test_every_command_has_a_short_help_with_examples(tmp_path, command):
    res = clipexp(command, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: clipexp {command}") and "examples:" in res.stdout and f"clipexp {command} " in res.stdout
    assert len(res.stdout.splitlines()) <= 40


def _tracked_run_folder(path: Path, uri: str) -> Path:
    path.mkdir(parents=True)
    (path / "mlflow_run.json").write_text(json.dumps({"uri": uri, "experiment": "e", "run_id": "r"}))
    return path


def test_ui_opens_the_store_of_the_run_folder_or_of_the_current_folder(tmp_path):
    run = _tracked_run_folder(tmp_path / "outputs" / "run", "sqlite:////data/elsewhere/mlflow.db")
    res = clipexp("ui", str(run), "--port", "5123", "--print-command", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == "sqlite:////data/elsewhere/mlflow.db"
    assert cmd[cmd.index("--port") + 1] == "5123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "/data/elsewhere/mlartifacts"
    here = clipexp("ui", "--print-command", cwd=tmp_path).stdout.split()
    assert here[here.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    env = clipexp("ui", "--print-command", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}).stdout.split()
    assert env[env.index("--backend-store-uri") + 1] == "http://127.0.0.1:9" and "--artifacts-destination" not in env


def test_ui_and_replay_refuse_a_folder_without_a_run_in_one_line(tmp_path):
    for command in ("ui", "replay"):
        res = clipexp(command, str(tmp_path), cwd=tmp_path)
        assert res.returncode == 2
        assert res.stderr.strip() == f"clipexp: error: {tmp_path}: no mlflow_run.json (not the folder of a tracked run)" + (
            "; give a run folder or --backend-store-uri" if command == "ui" else "")


def test_replay_sends_held_writes_to_the_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    run = _tracked_run_folder(tmp_path / "run", uri)
    (run / "mlflow_run.json").write_text(json.dumps({"uri": uri, "experiment": "e", "run_id": run_id}))
    (run / "mlflow_pending.jsonl").write_text(json.dumps({"kind": "metrics", "payload": {"values": {"val/t2i_R1": 0.5},
                                                                                         "step": 3, "timestamp": 1}}) + "\n")
    res = clipexp("replay", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "sent 1 held writes to the run's MLflow store"
    assert client.get_run(run_id).data.metrics == {"val/t2i_R1": 0.5}
    assert clipexp("replay", str(run), cwd=tmp_path).stdout.startswith("nothing to send")


def test_upgrade_rewrites_an_old_checkpoint(tmp_path):
    import numpy as np
    import torch

    path = tmp_path / "step_0000004.pt"
    torch.save({"step": 4, "model": {"w": torch.ones(2)}, "rng": {"numpy": ("MT19937", np.arange(4, dtype=np.uint32), 0, 0, 0.0)}},
               path)
    res = clipexp("upgrade", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"upgraded {path} (the original is {path}.old)"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and (tmp_path / "step_0000004.pt.old").is_file()
    missing = clipexp("upgrade", str(tmp_path / "nope.pt"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == f"clipexp: error: {tmp_path / 'nope.pt'}: no such checkpoint file"


def test_predict_runs_through_the_dispatcher(tmp_path):
    res = clipexp("predict", "zero_shot", "--model", str(tmp_path / "nothing"), "--images", str(tmp_path), "--out",
                  str(tmp_path / "p.csv"), cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipexp: error: --model"), res.stderr
