"""Memory: what fits, and what happens when it does not.

* the batch size (:func:`train_batch_size`): ``trainer.batch_size``, else on CUDA the largest micro-batch for
  which one real training step fits (probed by doubling then bisection, remembered per model / resolution /
  precision / device in a small JSON cache), else on CPU and MPS an estimate from arithmetic alone;
* out of memory mid-run (:class:`MicroBatches`): the trainer halves the micro-batch and keeps the logical batch
  (with GradCache the gradient does not change at all);
* :func:`attempt`: the one place an out-of-memory error is caught; the probe and the trainer both retry through it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from clipexp.errors import BatchTooLargeError
from clipexp.files import write_text

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Recognising an OOM, and the one retry helper
# --------------------------------------------------------------------------------------------------

_OOM_MESSAGES = (
    "out of memory",  # "CUDA out of memory", "MPS backend out of memory", "XPU out of memory"
    "can't allocate memory",  # "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
)


#: what to change when even one sample does not fit (the probe and a run that ran out of memory say the same)
TOO_LARGE = ("out of memory at {what}; use a smaller model or model.image_resolution, set model.gradient_checkpointing=true, "
             "lock a tower (model.lock_image=true), or use device.precision=bf16/fp16")


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means "this does not fit in memory" (and a smaller batch may).

    ``torch.OutOfMemoryError`` (= ``torch.cuda.OutOfMemoryError``), Python's ``MemoryError``, and a
    ``RuntimeError`` whose message says out of memory: CUDA, MPS ("MPS backend out of memory"), the CPU
    allocator ("DefaultCPUAllocator: can't allocate memory") and cuBLAS / cuDNN allocation failures.
    """
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    if isinstance(err, MemoryError):
        return True
    if isinstance(err, RuntimeError):
        message = str(err).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False


def free_memory(device: Union[str, torch.device, None] = None) -> None:
    """``gc.collect()`` then give cached blocks back: CUDA and/or MPS (``device=None``: whichever exist)."""
    gc.collect()
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if kind in (None, "mps") and mps is not None and mps.is_available():
        torch.mps.empty_cache()



def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Tuple[bool, Any]:
    """``(True, fn(...))``, or ``(False, None)`` when ``fn`` ran out of memory; any other error propagates.

    By the time it returns, the failed call's frames (and the tensors they held) are gone, so the caller's
    :func:`free_memory` can give that memory back."""
    try:
        return True, fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
        if not is_oom(err):
            raise
    return False, None


# --------------------------------------------------------------------------------------------------
# Recovering from an OOM mid-run
# --------------------------------------------------------------------------------------------------


def split_batch(batch: Dict[str, Any], micro: int) -> List[Dict[str, Any]]:
    """Split a logical batch into consecutive micro-batches of ``micro`` samples (the last may be smaller).

    Tensors and lists/tuples whose first dimension is the batch size are sliced; any other value
    (metadata) is shared by every micro-batch. Concatenating the pieces in order gives the batch back.
    With a plain (averaged) accumulation, weight each micro-batch's loss by its size over the total.
    """
    if micro < 1:
        raise ValueError(f"micro-batch size must be >= 1; got {micro}")
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors must share their first dimension; got sizes {sorted(sizes)}")
    total = sizes.pop()

    def sliceable(v: Any) -> bool:
        return (torch.is_tensor(v) and v.dim() > 0) or (isinstance(v, (list, tuple)) and len(v) == total)

    return [{k: (v[a:a + micro] if sliceable(v) else v) for k, v in batch.items()} for a in range(0, total, micro)]


class MicroBatches:
    """The micro-batch size of a logical batch: ``size * accumulation >= logical_batch`` always.

    :meth:`halve` (after an out-of-memory step) sets ``size = ceil(size / 2)`` and ``accumulation =
    ceil(logical_batch / size)``; at size 1 it raises :class:`BatchTooLargeError` saying what to change.
    Feed a step with ``split_batch(logical_batch_dict, micro.size)``.
    """

    def __init__(self, size: int, accumulation: int = 1, logical_batch: Optional[int] = None):
        if size < 1 or accumulation < 1:
            raise ValueError(f"size and accumulation must be >= 1; got {size}, {accumulation}")
        self.size = int(size)
        self.accumulation = int(accumulation)
        self.logical_batch = int(logical_batch) if logical_batch is not None else self.size * self.accumulation
        self.history: List[Tuple[int, int]] = [(self.size, self.accumulation)]

    def halve(self) -> Tuple[int, int]:
        if self.size <= 1:
            raise BatchTooLargeError(TOO_LARGE.format(what=f"micro-batch 1 (logical batch {self.logical_batch})"))
        self.size = math.ceil(self.size / 2)
        self.accumulation = math.ceil(self.logical_batch / self.size)
        self.history.append((self.size, self.accumulation))
        log.warning("out of memory: micro-batch now %d x %d accumulation (logical batch %d)", self.size, self.accumulation,
                    self.logical_batch)
        return self.size, self.accumulation

    def state_dict(self) -> Dict[str, int]:
        return {"micro": self.size, "accum": self.accumulation, "logical_batch": self.logical_batch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.size, self.accumulation, self.logical_batch = int(state["micro"]), int(state["accum"]), int(state["logical_batch"])


# --------------------------------------------------------------------------------------------------
# Estimating from arithmetic (CPU, MPS)
# --------------------------------------------------------------------------------------------------

#: Activation elements saved for backward per token per width unit, per transformer layer (LN inputs,
#: QKV input, Q/K/V, attention output, out-proj input, MLP input, 4x-wide MLP hidden pre/post GELU,
#: residuals). Korthikanti et al. 2022 count 17 (34 bytes at 16 bit); 18 matches the saved-tensor
#: bytes of a HF ViT-B/32 CLIP training step measured with saved_tensors_hooks (76-80 MB/sample fp32).
ACTIVATION_ELEMENTS_PER_TOKEN_WIDTH = 18
#: Attention-score elements saved per head per token pair (softmax probabilities + masks); heads = width / 64.
ATTENTION_ELEMENTS_PER_HEAD_TOKEN_PAIR = 2.5
HEAD_DIM = 64
#: Bytes per saved activation element: fp32 = 4; under bf16/fp16 autocast LayerNorm outputs, softmax and
#: the residual stream stay fp32 (measured: 0.60-0.64x the fp32 bytes), so 3, not 2.
BYTES_PER_ACTIVATION = {"fp32": 4, "bf16": 3, "fp16": 3}
#: Weights + gradients + AdamW's two moments, fp32: 4 + 4 + 8 bytes per parameter; autocast adds a
#: 16-bit copy of the weights (2 bytes per parameter).
STATE_BYTES_PER_PARAM = 16
AUTOCAST_BYTES_PER_PARAM = 2
#: Only this share of the available memory is planned for (other processes, allocator caching and
#: fragmentation, kernels' workspaces) ...
MEMORY_FRACTION = 0.8
#: ... and each sample is charged this much more than its saved activations (the backward's transient
#: gradient buffers, inputs, the B x B logits).
ACTIVATION_SAFETY = 1.25
MAX_ESTIMATE = 1024


def _layer_activation_elements(tokens: int, width: int) -> float:
    heads = max(1, width // HEAD_DIM)
    return ACTIVATION_ELEMENTS_PER_TOKEN_WIDTH * tokens * width + ATTENTION_ELEMENTS_PER_HEAD_TOKEN_PAIR * heads * tokens**2


def estimate_batch_size(
    num_params: int,
    image_resolution: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    text_width: int,
    text_layers: int,
    seq_len: int,
    precision: str,
    available_bytes: int,
) -> int:
    """A conservative batch size from arithmetic alone, a power of two in [1, 1024].

    ::

        tokens_v  = (image_resolution // patch_size)**2 + 1                  # patches + CLS
        layer(T, W) = 18 * T * W + 2.5 * (W / 64) * T**2                     # elements kept for backward
        per_sample = 1.25 * bytes_per_act * (vision_layers * layer(tokens_v, vision_width)
                                             + text_layers * layer(seq_len, text_width))
        fixed      = num_params * (16 + (2 if precision in {bf16, fp16} else 0))
        batch      = pow2_floor(clamp((0.8 * available_bytes - fixed) / per_sample, 1, 1024))

    with ``bytes_per_act`` = 4 for fp32 and 3 for bf16/fp16 autocast. For ViT-B/32 at 224 px and 77
    tokens this charges ~96 MB/sample in fp32 (measured saved activations: 76-80 MB) plus 2.4 GB of
    weights, gradients and AdamW state. When the fixed cost alone does not fit, the answer is 1 (and a
    warning): it may still not fit, and the trainer's OOM recovery or a smaller model is the way out.
    """
    if precision not in BYTES_PER_ACTIVATION:
        raise ValueError(f"precision must be one of {', '.join(BYTES_PER_ACTIVATION)}; got {precision!r}")
    vision_tokens = (image_resolution // patch_size) ** 2 + 1
    elements = vision_layers * _layer_activation_elements(vision_tokens, vision_width) + text_layers * _layer_activation_elements(seq_len, text_width)
    per_sample = ACTIVATION_SAFETY * BYTES_PER_ACTIVATION[precision] * elements
    fixed = num_params * (STATE_BYTES_PER_PARAM + (AUTOCAST_BYTES_PER_PARAM if precision != "fp32" else 0))
    budget = MEMORY_FRACTION * available_bytes - fixed
    if budget < per_sample:
        log.warning(
            "memory estimate: %.2f GB available cannot hold weights/gradients/optimizer state (%.2f GB) plus one "
            "sample (%.1f MB); trying batch size 1", available_bytes / 1e9, fixed / 1e9, per_sample / 1e6,
        )
        return 1
    raw = min(MAX_ESTIMATE, int(budget // per_sample))
    return 1 << (raw.bit_length() - 1)


def available_memory_bytes(device: Union[str, torch.device]) -> int:
    """Memory a run may use on ``device`` now.

    CUDA: free bytes (``torch.cuda.mem_get_info``). MPS: ``torch.mps.recommended_max_memory()`` (Metal's
    recommended working set) minus what the driver already holds, when this torch has it; else, like
    CPU, ``psutil.virtual_memory().available`` (unified memory).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "recommended_max_memory"):
            used = mps.driver_allocated_memory() if hasattr(mps, "driver_allocated_memory") else 0
            return max(0, int(mps.recommended_max_memory()) - int(used))
    import psutil

    return int(psutil.virtual_memory().available)


def estimate_batch_size_for_model(
    model: nn.Module,
    *,
    image_resolution: int,
    seq_len: int,
    precision: str,
    device: Union[str, torch.device],
    available_bytes: Optional[int] = None,
) -> int:
    """:func:`estimate_batch_size` with the sizes read from a HF ``CLIPModel``'s config and the
    available memory from :func:`available_memory_bytes` (unless given)."""
    v, t = model.config.vision_config, model.config.text_config
    return estimate_batch_size(
        num_params=sum(p.numel() for p in model.parameters()),
        image_resolution=image_resolution,
        patch_size=int(v.patch_size),
        vision_width=int(v.hidden_size),
        vision_layers=int(v.num_hidden_layers),
        text_width=int(t.hidden_size),
        text_layers=int(t.num_hidden_layers),
        seq_len=seq_len,
        precision=precision,
        available_bytes=available_memory_bytes(device) if available_bytes is None else int(available_bytes),
    )


# --------------------------------------------------------------------------------------------------
# Probing, remembering and choosing the batch size
# --------------------------------------------------------------------------------------------------

#: batch size used when nothing better is known
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
    Errors that are not OOMs propagate unchanged; if even batch 1 does not fit,
    says so (:class:`BatchTooLargeError`). Each probed size is logged.
    """
    if start < 1 or max_batch < 1:
        raise ValueError(f"start and max_batch must be >= 1; got start={start}, max_batch={max_batch}")
    start = min(start, max_batch)

    def fits(batch_size: int) -> bool:
        ok, _ = attempt(probe, batch_size)
        if not ok and on_oom is not None:
            on_oom()
        log.info("batch size probe: %d %s", batch_size, "fits" if ok else "out of memory")
        return ok

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
        raise BatchTooLargeError(TOO_LARGE.format(what="batch size 1"))
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
    sequence length, gradient checkpointing, locked towers). Written atomically
    (:func:`clipexp.files.atomic_write`): readers never see half a file. An unreadable file counts as empty
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
        write_text(self.path, json.dumps(data, indent=1, sort_keys=True))

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
        return int(requested), "configured"
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
                             f"ckpt={m.gradient_checkpointing},li={m.lock_image},lt={m.lock_text},loss={getattr(loss_fn, 'name', '')}")
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
