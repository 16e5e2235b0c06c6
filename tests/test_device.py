"""Device choice with faked CUDA / MPS availability, and precision resolution per device."""

from __future__ import annotations

import pytest
import torch

from clipexp import device as dev
from clipexp.device import DeviceError, DeviceManager


def fake(monkeypatch, cuda=False, mps=False, bf16=True, apple=False):
    monkeypatch.setattr(dev, "cuda_available", lambda: cuda)
    monkeypatch.setattr(dev, "mps_available", lambda: mps)
    monkeypatch.setattr(dev, "is_apple_silicon", lambda: apple)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize(
    "cuda,mps,expected",
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu"), (True, False, "cuda")],
)
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    fake(monkeypatch, cuda=cuda, mps=mps)
    assert DeviceManager("auto").select_type() == expected


def test_auto_skips_mps_when_use_mps_false(monkeypatch):
    fake(monkeypatch, mps=True)
    assert DeviceManager("auto", use_mps=False).select_type() == "cpu"


@pytest.mark.parametrize(
    "kind,message",
    [
        ("cuda", "device=cuda was requested but no CUDA GPU is available here; use device=auto or device=cpu"),
        ("mps", "device=mps was requested but MPS needs Apple Silicon; use device=auto or device=cpu"),
    ],
)
def test_absent_device_fails_in_one_line(monkeypatch, kind, message):
    fake(monkeypatch)
    with pytest.raises(DeviceError) as err:
        DeviceManager(kind).select_type()
    assert str(err.value) == message


@pytest.mark.parametrize(
    "kind,bf16,requested,expected",
    [
        ("cuda", True, "auto", "bf16"),
        ("cuda", False, "auto", "fp16"),
        ("cuda", False, "bf16", "fp16"),
        ("cuda", True, "fp16", "fp16"),
        ("mps", True, "auto", "fp16"),
        ("cpu", True, "auto", "fp32"),
        ("cpu", True, "fp16", "fp32"),  # never fp16 on CPU
        ("cpu", True, "bf16", "bf16"),
        ("cpu", True, "fp32", "fp32"),
    ],
)
def test_precision_resolves_per_device(monkeypatch, kind, bf16, requested, expected):
    fake(monkeypatch, bf16=bf16)
    assert DeviceManager(kind, requested).resolve_precision(kind) == expected


def test_cpu_info_and_autocast():
    m = DeviceManager("cpu", "bf16")
    info = m.info
    assert info.device == torch.device("cpu") and info.precision == "bf16" and not info.use_grad_scaler
    with info.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    d = m.describe()
    assert d["device_type"] == "cpu" and d["supports_fp16"] is False and "is_apple_silicon" in d


def test_device_cli_error_is_one_line(run_cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = run_cli("device=cuda", "model=tiny", "tracking.enabled=false", "trainer.max_steps=1", timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "clipexp: error: device=cuda was requested but no CUDA GPU is available here; use device=auto or device=cpu"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda():
    info = DeviceManager("auto").info
    assert info.type == "cuda" and info.precision in ("bf16", "fp16")


@pytest.mark.apple_silicon
@pytest.mark.skipif(not dev.mps_available(), reason="needs Apple Silicon with MPS")
def test_real_mps():
    info = DeviceManager("auto").info
    assert info.type == "mps" and info.is_apple_silicon
