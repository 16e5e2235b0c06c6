"""Sweeps end to end: folders, parent/child MLflow runs, the summary, Optuna, joblib, the UI server, the notebook."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from processes import wait_for_http

ROOT = Path(__file__).resolve().parents[2]
FAST = ["experiment=smoke", "trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2"]


def clipexp(args, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "clipexp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def store_uri(path: Path) -> str:
    return f"sqlite:///{path / 'mlflow.db'}"


def parent_and_children(uri: str, experiment: str = "smoke"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "sweep_parent"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], sorted(children, key=lambda r: int(r.data.tags["job_num"]))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 3-job sweep over temperature x learning rate, one job of which diverges (lr=1e30)."""
    work = tmp_path_factory.mktemp("sweep")
    res = clipexp(["-m", *FAST, "loss.temperature=0.03,0.07", "trainer.learning_rate=1e-3,1e30",
                   f"tracking.uri={store_uri(work)}", "trainer.max_grad_norm=0"], work)
    assert res.returncode == 0, res.stderr[-4000:]
    return work, res


def test_sweep_folders_are_sub_second_and_per_job(sweep):
    work, _ = sweep
    sweep_dirs = list((work / "multirun").glob("*/*"))
    assert len(sweep_dirs) == 1
    time_part = sweep_dirs[0].name  # HH-MM-SS-ffffff
    assert len(time_part.split("-")) == 4 and len(time_part.split("-")[3]) == 6
    assert sorted(p.name for p in sweep_dirs[0].iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    for job in ("0", "2"):   # lr=1e-3 jobs finish and write their outputs
        assert (sweep_dirs[0] / job / "metrics.json").is_file()


def test_parent_child_runs_and_summary(sweep):
    work, res = sweep
    client, parent, children = parent_and_children(store_uri(work))
    tags = parent.data.tags
    assert tags["swept_keys"] == "loss.temperature,trainer.learning_rate"
    assert tags["sweep_command"].startswith("python -m clipexp -m ") and "loss.temperature=0.03,0.07" in tags["sweep_command"]
    assert tags["sweep_id"].count("/") == 1 and parent.info.run_name == f"sweep {tags['sweep_id']}"
    assert [c.data.tags["job_num"] for c in children] == ["0", "1", "2", "3"]
    statuses = {(c.data.params["loss.temperature"], c.data.params["trainer.learning_rate"]): c.info.status for c in children}
    assert statuses == {("0.03", "0.001"): "FINISHED", ("0.03", "1e+30"): "FAILED",
                        ("0.07", "0.001"): "FINISHED", ("0.07", "1e+30"): "FAILED"}
    assert "trainer.learning_rate=1e+30" in children[1].data.tags["hydra_overrides"]
    # each job's run is named by its swept values (the parent groups them)
    assert [c.info.run_name for c in children] == [f"loss.temperature={t}, trainer.learning_rate={lr}"
                                                   for t in ("0.03", "0.07") for lr in ("0.001", "1e+30")]
    assert parent.info.status == "FINISHED"
    assert "sweep: 4 jobs, 2 not finished" in res.stdout

    # the summary table: one row per job with swept values, the monitored metric, baseline, final, status
    path = client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(work / "dl"))
    table = pd.read_csv(path)
    assert list(table["job"]) == [0, 1, 2, 3]
    assert list(table["status"]) == ["FINISHED", "FAILED", "FINISHED", "FAILED"]
    for col in ("loss.temperature", "trainer.learning_rate", "best val/t2i_R1", "baseline val/t2i_R1", "final val/t2i_R1"):
        assert col in table.columns
    finished = table[table["status"] == "FINISHED"]
    best_row = finished.loc[finished["best val/t2i_R1"].idxmax()]
    assert parent.data.tags["best_run_id"] == best_row["run_id"]
    assert parent.data.metrics["best/val/t2i_R1"] == pytest.approx(best_row["best val/t2i_R1"])
    for c in children:
        if c.info.status == "FINISHED":
            assert c.data.metrics["best/val/t2i_R1"] == pytest.approx(table.set_index("run_id").loc[c.info.run_id, "best val/t2i_R1"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"sweep_summary.csv", "sweep_summary.md", "plots/sweep_loss.temperature.png", "plots/sweep_trainer.learning_rate.png"} <= arts


def test_notebook_finds_the_experiment_labels_runs_by_name_and_renders_to_html(sweep):
    """With only MLFLOW_TRACKING_URI set (the sweep logs to ``smoke``, not ``clipexp``), as `make notebook` runs it."""
    import base64
    import io

    import nbformat
    import numpy as np
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter
    from PIL import Image

    work, _ = sweep
    nb = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    saved = {k: os.environ.pop(k, None) for k in ("CLIPEXP_TRACKING_URI", "CLIPEXP_EXPERIMENT", "MLFLOW_TRACKING_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = store_uri(work)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "experiment: smoke" in text and "swept: ['loss.temperature', 'trainer.learning_rate']" in text
    # the runs are labelled by their names: the swept values of each job
    assert "runs: loss.temperature=0.03, trainer.learning_rate=0.001 (FINISHED); loss.temperature=0.03, trainer.learning_rate=1e+30 (FAILED)" in text
    assert "job nan" not in text and "nan (" not in text
    assert "best configuration: loss.temperature=" in text and "trainer.learning_rate=0.001" in text
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    pictures = [Image.open(io.BytesIO(base64.b64decode(png))) for png in pngs]
    assert len(pictures) == 2  # learning curves + metric vs temperature
    curves, temperature = pictures
    assert curves.size[0] > 2 * curves.size[1] > 600 and temperature.size[0] > 300  # two panels side by side; one plot
    for picture in pictures:
        assert np.asarray(picture.convert("L"), dtype=float).std() > 10  # drawn, not blank
    html, _ = HTMLExporter().from_notebook_node(nb)  # what `make notebook` writes
    assert all(f"data:image/png;base64,{png.strip()[:200]}" in html for png in pngs) and "best configuration" in html


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_mlflow_server_lists_parent_and_children(sweep):
    work, _ = sweep
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri(work), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, timeout=120, what="mlflow server")

        def post(path, body):
            req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())

        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke", timeout=10) as r:
            exp_id = json.loads(r.read())["experiment"]["experiment_id"]
        runs = post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
        tags = lambda run: {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        parents = [r for r in runs if tags(r).get("role") == "sweep_parent"]
        assert len(parents) == 1
        children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parents[0]["info"]["run_id"]]
        assert len(children) == 4
        finished = [c for c in children if c["info"]["status"] == "FINISHED"]
        assert len(finished) == 2
        for c in finished:
            keys = {m["key"] for m in c["data"]["metrics"]}
            assert {"val/t2i_R1", "train/loss", "test/zeroshot_acc"} <= keys
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow  # 2 Optuna trials as CLI jobs: 75 s on 1 core; the basic sweep, its parent run and summary stay in the default run
def test_optuna_sweep_with_two_trials(tmp_path):
    res = clipexp(["hparams_search=optuna", *FAST, "hydra.sweeper.n_trials=2", f"tracking.uri={store_uri(tmp_path)}"], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    _, parent, children = parent_and_children(store_uri(tmp_path))
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert set(parent.data.tags["swept_keys"].split(",")) >= {"trainer.learning_rate", "loss.temperature", "loss.hard_negative_ratio"}
    assert all(c.data.tags["loss"] == "hard_negative" for c in children)
    results = list((tmp_path / "multirun").glob("*/*/optimization_results.yaml"))
    assert len(results) == 1 and "best_value" in results[0].read_text()


@pytest.mark.slow  # 2 joblib worker processes importing torch + MLflow: 85 s on 1 core
def test_parallel_joblib_jobs_share_one_store(tmp_path):
    res = clipexp(["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *FAST, "loss.temperature=0.03,0.07",
                   f"tracking.uri={store_uri(tmp_path)}"], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    _, parent, children = parent_and_children(store_uri(tmp_path))
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    sweep_dirs = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweep_dirs) == 1 and sorted(p.name for p in sweep_dirs[0].iterdir() if p.is_dir()) == ["0", "1"]
    assert all((sweep_dirs[0] / j / "metrics.json").is_file() for j in ("0", "1"))


def test_slurm_launcher_config_composes(run_cli):
    res = run_cli("--cfg", "hydra", "hydra/launcher=slurm", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in res.stdout
    assert "gpus_per_node: 1" in res.stdout and "timeout_min: 240" in res.stdout
