"""A conservative batch size from arithmetic alone, for CPU and MPS (where probing is slow, or an
oversize step may take the machine down with it)."""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

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
