"""The automatic batch size: probe the largest micro-batch that fits, remember it, or estimate it.

* :func:`find_max_batch_size` + :func:`make_train_step_probe`: the largest micro-batch for which one
  real training step (forward, backward, optional optimizer step) fits, by doubling then bisection.
* :class:`BatchSizeCache`: probed sizes remembered in a small JSON file, per model / resolution /
  precision / device.
* :func:`resolve_batch_size`: configured > cache > probe (CUDA) > estimate > fallback, and where the
  number came from; :func:`train_batch_size` applies it to a run config.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from clipexp.training.batch_estimate import estimate_batch_size_for_model
from clipexp.training.oom import free_memory, is_oom

log = logging.getLogger(__name__)

#: batch size used when nothing better is known (the original notes' defaults)
DEFAULT_FALLBACK: Dict[str, int] = {"mps": 16, "cpu": 8, "cuda": 32}

# --------------------------------------------------------------------------------------------------
# Probing: the largest batch for which a step fits
# --------------------------------------------------------------------------------------------------


def find_max_batch_size(
    probe: Callable[[int], Any],
    *,
    start: int = 8,
    max_batch: int = 4096,
    on_oom: Optional[Callable[[], Any]] = free_memory,
) -> int:
    """The largest batch size ``b <= max_batch`` for which ``probe(b)`` does not run out of memory.

    Doubling from ``start`` while ``probe`` succeeds (and the double is ``<= max_batch``), then
    bisection between the last success and the first OOM. If doubling stops at the cap without an
    OOM, ``max_batch`` itself is tried (so a cap that is not ``start * 2**k`` is reachable). If
    ``start`` already runs out of memory, bisection runs between 0 and ``start``.

    Assumes memory grows with the batch (an OOM at ``b`` means an OOM above ``b``). ``on_oom`` runs
    after each OOM, outside the ``except`` block so the failed step's tensors are garbage already.
    Errors that are not OOMs propagate unchanged; if even batch 1 does not fit, a ``RuntimeError``
    says so. Each probed size is logged.
    """
    if start < 1 or max_batch < 1:
        raise ValueError(f"start and max_batch must be >= 1; got start={start}, max_batch={max_batch}")
    start = min(start, max_batch)

    def fits(batch_size: int) -> bool:
        failed = False
        try:
            probe(batch_size)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom(err):
                raise
            failed = True
        if failed and on_oom is not None:
            on_oom()
        log.info("batch size probe: %d %s", batch_size, "out of memory" if failed else "fits")
        return not failed

    lo, hi = 0, None  # largest known fit, smallest known OOM
    size = start
    while True:
        if not fits(size):
            hi = size
            break
        lo = size
        if size * 2 > max_batch:
            break
        size *= 2
    if hi is None:  # never ran out of memory while doubling
        if lo == max_batch:
            return lo
        if fits(max_batch):
            return max_batch
        hi = max_batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        raise RuntimeError(
            "out of memory even at batch size 1; use a smaller model or image_resolution, set "
            "model.gradient_checkpointing=true, lock a tower (model.lock_image=true), or use bf16/fp16 precision"
        )
    return lo


def _synthetic_batch(model: nn.Module, batch_size: int, resolution: int, seq_len: int, device) -> Dict[str, torch.Tensor]:
    """Worst-case inputs: random pixels, full-length token sequences ending with the eos id."""
    text_cfg = getattr(getattr(model, "config", None), "text_config", None)
    vocab = int(getattr(text_cfg, "vocab_size", 49408))
    eos = getattr(text_cfg, "eos_token_id", None)
    eos = vocab - 1 if eos is None else int(eos)
    ids = torch.randint(0, max(1, vocab - 2), (batch_size, seq_len), device=device)
    ids[:, -1] = eos
    return {
        "pixel_values": torch.randn(batch_size, 3, resolution, resolution, device=device),
        "input_ids": ids,
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "group_ids": torch.arange(batch_size, device=device),
        "labels": torch.arange(batch_size, device=device),
    }


class _OptimizerSnapshot:
    """The optimizer's parameters (copied to CPU on the first ``save``) and state, put back by ``restore``."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params: Optional[List[torch.Tensor]] = None
        self.state: Optional[Dict[Any, Any]] = None

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def save(self) -> None:
        if self.params is None:
            self.params = [p.detach().to("cpu", copy=True) for p in self._params()]
        state = self.optimizer.state_dict()["state"]
        self.state = None if not state else {
            k: {n: (v.to("cpu", copy=True) if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in state.items()
        }

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self._params(), self.params):
                p.copy_(saved.to(p.device))
        if self.state is None:
            self.optimizer.state.clear()
        else:
            full = self.optimizer.state_dict()
            full["state"] = self.state
            self.optimizer.load_state_dict(full)


def make_train_step_probe(
    model: nn.Module,
    loss_fn: nn.Module,
    *,
    device: Union[str, torch.device],
    resolution: int,
    seq_len: int,
    autocast: Callable[[], Any] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Callable[[int], None]:
    """``probe(batch_size)``: one real training step on synthetic inputs, leaving the model unchanged.

    The step is a forward of both towers (in ``autocast``, model in train mode), the loss (with
    ``model.logit_scale``) and its backward, on random pixels and full-length token sequences (the
    worst case for memory). With ``optimizer``, ``optimizer.step()`` runs too, because AdamW's two
    state tensors per parameter are allocated on the first step and a batch that fits without them
    may not fit with them. *The run is left as it was*: every parameter of the optimizer's groups is
    copied to CPU on the first call and copied back after each probe, and the optimizer state is
    emptied again if it was empty (else restored from a CPU copy). Afterwards gradients are set to
    None, the model's train/eval mode is restored and :func:`free_memory` runs, whether the probe
    succeeded or raised. The RNG is not restored (the probe draws random inputs): seed after probing.
    """
    device = torch.device(device)
    autocast = autocast or (lambda: torch.autocast(device.type, enabled=False))
    from clipexp.models.clip import image_features, text_features  # local: models import transformers

    snapshot = _OptimizerSnapshot(optimizer) if optimizer is not None else None

    def probe(batch_size: int) -> None:
        was_training = model.training
        model.train()
        if snapshot is not None:
            snapshot.save()
        try:
            batch = _synthetic_batch(model, batch_size, resolution, seq_len, device)
            with autocast():
                img = image_features(model, batch["pixel_values"])
                txt = text_features(model, batch["input_ids"], batch["attention_mask"])
            out = loss_fn(img, txt, group_ids=batch["group_ids"], labels=batch["labels"],
                          logit_scale=getattr(model, "logit_scale", None) if getattr(loss_fn, "use_model_logit_scale", False) else None)
            out["loss"].backward()
            del img, txt, out, batch
            if optimizer is not None:
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            model.zero_grad(set_to_none=True)
            loss_fn.zero_grad(set_to_none=True)
            if snapshot is not None:
                optimizer.zero_grad(set_to_none=True)
                snapshot.restore()
            model.train(was_training)
            free_memory(device)

    return probe


# --------------------------------------------------------------------------------------------------
# Remembering probed sizes
# --------------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$CLIPEXP_CACHE_DIR/batch_sizes.json``, else ``~/.cache/clipexp/batch_sizes.json``."""
    root = os.environ.get("CLIPEXP_CACHE_DIR") or os.path.join("~", ".cache", "clipexp")
    return Path(root).expanduser() / "batch_sizes.json"


class BatchSizeCache:
    """A JSON file ``{key: batch_size}``; the key names everything the found size depends on.

    ``BatchSizeCache.key(model, resolution, precision, device_name, extra)`` builds
    ``"model|resolution|precision|device_name|extra"`` (``extra``: whatever else changes memory, e.g.
    sequence length, gradient checkpointing, locked towers). Writes go to a temp file in the same
    folder, then ``os.replace``: readers never see half a file. An unreadable file counts as empty
    (with a warning) and is rewritten on the next ``set``.
    """

    def __init__(self, path: Union[str, Path, None] = None):
        self.path = Path(path).expanduser() if path is not None else default_cache_path()

    @staticmethod
    def key(model: str, resolution: int, precision: str, device_name: str, extra: str = "") -> str:
        return f"{model}|{resolution}|{precision}|{device_name}|{extra}"

    def _read(self) -> Dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable batch-size cache %s (%s)", self.path, err)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Optional[int]:
        value = self._read().get(key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

    def set(self, key: str, value: int) -> None:
        value = int(value)
        if value < 1:
            raise ValueError(f"a batch size must be >= 1; got {value}")
        data = self._read()
        data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __repr__(self) -> str:
        return f"BatchSizeCache({str(self.path)!r})"


# --------------------------------------------------------------------------------------------------
# Choosing the batch size
# --------------------------------------------------------------------------------------------------


def resolve_batch_size(
    *,
    requested: Optional[int],
    device_type: str,
    probe: Optional[Callable[[int], Any]] = None,
    cache: Optional[BatchSizeCache] = None,
    cache_key: str = "",
    estimate: Optional[Callable[[], int]] = None,
    fallback: Optional[Dict[str, int]] = None,
    start: int = 8,
    max_batch: int = 4096,
    on_oom: Optional[Callable[[], Any]] = free_memory,
) -> Tuple[int, str]:
    """``(batch_size, source)``, source one of ``configured | cache | probe | estimate | fallback``.

    1. ``requested`` (the configured ``trainer.batch_size``) wins when not None;
    2. on CUDA: the ``cache`` entry for ``cache_key``, else ``find_max_batch_size(probe, start=start,
       max_batch=max_batch, on_oom=on_oom)`` (``probe`` is a per-batch-size step such as
       :func:`make_train_step_probe` returns), whose result is stored in the cache;
    3. ``estimate()`` when given (CPU/MPS: :func:`estimate_batch_size_for_model`; CUDA without a probe);
    4. ``fallback[device_type]`` (default: MPS 16, CPU 8, CUDA 32).

    CPU and MPS never probe: on CPU each probe step is slow, and on MPS (unified memory) an oversize
    step may swap the whole machine instead of raising.
    """
    if requested is not None:
        requested = int(requested)
        if requested < 1:
            raise ValueError(f"trainer.batch_size must be >= 1 or null (automatic); got {requested}")
        return requested, "configured"
    if device_type == "cuda":
        if cache is not None:
            cached = cache.get(cache_key)
            if cached is not None:
                log.info("batch size %d from the cache %s (%s)", cached, cache.path, cache_key)
                return cached, "cache"
        if probe is not None:
            found = find_max_batch_size(probe, start=start, max_batch=max_batch, on_oom=on_oom)
            if cache is not None:
                cache.set(cache_key, found)
            log.info("batch size %d found by probing (%s)", found, cache_key)
            return found, "probe"
    if estimate is not None:
        value = int(estimate())
        if value >= 1:
            log.info("batch size %d estimated for %s", value, device_type)
            return value, "estimate"
    table = {**DEFAULT_FALLBACK, **(fallback or {})}
    value = table.get(device_type, DEFAULT_FALLBACK["cpu"])
    log.info("batch size %d: the default for %s", value, device_type)
    return value, "fallback"



def train_batch_size(cfg: Any, model: nn.Module, loss_fn: nn.Module, dev: Any, device: torch.device) -> Tuple[int, str]:
    """The run's micro-batch (``trainer.batch_size``, else on CUDA cached or probed, else a memory
    estimate, else the defaults) and where it came from. ``dev``: the :class:`~clipexp.device.DeviceInfo`."""
    t, m = cfg.trainer, cfg.model
    if t.batch_size is not None:
        return int(t.batch_size), "configured"
    key = BatchSizeCache.key(m.name_or_path or f"built:{m.name}", m.image_resolution, dev.precision, dev.name,
                             f"ckpt={m.gradient_checkpointing},li={m.lock_image},lt={m.lock_text},loss={cfg.loss.name}")
    probe = None
    if dev.type == "cuda":
        probe = make_train_step_probe(model, loss_fn, device=device, resolution=m.image_resolution,
                                      seq_len=m.max_sequence_length, autocast=dev.autocast)

    def estimate() -> int:
        return estimate_batch_size_for_model(model, image_resolution=m.image_resolution, seq_len=m.max_sequence_length,
                                             precision=dev.precision, device=device)

    size, how = resolve_batch_size(requested=None, device_type=dev.type, probe=probe, cache=BatchSizeCache(),
                                   cache_key=key, estimate=estimate)
    if dev.type == "cuda":
        torch.manual_seed(cfg.seed)  # the probe drew random numbers; keep runs reproducible
    log.info("trainer.batch_size=null: micro-batch %d found by %s on %s", size, how, dev.type)
    return size, how
