"""Fault injection on the MLflow side: a store that is locked or stops mid-run, two sweeps on one store.

Each test injects the fault for real (another process holding the SQLite file's write lock, an
``mlflow server`` that is stopped, two parallel-launcher sweeps at once) and checks what survives:
training goes on, the run folder is complete, the store ends with no run left RUNNING.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["experiment=smoke"]
FAST = ["experiment=smoke", "trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2"]


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def _popen(args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "clipexp", *args], cwd=cwd, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout=900, log_path: Path = None):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, (log_path.read_text() if log_path else proc.communicate()[1])[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _runs(uri: str, experiment: str = "smoke"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_two_parallel_sweeps_on_one_sqlite_store_leave_no_run_running(tmp_path):
    """Two `-m hydra/launcher=parallel` sweeps of 4 jobs each, started together on one SQLite file:
    10 writers (8 jobs, 2 parents) contend for its lock. Every run must end FINISHED or FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweeps = []
    for name in ("a", "b"):
        work = tmp_path / name
        work.mkdir()
        sweeps.append(_popen(["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=4", *FAST,
                              "loss.temperature=0.03,0.05,0.07,0.1", f"tracking.uri={uri}"], work))
    outputs = [p.communicate(timeout=1800) for p in sweeps]  # ~1-2 min on an idle 2-core machine; 15 min at load 20
    for proc, (out, err) in zip(sweeps, outputs):
        assert proc.returncode == 0, err[-4000:]
    _, runs = _runs(uri)
    statuses = sorted(r.info.status for r in runs)
    assert len(runs) == 10, statuses      # 2 parents + 8 jobs
    assert "RUNNING" not in statuses, statuses
    assert set(statuses) <= {"FINISHED", "FAILED"}
    for name in ("a", "b"):
        jobs = list((tmp_path / name / "multirun").glob("*/*/[0-9]"))
        assert len(jobs) == 4 and all((j / "metrics.json").is_file() for j in jobs)


LONG = ["trainer.max_steps=24", "trainer.save_steps=4", "trainer.eval_steps=8", "tracking.retry_s=1"]


def _start_logged(args, cwd: Path, env=None):
    """The CLI with stdout+stderr to a file (read while it runs, and no pipe to fill)."""
    log_path = cwd / "cli.log"
    fh = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "clipexp", *args], cwd=cwd, env=_env(env), stdout=fh, stderr=subprocess.STDOUT, text=True)
    return proc, log_path


def _wait_for_text(log_path: Path, text: str, proc, timeout=180):
    deadline = time.time() + timeout
    while text not in log_path.read_text():
        assert time.time() < deadline, f"never logged {text!r}:\n{log_path.read_text()[-3000:]}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    return text in log_path.read_text()


def _kill(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _history_steps(client, run_id, name):
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def _assert_complete_run_folder(run: Path, steps: int):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == steps and {"baseline", "final", "best", "test"} <= set(metrics)
    return metrics


@pytest.mark.slow
def test_sqlite_store_locked_mid_run_costs_one_warning_and_no_metric(tmp_path):
    """Another process takes the SQLite file's write lock at step 4 and keeps it until MLflow gives up
    (its busy timeout is 20 s): training goes on meanwhile; once the lock is released the held metrics
    reach the store, so the run there is as complete as the run folder."""
    db = tmp_path / "mlflow.db"
    proc, log_path = _start_logged([*SMOKE, *LONG, f"tracking.uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    try:
        _wait_for(tmp_path / "run" / "checkpoints" / "step_0000004.pt", proc, log_path=log_path)
        locker = sqlite3.connect(db, timeout=60, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")     # no reader or writer gets in until the COMMIT below
        try:
            _wait_for_text(log_path, "is unreachable", proc, timeout=120)
        finally:
            locker.execute("COMMIT")
            locker.close()
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        _kill(proc)
    text = log_path.read_text()
    assert text.count("is unreachable") == 1 and "answers again" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]

    metrics = _assert_complete_run_folder(tmp_path / "run", 24)
    client, runs = _runs(f"sqlite:///{db}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    assert _history_steps(client, rid, "train/loss") == list(range(1, 25))   # nothing lost while locked
    assert _history_steps(client, rid, "val/t2i_R1") == [0, 8, 16, 24]
    assert runs[0].data.metrics["test/t2i_R1"] == pytest.approx(metrics["test"]["test/t2i_R1"])
    assert "metrics.json" in {a.path for a in client.list_artifacts(rid)}
    assert not (tmp_path / "run" / "mlflow_pending.jsonl").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(backend: str, port: int, cwd: Path):
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            _kill(server)
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)


def _stop_server(server) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_server_that_stops_mid_run_spools_the_rest_and_replays_it(tmp_path):
    """The run's `mlflow server` stops at step 4 and is still down when training ends: the run ends as
    usual, the writes the server missed are in the run folder, and one command sends them once the
    server is back, so the store ends with the whole run."""
    port, backend = _free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(backend, port, tmp_path)
    # MLflow's HTTP client otherwise retries a refused connection for minutes before it says so
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    run = tmp_path / "run"
    proc, log_path = _start_logged([*SMOKE, *LONG, f"tracking.uri={uri}", f"hydra.run.dir={run}", "tracking.end_timeout_s=3"],
                                   tmp_path, env)
    try:
        _wait_for(run / "checkpoints" / "step_0000004.pt", proc, log_path=log_path)
        _stop_server(server)
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        _kill(proc)
        if server.poll() is None:
            _stop_server(server)
    text = log_path.read_text()
    assert text.count("is unreachable") == 1 and "still unreachable" in text and str(run / "mlflow_pending.jsonl") in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    _assert_complete_run_folder(run, 24)
    assert (run / "mlflow_pending.jsonl").is_file()

    server = _start_server(backend, port, tmp_path)
    try:
        res = subprocess.run([sys.executable, "-m", "clipexp", "replay", str(run)], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        client, runs = _runs(uri)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        rid = runs[0].info.run_id
        assert _history_steps(client, rid, "train/loss") == list(range(1, 25))
        assert _history_steps(client, rid, "val/t2i_R1") == [0, 8, 16, 24]
        assert "metrics.json" in {a.path for a in client.list_artifacts(rid)}
    finally:
        _stop_server(server)


@pytest.mark.slow  # a 40-step CLI run and its replay: ~60 s on 1 core
def test_a_store_deleted_mid_run_is_one_warning_and_replay_recreates_the_run(tmp_path):
    """mlflow.db deleted while the run writes to it: the run finishes (exit 0) with one warning naming what happened
    and no traceback, and `clipexp replay` recreates the run in a new store from the run folder's journal: the same
    name, params, metric history, tags, artifacts and FINISHED status (it crashed with 'Run not found' and left an
    empty store)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "clipexp", "experiment=smoke", "trainer.max_steps=40", "trainer.save_steps=5",
                             "trainer.eval_steps=20", "trainer.logging_steps=1", f"tracking.uri=sqlite:///{db}", "tracking.end_timeout_s=30",
                             "tracking.retry_s=2", f"hydra.run.dir={run}"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "step_0000005.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() is not None else "slow"
        time.sleep(0.2)
    first = json.loads((run / "mlflow_run.json").read_text())["run_id"]  # (no client on the old file: MLflow caches its engine)
    db.unlink()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    said = out + err  # (Hydra's console log is stdout)
    assert "Traceback" not in said and "attempt to write a readonly database" not in said, said[-3000:]
    gone = [line for line in said.splitlines() if "was deleted while the run was writing to it" in line]
    assert len(gone) == 1 and "clipexp replay" in gone[0], said[-3000:]

    res = subprocess.run([sys.executable, "-m", "clipexp", "replay", str(run)], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recreated it as run" in res.stdout and first in res.stdout, res.stdout
    client = MlflowClient(f"sqlite:///{db}")
    [again] = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert again.info.status == "FINISHED" and again.info.run_name == "tiny, contrastive, industrial, textile, seed 42"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert again.data.params["trainer.max_steps"] == "40" and again.data.params["model.name"] == "tiny" == config["model"]["name"]
    assert again.data.tags["loss"] == "contrastive" and again.data.tags["model"] == "tiny"
    assert _history_steps(client, again.info.run_id, "train/loss") == list(range(1, 41))
    metrics = json.loads((run / "metrics.json").read_text())
    assert again.data.metrics["test/t2i_R1"] == pytest.approx(metrics["test"]["test/t2i_R1"], rel=1e-6)
    assert {a.path for a in client.list_artifacts(again.info.run_id)} >= {"config.yaml", "metrics.json", "model", "plots"}
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"] == again.info.run_id
