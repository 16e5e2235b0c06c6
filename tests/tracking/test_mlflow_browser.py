"""The MLflow UI as a user sees it, in a real browser: a short quick-start run, `clipexp ui` on its store, and the
address it prints loaded in headless Chromium (Debian's ``chromium``, driven by Playwright; nothing downloaded).
The runs table opens in model-training mode on the monitored metric, the run's page has the results table and
its metric charts, the model page says how to load the model, and a plain address would open the GenAI overview
(why clipexp prints its own).

``CLIPEXP_DOCS_SCREENSHOTS=1 pytest -m slow tests/tracking/test_mlflow_browser.py`` also writes the screenshots
that docs/sweeps-and-mlflow.md shows into docs/img/.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CLIPEXP_CHROMIUM", "/usr/bin/chromium"))
# flags that work in a container without a display, GPU or network (and keep Chromium from calling home)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
RUN = ["experiment=quickstart", "trainer.max_steps=100", "trainer.eval_steps=25", "trainer.save_steps=100", "trainer.warmup_steps=10",
       "trainer.logging_steps=5", "trainer.progress=false"]
MONITOR = "val/zeroshot_balanced_acc"

pytestmark = [
    pytest.mark.slow,  # about 90 s: 60 training steps, the MLflow model, the server, four pages
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPEXP_RUN_STAMP", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": str(ROOT), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ui")
    res = subprocess.run([sys.executable, "-m", "clipexp", *RUN], cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = (work / "outputs").glob("*/*")
    return work, run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ui_server(quick_run):
    """`clipexp ui <run dir>` on a free port: its printed addresses (``runs``, ``run``) and its base address."""
    work, run_dir, _ = quick_run
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "clipexp.cli.main", "ui", str(run_dir), "--port", str(port), "--no-browser"],
                              cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(server.stdout.readline, "")), daemon=True)  # drains the server's log
    reader.start()
    try:
        from processes import wait_for_http, stop_group

        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/health", server, timeout=120, what="clipexp ui")
        deadline = time.time() + 10
        while not any(line.startswith("this run: ") for line in lines) and time.time() < deadline:
            time.sleep(0.1)
        pages = {key: line.split(": ", 1)[1].strip() for line in lines for key, head in (("runs", "runs (model training): "), ("run", "this run: "))
                 if line.startswith(head)}
        yield base, pages, lines
    finally:  # the UI server and the processes it started (uvicorn) are one process group
        stop_group(server)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh browser profile (nothing remembered); MLflow's assistant panel, which opens by itself on a first
    visit, is kept closed so the page shows the whole table."""
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script("window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
    yield context.new_page()
    context.close()


def _shot(page, name: str, tmp_path: Path) -> Path:
    path = page.screenshot(path=str(tmp_path / name)) and tmp_path / name
    if os.environ.get("CLIPEXP_DOCS_SCREENSHOTS"):
        (ROOT / "docs" / "img").mkdir(exist_ok=True)
        shutil.copy(path, ROOT / "docs" / "img" / name)
    return path


def _sidebar(page) -> str:
    return page.locator("nav, aside").first.inner_text() if page.locator("nav, aside").count() else page.inner_text("body")


def test_the_printed_address_opens_the_runs_table_in_training_mode(quick_run, ui_server, page, tmp_path):
    work, run_dir, metrics = quick_run
    base, pages, lines = ui_server
    from clipexp.tracking.ui import run_page_url, runs_page_url

    experiment_id = metrics["mlflow"]["experiment_id"]
    assert pages["runs"] == runs_page_url(base, experiment_id, "clipexp"), lines
    # the run folder's metrics.json and `clipexp ui` name the same page (metrics.json assumes the default port)
    assert pages["run"] == run_page_url(base, experiment_id, metrics["mlflow"]["run_id"])
    assert metrics["mlflow"]["run_page"] == run_page_url("http://127.0.0.1:5000", experiment_id, metrics["mlflow"]["run_id"])

    page.goto(pages["runs"])
    name = "tiny, contrastive, industrial, textile, seed 42"
    page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    # the runs table, in model-training mode: its sidebar (Runs, Models, Model registry), not GenAI's, and no GenAI overview
    assert "/runs?" in page.url and "Run Name" in body and "Model registry" in body
    for genai in ("Observability", "Token Usage", "Latency"):
        assert genai not in body
    # the saved view: sorted by the monitored metric's best value, its best, test and final values as columns
    assert f"Sort: best/{MONITOR}" in body and f"clipexp: best {MONITOR}" in body and "You're viewing a shared view" in body
    headers = [h.strip() for h in page.locator("[role=columnheader]").all_inner_texts()]
    assert [f"best/{MONITOR}", "test/zeroshot_balanced_acc", MONITOR] == list(dict.fromkeys(h for h in headers if "zeroshot" in h))
    placed = page.evaluate("() => [...document.querySelectorAll('[role=columnheader]')].map(e => [e.innerText.trim(), e.getBoundingClientRect().left])")
    order = [h for h in dict.fromkeys(h for h, _ in sorted(placed, key=lambda p: p[1])) if h in
             ("Run Name", "Created", f"best/{MONITOR}", "Duration", "Source")]  # as drawn, left to right (the grid's DOM order is not)
    assert order == ["Run Name", "Created", f"best/{MONITOR}", "Duration", "Source"]  # (Models: further right, drawn when scrolled to)
    best = f"{metrics['best_value']:.4f}"[:5]
    assert best in body  # the best value itself, in the table
    _shot(page, "mlflow-runs.png", tmp_path)
    # a link inside the UI does not carry the mode: a fresh browser shows the run with MLflow's GenAI sidebar
    page.get_by_text(name, exact=True).first.click()
    page.get_by_text("Model metrics", exact=True).first.wait_for(timeout=60_000)
    assert "/runs/" in page.url and "workflowType" not in page.url and "Observability" in page.inner_text("body")


def test_the_run_page_shows_the_results_table_and_the_metric_charts(quick_run, ui_server, page, tmp_path):
    _, _, metrics = quick_run
    base, pages, _ = ui_server
    page.goto(pages["run"])
    page.get_by_text("Monitored:").first.wait_for(timeout=60_000)
    description = page.inner_text("body")
    assert f"Monitored: {MONITOR}, best at step {metrics['best_step']}." in description
    test_value = f"{metrics['test']['test/zeroshot_balanced_acc']:.4f}"
    assert test_value in description and "Model training" in description and "Observability" not in description
    page.get_by_text("Show more").first.click()  # the description unfolded: the whole table
    user = getpass.getuser()
    assert f"Created by\n{user}" in page.inner_text("body")
    _shot(page, "mlflow-run.png", tmp_path)

    page.get_by_role("tab", name="Model metrics").click() if page.get_by_role("tab", name="Model metrics").count() else \
        page.get_by_text("Model metrics", exact=True).first.click()
    page.get_by_text("train", exact=True).first.wait_for(timeout=60_000)
    page.get_by_text("zeroshot_balanced_acc", exact=True).first.wait_for(timeout=30_000)  # best/val, on top: the monitored metric
    titles = set(page.locator("[data-testid*='chart'], span, div").filter(has_text="zeroshot_balanced_acc").all_inner_texts())
    assert titles
    if page.get_by_text("test", exact=True).count():  # fold the one-point test/* charts away: the curves come first
        page.get_by_text("test", exact=True).first.click()
    # the heads' sections (test/<head>, val/<head>) sort before train and val: MLflow draws a section's charts once
    # it is scrolled into view, as a user scrolling down to the curves does
    page.get_by_text("train", exact=True).first.scroll_into_view_if_needed()
    page.get_by_text("loss", exact=True).first.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)
    body = page.inner_text("body")
    for section in ("best/val", "train", "val"):
        assert section in body.split("\n")
    plotted = page.evaluate("() => document.querySelectorAll('.main-svg .scatterlayer .trace').length")
    assert plotted >= 4  # line charts drawn (plotly traces), not empty cards
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1300})  # the train/* row in the picture too
    page.wait_for_timeout(1000)
    _shot(page, "mlflow-run-metrics.png", tmp_path)
    page.set_viewport_size(VIEWPORT)

    page.get_by_text("System metrics", exact=True).first.click()  # sampled by MLflow (every 2 s in this test)
    page.get_by_text("cpu_utilization_percentage").first.wait_for(timeout=60_000)

    # the logged plots read in the artifact preview: the training-curve grid at its own size
    page.get_by_role("tab", name="Artifacts").click() if page.get_by_role("tab", name="Artifacts").count() else \
        page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("plots", exact=True).first.click()
    page.get_by_text("training_curves.png", exact=True).first.click()
    page.get_by_text("plots/training_curves.png").first.wait_for(timeout=30_000)  # the preview's heading
    page.wait_for_function("() => [...document.images].some(i => i.naturalWidth > 1000)", timeout=30_000)
    (natural_w, natural_h, shown_w) = page.evaluate(
        "() => [...document.images].filter(i => i.naturalWidth > 1000).map(i => [i.naturalWidth, i.naturalHeight, i.width])[0]")
    assert (natural_w, natural_h) == (1260, 680) and shown_w >= 0.6 * natural_w  # the grid, shown at most ~1.6x smaller
    _shot(page, "mlflow-run-plots.png", tmp_path)


def test_the_model_page_says_how_to_load_the_model(quick_run, ui_server, page, tmp_path):
    work, _, metrics = quick_run
    base, _, _ = ui_server
    from mlflow.tracking import MlflowClient

    from clipexp.tracking.ui import model_page_url

    client = MlflowClient(metrics["mlflow"]["tracking_uri"])
    (model,) = client.search_logged_models([metrics["mlflow"]["experiment_id"]])
    page.goto(model_page_url(base, metrics["mlflow"]["experiment_id"], model.model_id))
    page.get_by_text("Load and predict").first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    run_id = metrics["mlflow"]["run_id"]
    assert f'mlflow.pyfunc.load_model("runs:/{run_id}/clip")' in body
    assert f"mlflow models serve -m runs:/{run_id}/clip" in body
    for column in ("image", "text", "predicted_class", "probabilities", "image_embedding", "map<double>", "array<double>"):
        assert column in body
    assert "Input example" in body and "input_example.json" in body
    _shot(page, "mlflow-model.png", tmp_path)


def test_without_the_mode_in_the_address_mlflow_opens_its_genai_overview(quick_run, ui_server, page):
    """Why clipexp prints its own addresses: MLflow 3.17 ignores the experiment's kind tag and opens GenAI."""
    _, _, metrics = quick_run
    base, _, _ = ui_server
    page.goto(f"{base}/#/experiments/{metrics['mlflow']['experiment_id']}")
    page.get_by_text("Token Usage").first.wait_for(timeout=60_000)
    assert "workflowType=genai" in page.url and "Observability" in page.inner_text("body")
    # the sidebar's switch is remembered by the browser: after one click on Model training, the plain address opens the runs
    if page.get_by_text("Got it", exact=True).count():  # MLflow's one-time tip on the GenAI overview covers the page
        page.get_by_text("Got it", exact=True).first.click()
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_text("Run Name").first.wait_for(timeout=60_000)
    page.goto(f"{base}/#/experiments/{metrics['mlflow']['experiment_id']}")
    page.get_by_text("Run Name").first.wait_for(timeout=60_000)
    assert "/runs" in page.url and "Observability" not in page.inner_text("body")
