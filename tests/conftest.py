"""Shared fixtures: composed configs, a tiny model, real images, isolated MLflow stores."""

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


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the composed, validated run config (as the CLI composes it)."""
    from clipexp.__main__ import compose_and_validate

    return lambda *overrides: compose_and_validate(list(overrides))


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

    from clipexp.config import CLIPFinetuningConfig
    from clipexp.models import CLIPFinetuningController

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
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
