"""What MLflow's pages are filled with, without a browser: the addresses clipexp prints (model-training mode),
the saved runs view on the monitored metric (a real SQLite store), the default run names, and the results
table that becomes the run's description."""

from __future__ import annotations

import json
import time

import pytest

from clipexp.tracking import ui
from clipexp.tracking.outputs import default_run_name, summary_markdown, summary_table


def test_addresses_open_in_model_training_mode():
    assert ui.ui_base("sqlite:////data/mlflow.db") == "http://127.0.0.1:5000"
    assert ui.ui_base("https://mlflow.example.org/") == "https://mlflow.example.org"
    base = "http://127.0.0.1:5001"
    assert ui.runs_page_url(base, "3") == "http://127.0.0.1:5001/#/experiments/3/runs?workflowType=machine_learning"
    assert ui.runs_page_url(base, "3", "clipexp") == \
        "http://127.0.0.1:5001/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=clipexp"
    assert ui.run_page_url(base, "3", "abc") == "http://127.0.0.1:5001/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui.model_page_url(base, "3", "m-1") == "http://127.0.0.1:5001/#/experiments/3/models/m-1?workflowType=machine_learning"
    assert ui.served_base("0.0.0.0", 5000) == "http://127.0.0.1:5000" and ui.served_base("::1", 80) == "http://[::1]:80"


def test_the_runs_view_shows_and_sorts_by_the_monitored_metric():
    view = ui.runs_view("val/loss", "min", now_ms=1)
    state = json.loads(view["state"])
    metrics = ["metrics.`best/val/loss`", "metrics.`test/loss`", "metrics.`val/loss`"]
    assert (view["name"], view["createdAt"], view["updatedAt"]) == ("clipexp: best val/loss", 1, 1)
    assert state["selectedColumns"] == ["attributes.`Source`", "attributes.`Models`", *metrics]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`best/val/loss`", True)  # a loss: lowest first
    assert state["columnOrder"] == ["attributes.`Run Name`", "runDateAndNestInfo", *metrics, "duration", "attributes.`Source`",
                                    "attributes.`Models`"]
    assert state["columnWidths"]["metrics.`best/val/loss`"] == 50 + 7 * len("best/val/loss")
    assert json.loads(ui.runs_view("val/t2i_R1", "max")["state"])["orderByAsc"] is False


def test_the_store_keeps_one_view_and_clipexp_ui_opens_the_latest_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old, new = client.create_experiment("old"), client.create_experiment("new")
    client.create_run(old)
    time.sleep(0.01)
    run = client.create_run(new)
    ui.set_runs_view(client, new, "val/t2i_R1", "max")
    tag = ui.VIEW_TAG_PREFIX + ui.VIEW_ID
    first = client.get_experiment(new).tags[tag]
    ui.set_runs_view(client, new, "val/t2i_R1", "max")  # the same view: left as it is (its dates too)
    assert client.get_experiment(new).tags[tag] == first
    ui.set_runs_view(client, new, "val/loss", "min")  # another monitor: rewritten
    assert json.loads(json.loads(client.get_experiment(new).tags[tag])["state"])["orderByKey"] == "metrics.`best/val/loss`"

    base = "http://127.0.0.1:5000"
    pages = ui.ui_addresses(uri, base)  # no name: the experiment whose run started last, with its view
    assert pages == {"runs": ui.runs_page_url(base, new, "clipexp")}
    pages = ui.ui_addresses(uri, base, experiment="old")  # an experiment without the view: no view in the address
    assert pages == {"runs": ui.runs_page_url(base, old)}
    pages = ui.ui_addresses(uri, base, run={"experiment": "new", "run_id": run.info.run_id})
    assert pages["run"] == ui.run_page_url(base, new, run.info.run_id)
    missing = f"sqlite:///{tmp_path / 'none.db'}"  # nothing logged there yet: the experiments list, and no file created
    assert ui.ui_addresses(missing, base) == {"runs": "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"}
    assert not (tmp_path / "none.db").exists()


def test_default_run_names_say_what_ran(compose_cfg):
    cfg = compose_cfg("experiment=quickstart", "seed=3")
    assert default_run_name(cfg, ["experiment=quickstart", "seed=3"]) == "tiny, contrastive, industrial, textile, seed 3"
    csv = compose_cfg("experiment=smoke", "data=csv", "data.path=/data/xray/pairs.csv", "loss=siglip", "domain=medical")
    assert default_run_name(csv, []) == "tiny, siglip, medical, pairs, seed 42"
    # a sweep's job: its swept values, in the order the sweep lists its keys
    job = ["experiment=smoke", "seed=1", "loss.temperature=0.03"]
    assert default_run_name(cfg, job, ["loss.temperature", "seed"]) == "loss.temperature=0.03, seed=1"


RESULTS = {"baseline": {"val/loss": 4.0, "val/zeroshot_acc": 0.25}, "final": {"val/loss": 3.5, "val/zeroshot_acc": 0.5},
           "best": {"val/loss": 3.6, "val/zeroshot_acc": 0.625}, "test": {"test/loss": 3.7, "test/zeroshot_acc": 0.5},
           "monitor": "val/zeroshot_acc", "best_step": 40, "steps": 60}


def test_the_description_is_the_table_the_terminal_prints():
    md = summary_markdown(RESULTS, 40, "val/zeroshot_acc")
    legend = ("baseline = validation at step 0, final = at the last step, best = at the best step (step 40); "
              "test = test split with the best checkpoint")
    assert md == ("Monitored: `val/zeroshot_acc`, best at step 40.\n\n"
                  "| metric | baseline | final | best | test |\n|---|---:|---:|---:|---:|\n"
                  "| loss | 4.0000 | 3.5000 | 3.6000 | 3.7000 |\n"
                  "| zeroshot_acc | 0.2500 | 0.5000 | 0.6250 | 0.5000 |\n\n" + legend + "\n")
    text = summary_table(RESULTS, 40).splitlines()
    assert text[1].split() == ["loss", "4.0000", "3.5000", "3.6000", "3.7000"] and text[-1] == legend
    no_test = {k: v for k, v in RESULTS.items() if k != "test"}
    assert "| loss | 4.0000 | 3.5000 | 3.6000 | - |" in summary_markdown(no_test)


@pytest.mark.parametrize("env, expected", [({"DISPLAY": ":0"}, True), ({"WAYLAND_DISPLAY": "wayland-0"}, True), ({}, False)])
def test_a_browser_opens_only_on_a_desktop(monkeypatch, env, expected):
    monkeypatch.setattr(ui.sys, "platform", "linux")
    for key in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ui.graphical_browser() is expected
