"""Device choice (CUDA, then Apple MPS, then CPU) and the precisions each device supports."""

from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import dataclass
from typing import Any, Optional

import torch

from clipexp.errors import DeviceError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    type: str
    name: str
    is_apple_silicon: bool
    supports_bf16: bool
    supports_fp16: bool
    precision: str  # resolved: fp32 | bf16 | fp16

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def use_grad_scaler(self) -> bool:
        return self.precision == "fp16"

    def autocast(self):
        """Autocast context for forward passes in the resolved precision (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=self.dtype)


class DeviceManager:
    """Pick and describe the device (the original notes' DeviceManager).

    ``device_type``: auto | cpu | cuda | mps. ``precision``: auto | fp32 | bf16 | fp16, resolved per device:
    auto = bf16 on CUDA with bf16 support (else fp16), fp16 on MPS, fp32 on CPU; fp16 is never used on
    CPU (it falls back to fp32 with a warning), and bf16 only where the device supports it.
    ``use_mps=False`` keeps ``auto`` off MPS.
    """

    def __init__(self, device_type: str = "auto", precision: str = "auto", use_mps: bool = True):
        self.requested = device_type
        self.requested_precision = precision
        self.use_mps = use_mps
        self._info: Optional[DeviceInfo] = None

    # -- choice -----------------------------------------------------------------------------------
    def select_type(self) -> str:
        req = self.requested
        if req == "auto":
            if cuda_available():
                return "cuda"
            if self.use_mps and mps_available():
                return "mps"
            return "cpu"
        if req == "cuda" and not cuda_available():
            raise DeviceError("device=cuda was requested but no CUDA GPU is available here; use device=auto or device=cpu")
        if req == "mps" and not mps_available():
            where = "this Mac's PyTorch build has no MPS support" if is_apple_silicon() else "MPS needs Apple Silicon"
            raise DeviceError(f"device=mps was requested but {where}; use device=auto or device=cpu")
        if req not in ("cpu", "cuda", "mps"):
            raise DeviceError(f"device={req!r} is unknown; use one of auto, cpu, cuda, mps")
        return req

    @staticmethod
    def capabilities(device_type: str) -> tuple[bool, bool]:
        """(bf16 autocast works, fp16 autocast works) on that device type."""
        if device_type == "cuda":
            return bool(torch.cuda.is_bf16_supported()), True
        if device_type == "mps":
            return True, True  # bf16 autocast on MPS needs macOS 14+; torch raises clearly otherwise
        return True, False  # CPU autocast supports bf16; fp16 on CPU is slow and unsupported by GradScaler

    def resolve_precision(self, device_type: str) -> str:
        bf16, fp16 = self.capabilities(device_type)
        want = self.requested_precision
        if want == "auto":
            if device_type == "cuda":
                return "bf16" if bf16 else "fp16"
            if device_type == "mps":
                return "fp16"
            return "fp32"
        if want == "fp16" and not fp16:
            log.warning("precision=fp16 is not supported on %s; using fp32", device_type)
            return "fp32"
        if want == "bf16" and not bf16:
            log.warning("precision=bf16 is not supported on this %s device; using fp16", device_type)
            return "fp16"
        return want

    @property
    def info(self) -> DeviceInfo:
        if self._info is None:
            kind = self.select_type()
            if kind == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
                name = torch.cuda.get_device_name(device)
            elif kind == "mps":
                device, name = torch.device("mps"), "Apple MPS"
            else:
                device, name = torch.device("cpu"), platform.processor() or platform.machine()
            bf16, fp16 = self.capabilities(kind)
            self._info = DeviceInfo(
                device=device,
                type=kind,
                name=name,
                is_apple_silicon=is_apple_silicon(),
                supports_bf16=bf16,
                supports_fp16=fp16,
                precision=self.resolve_precision(kind),
            )
        return self._info

    @property
    def device(self) -> torch.device:
        return self.info.device

    def describe(self) -> dict:
        i = self.info
        return {
            "device_type": i.type,
            "device_name": i.name,
            "is_apple_silicon": i.is_apple_silicon,
            "supports_bf16": i.supports_bf16,
            "supports_fp16": i.supports_fp16,
            "precision": i.precision,
        }

    def log_device_info(self) -> None:
        d = self.describe()
        log.info("device: %s (%s), precision %s, bf16=%s fp16=%s", d["device_type"], d["device_name"],
                 d["precision"], d["supports_bf16"], d["supports_fp16"])


def build_device(device_cfg: Any, distributed: bool = False) -> DeviceManager:
    """The run config's ``device`` section resolved (and logged); MPS is refused under torchrun."""
    from clipexp.errors import ConfigError

    devices = DeviceManager(device_cfg.type, device_cfg.precision)
    devices.log_device_info()
    if distributed and devices.info.type == "mps":
        raise ConfigError("device.type", device_cfg.type, "cpu or cuda under torchrun (DistributedDataParallel does not run on MPS)")
    return devices
