"""End to end through the CLI: a real textile subset, the tiny model, a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import wait_for

ROOT = Path(__file__).resolve().parents[2]

SMOKE = ["experiment=smoke"]  # tiny model, 96 textile images, 4 steps, eval every 2, save every 2


def _store(tmp_path: Path) -> str:
    return f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"


def _client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _only_run(tmp_path: Path, experiment: str = "smoke"):
    client = _client(tmp_path)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_cli_run_is_fully_tracked(run_cli, tmp_path):
    res = run_cli(*SMOKE, _store(tmp_path), "hydra.run.dir=run", "domain=industrial", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "baseline" in res.stdout and "zeroshot_acc" in res.stdout and "mlflow:" in res.stdout
    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED"

    # params: the flattened resolved config (+ derived values)
    p = run.data.params
    assert p["trainer.learning_rate"] == "0.001" and p["model.name"] == "tiny" and p["data.max_samples"] == "96"
    assert p["domain.name"] == "industrial" and run.data.tags["loss"] == "contrastive" and p["trainer.max_steps"] == "4"
    assert p["loss._target_"] == "clipexp.losses.CLIPContrastiveLoss"
    assert p["derived.total_steps"] == "4" and p["derived.batch_size"] == "8"

    # tags
    t = run.data.tags
    assert (t["domain"], t["loss"], t["model"]) == ("industrial", "contrastive", "tiny")
    assert len(t["git_commit"]) >= 7 and "experiment=smoke" in t["hydra_overrides"]

    # metrics at the expected steps: baseline at 0, evals at 2 and 4, train every step, test at the end
    steps = lambda name: [m.step for m in client.get_metric_history(run.info.run_id, name)]
    assert steps("val/t2i_R1") == [0, 2, 4]
    assert steps("val/zeroshot_acc") == [0, 2, 4]
    assert steps("train/loss") == [1, 2, 3, 4]
    for name in ("train/lr", "train/temperature", "train/samples_per_s", "train/grad_norm", "test/i2t_R1", "test/zeroshot_balanced_acc"):
        assert name in run.data.metrics, name
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/lr"), key=lambda m: m.step)]
    assert lrs[0] == pytest.approx(1e-3)          # warmup_steps=1: full LR at the first step
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 2 / 3)))

    # artifacts
    names = _artifact_paths(client, run.info.run_id)
    for expected in ("config.yaml", "metrics.json", "hydra/config.yaml", "hydra/overrides.yaml",
                     "plots/training_curves.png", "plots/similarity_heatmap.png", "plots/zeroshot_confusion.png",
                     "model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/processor_config.json"):
        assert expected in names, (expected, names)

    # the metrics JSON and the logged model (downloaded) work
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl")))
    metrics = json.loads(local.read_text())
    assert set(metrics) >= {"baseline", "final", "best", "test"} and metrics["steps"] == 4
    assert metrics["baseline"]["val/t2i_R1"] == pytest.approx(client.get_metric_history(run.info.run_id, "val/t2i_R1")[0].value)
    model_dir = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(model_dir), CLIPProcessor.from_pretrained(model_dir)
    from PIL import Image

    from clipexp.models.clip import image_features, text_features

    tok = proc.tokenizer(["a textile fabric with a small local defect."], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    pix = proc.image_processor([Image.new("RGB", (90, 90), (120, 120, 120))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert image_features(model, pix).shape == text_features(model, tok["input_ids"], tok["attention_mask"]).shape == (1, 64)


def _artifact_paths(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(_artifact_paths(client, run_id, f.path) if f.is_dir else [f.path])
    return out


def test_tracking_disabled_writes_no_store(run_cli, tmp_path):
    res = run_cli(*SMOKE, "tracking.enabled=false", "hydra.run.dir=run", f"tracking.uri=sqlite:///{tmp_path / 'never.db'}", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (tmp_path / "never.db").exists()
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert ckpts == ["best.pt", "step_0000002.pt", "step_0000004.pt"]


def test_non_finite_loss_stops_naming_the_step(run_cli, tmp_path):
    # a huge learning rate makes the weights overflow after the first update: the step-2 loss is NaN
    res = run_cli(*SMOKE, _store(tmp_path), "hydra.run.dir=run", "trainer.learning_rate=1e30", "trainer.max_grad_norm=0",
                  "trainer.save_steps=1", timeout=600)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("clipexp: error: the loss became nan at step 2; the last good checkpoint is ")
    assert last.endswith("step_0000001.pt; lower trainer.learning_rate, raise loss.temperature or use device.precision=fp32")
    assert (tmp_path / "run" / "checkpoints" / "step_0000001.pt").is_file()
    assert "Traceback" not in res.stderr
    _, run = _only_run(tmp_path)
    assert run.info.status == "FAILED"


def _popen(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "-m", "clipexp", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LONG = ["trainer.max_steps=24", "trainer.save_steps=4", "trainer.eval_steps=8", "trainer.keep_last=10", "data.augment_text=true"]


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_resume_after_sigkill_gives_the_same_final_metrics(tmp_path):
    # uninterrupted reference
    ref = _popen([*SMOKE, *LONG, "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]

    # the same run killed with SIGKILL once step 8's checkpoint exists, then resumed
    args = [*SMOKE, *LONG, _store(tmp_path), f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _popen(args, tmp_path)
    wait_for(tmp_path / "run" / "checkpoints" / "step_0000008.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "metrics.json").exists()   # it really died before the end

    resumed = _popen([*args, "trainer.resume=latest"], tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in out + err

    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert b["steps"] == a["steps"] == 24
    for section in ("final", "test", "best"):
        assert b[section] == a[section], section  # exact: a resume replays the same steps on the same numbers
    # one MLflow run, continued and finished
    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] in {"8", "12"}


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_ctrl_c_saves_a_checkpoint_and_marks_the_run_killed(tmp_path):
    proc = _popen([*SMOKE, *LONG, "trainer.max_steps=400", _store(tmp_path), f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    wait_for(tmp_path / "run" / "checkpoints" / "step_0000004.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "clipexp: interrupted at step" in err
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    # the checkpoint written at the interruption point is named in the message and holds that step
    line = next(l for l in err.splitlines() if l.startswith("clipexp: interrupted at step"))
    step = int(line.split("at step ")[1].split(";")[0])
    ckpt = Path(line.split("checkpoint: ")[1].split(";")[0])
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["step"] == step >= 4


def test_bad_data_fails_before_any_run_is_created(run_cli, tmp_path):
    (tmp_path / "pairs.csv").write_text("image_path,caption\nmissing.jpg,a caption\n")
    res = run_cli("model=tiny", "data=csv", f"data.path={tmp_path / 'pairs.csv'}", _store(tmp_path), timeout=300)
    assert res.returncode == 2
    assert "missing.jpg" in res.stderr and "Traceback" not in res.stderr
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("clipexp")
    assert exp is None or client.search_runs([exp.experiment_id]) == []
