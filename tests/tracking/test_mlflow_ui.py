"""What the MLflow UI shows for a run, read through the REST API of the server ``clipexp ui`` starts: the
experiment is a model-training experiment with the saved runs view on the monitored metric, the runs table's
Dataset (name, digest, source) and Source (command, git commit) columns are filled, the run has its descriptive
name, its results table as description and system metrics (on by default); `clipexp ui` prints the addresses
of the runs and of the run; and the store rule (a run started in a folder keeps its store and artifacts in that
folder) holds. (tests/tracking/test_mlflow_browser.py looks at the same pages in a browser.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from processes import wait_for_http, stop_group

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPEXP_RUN_STAMP", "MLFLOW_TRACKING_URI")}
    env.update({"PYTHONPATH": str(ROOT), **extra})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str):
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as r:
        return json.loads(r.read())


def _post(base: str, path: str, body):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_the_ui_shows_a_training_experiment_with_dataset_source_and_system_metrics(tmp_path):
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.config.validate import eval_metric_names

    args = ["experiment=smoke", "trainer.max_steps=3", "trainer.warmup_steps=10", "trainer.eval_steps=50"]  # system metrics: the default
    res = subprocess.run([sys.executable, "-m", "clipexp.cli.main", "train", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    # the step settings that did not fit the 3 steps: one warning before the first step, the logged config says what ran
    scaled = [line for line in (res.stdout + res.stderr).splitlines() if "settings that did not fit are scaled" in line]
    assert len(scaled) == 1 and "trainer.warmup_steps 10 -> 0 (10% of the steps), trainer.eval_steps 50 -> 3" in scaled[0]
    # the store rule: the current folder's mlflow.db, artifacts in its mlartifacts/, beside outputs/
    assert (tmp_path / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    meta = json.loads((run_dir / "mlflow_run.json").read_text())
    assert meta["uri"] == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert (tmp_path / "mlartifacts" / "smoke" / meta["run_id"] / "artifacts" / "config.yaml").is_file()

    summary = json.loads((run_dir / "metrics.json").read_text())
    # the heatmap of a split with classes: 3 classes' images against 3 classes' prompts (a small picture; 12 captions' is wider)
    from PIL import Image

    with Image.open(run_dir / "plots" / "similarity_heatmap.png") as heatmap:
        assert heatmap.size == (671, 429)

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "clipexp.cli.main", "ui", str(run_dir), "--port", str(port), "--no-browser"], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, timeout=60, what="clipexp ui")
        exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke")["experiment"]
        assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        assert exp["artifact_location"] == str(tmp_path.resolve() / "mlartifacts" / "smoke")
        (run,) = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    finally:  # the UI server and the processes it started (uvicorn) are one process group
        stop_group(server)
    printed = server.stdout.read()
    from clipexp.tracking.ui import run_page_url, runs_page_url, runs_view

    exp_id, run_id = exp["experiment_id"], run["info"]["run_id"]
    assert f"runs (model training): {runs_page_url(base, exp_id, 'clipexp')}\n" in printed
    assert f"this run: {run_page_url(base, exp_id, run_id)}\n" in printed
    assert summary["mlflow"] == {"run_page": run_page_url("http://127.0.0.1:5000", exp_id, run_id), "run_id": run_id,
                                 "experiment_id": exp_id, "tracking_uri": meta["uri"]}
    view = json.loads({t["key"]: t["value"] for t in exp["tags"]}["mlflow.sharedViewState.clipexp"])
    assert json.loads(view["state"]) == json.loads(runs_view(summary["monitor"], "max")["state"])

    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.source.name"] == "clipexp train" and tags["mlflow.source.type"] == "LOCAL"
    assert run["info"]["run_name"] == "tiny, contrastive, industrial, textile, seed 42"
    from clipexp.tracking.outputs import summary_markdown

    assert tags["mlflow.note.content"] == summary_markdown(summary, summary["best_step"], summary["monitor"])
    assert "| zeroshot_balanced_acc | " in tags["mlflow.note.content"]
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_commit"].startswith(tags["mlflow.source.git.commit"])
    inputs = {d["dataset"]["name"]: d for d in run["inputs"]["dataset_inputs"]}
    assert sorted(inputs) == ["textile-test", "textile-train", "textile-val"]
    for name, context in (("textile-train", "training"), ("textile-val", "validation"), ("textile-test", "test")):
        d = inputs[name]
        assert len(d["dataset"]["digest"]) >= 8 and d["dataset"]["source_type"] == "local"
        assert json.loads(d["dataset"]["source"])["uri"].endswith("textile_images/simulated")
        assert {t["key"]: t["value"] for t in d["tags"]} == {"mlflow.data.context": context}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert json.loads(inputs["textile-train"]["dataset"]["profile"])["num_rows"] == int(params["derived.num_train_pairs"])
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert "system/cpu_utilization_percentage" in metrics
    # trainer.monitor is checked against eval_metric_names: exactly what an evaluation logged
    logged_val = {m for m in metrics if m.startswith("val/")}
    assert logged_val == set(eval_metric_names(compose_and_validate(["experiment=smoke"])))
    # what was asked stays the config; what ran (scaled to the 3-step run) is a derived param
    assert (params["trainer.warmup_steps"], params["trainer.eval_steps"]) == ("10", "50")
    assert (params["derived.warmup_steps"], params["derived.eval_steps"], params["derived.total_steps"]) == ("0", "3", "3")
    assert float(params["derived.epochs"]) == round(3 / int(params["derived.steps_per_epoch"]), 4)  # max_steps wins over num_epochs
