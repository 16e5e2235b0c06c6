"""Shared fixtures: composed configs, a tiny model, real images, isolated MLflow stores.

``CLIPEXP_TEST_THREADS=N`` runs the whole suite with N torch intra-op threads (``make test THREADS=1``):
every test starts at N, whatever an earlier test's trainer set, and ``one_thread`` gives way to it. Float
comparisons must hold at any count (see ``numerics.py``). It also sets ``OMP_NUM_THREADS``, which trainers
(in this process and in the CLI subprocesses) take as their CPU thread count, as they do for users.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests never touch the hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

THREADS_ENV = "CLIPEXP_TEST_THREADS"


def _requested_threads():
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_ENV}={value!r} is not a number of threads; set it to 1, 2, ... or unset it")
    return int(value)


def pytest_configure(config):
    import torch

    config.clipexp_threads = _requested_threads()
    if config.clipexp_threads:
        torch.set_num_threads(config.clipexp_threads)
        # trainers (in this process and in CLI subprocesses) take their CPU threads from it
        os.environ["OMP_NUM_THREADS"] = str(config.clipexp_threads)
    config.clipexp_start_threads = torch.get_num_threads()


def pytest_report_header(config):
    how = f"{THREADS_ENV}={config.clipexp_threads}" if config.clipexp_threads else f"{THREADS_ENV} unset: torch's default"
    return f"torch intra-op threads: {config.clipexp_start_threads} ({how})"


@pytest.fixture(autouse=True)
def _threads(request):
    """Each test starts at its thread count, whatever an earlier test's trainer set process-wide:
    ``CLIPEXP_TEST_THREADS`` when set, else 1 in ``one_thread`` modules, else the session's start count."""
    import torch

    config = request.config
    torch.set_num_threads(config.clipexp_threads or (1 if "one_thread" in request.fixturenames else config.clipexp_start_threads))


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the composed, validated run config (as the CLI composes it)."""
    from clipexp.config.compose import compose as compose_and_validate

    return lambda *overrides: compose_and_validate(list(overrides), check_files=False)


@pytest.fixture
def run_cli(tmp_path):
    """run_cli(*args, cwd=tmp_path, env=None, timeout=600) -> CompletedProcess of `python -m clipexp`."""

    def _run(*args, cwd=None, env=None, timeout=600):
        full_env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
        full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
        return subprocess.run(
            [sys.executable, "-m", "clipexp", *args],
            cwd=cwd or tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout,
        )

    return _run


@pytest.fixture
def tiny_controller():
    import torch

    from clipexp.config.notes import CLIPFinetuningConfig
    from clipexp.models.loading import CLIPFinetuningController

    torch.manual_seed(0)
    cfg = CLIPFinetuningConfig(model_name="tiny", image_resolution=64, max_sequence_length=32, device="cpu")
    return CLIPFinetuningController(cfg).setup()


@pytest.fixture
def rgb_images():
    from PIL import Image

    return [Image.new("RGB", (80, 60), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine's oversubscription
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module; ``_threads`` applies it). With
    ``CLIPEXP_TEST_THREADS`` set, that count wins: the module runs at it like the rest of the suite."""
