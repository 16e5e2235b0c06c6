"""Model families behind one CLIP protocol: HF CLIP, HF SigLIP / SigLIP 2 (fixed resolution), open_clip.

Every family's model is an ``nn.Module`` with what the trainer, losses, EMA, WiSE-FT, LoRA, layer
decay, GradCache, evaluation and serving use: ``vision_model(pixel_values=...).pooler_output``,
``visual_projection``, ``text_model(input_ids=..., attention_mask=...).pooler_output``,
``text_projection``, ``logit_scale`` (SigLIP also ``logit_bias``), ``config.projection_dim`` and
``save_pretrained(dir)`` writing the family's own layout. What differs per family is here, in one table:

* ``clip``: ``CLIPModel`` as it is.
* ``siglip``: ``SiglipModel`` with identity projections (SigLIP's heads live inside its towers:
  ``get_image_features`` is the vision tower's pooled output) and a text spec: captions padded back
  to the length it was trained with (64) and no attention mask (SigLIP pools the last position and
  was trained attending to the padding). Built ones start at ``logit_scale = log 10``, ``logit_bias = -10``.
* ``open_clip``: :class:`clipexp.models.open_clip_family.OpenCLIPDual`.

No Hydra, no MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union
from urllib.parse import urlparse

from torch import nn

log = logging.getLogger(__name__)

SIGLIP_TEXT_LENGTH = 64


@dataclass(frozen=True)
class Family:
    name: str
    default_loss: str
    lora_targets: Tuple[str, ...]
    description: str


FAMILIES: Dict[str, Family] = {
    "clip": Family("clip", "contrastive", ("q_proj", "k_proj", "v_proj", "out_proj"), "Hugging Face CLIPModel"),
    "siglip": Family("siglip", "siglip", ("q_proj", "k_proj", "v_proj", "out_proj"), "Hugging Face SiglipModel (SigLIP, SigLIP 2 fixed-resolution)"),
    "open_clip": Family("open_clip", "contrastive", ("c_fc", "c_proj"), "open_clip CLIP / CustomTextCLIP (ViT, ConvNeXt, ResNet towers, hf-hub: models)"),
}


def family_of(model: nn.Module) -> str:
    """The family of a loaded model (through a peft wrapper too)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None) if base is not None else None
    for m in (model, inner):
        if m is not None and getattr(m, "clipexp_family", None):
            return m.clipexp_family
    return "clip"


def detect_family(name_or_path: Optional[str], family: Optional[str] = None) -> str:
    """``family`` if given, else what a local folder holds (``open_clip_config.json``; ``config.json``'s
    model_type), else the hub id's name (``siglip`` in it), else clip."""
    if family:
        if family not in FAMILIES:
            raise ValueError(f"model.family={family!r} is invalid: one of {', '.join(FAMILIES)}")
        return family
    if name_or_path:
        path = Path(name_or_path).expanduser()
        for folder in (path, path / "model"):
            if (folder / "open_clip_config.json").is_file():
                return "open_clip"
            if (folder / "config.json").is_file():
                model_type = json.loads((folder / "config.json").read_text()).get("model_type", "clip")
                return "siglip" if model_type.startswith("siglip") else "clip"
        if str(name_or_path).startswith("hf-hub:"):
            return "open_clip"
        if "siglip" in str(name_or_path).lower():
            return "siglip"
    return "clip"


# ---------------------------------------------------------------------------------------------- hub
def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP probe of the Hugging Face endpoint (``HF_ENDPOINT``); False under ``HF_HUB_OFFLINE=1``.

    Without it, an unreachable hub costs transformers/huggingface_hub their retries and etag timeouts
    (~50 s before the first error): we ask for the local cache only instead."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_access(local: bool) -> Iterator[Dict[str, Any]]:
    """The keyword arguments for a ``from_pretrained`` call: ``{}`` for a local folder or a reachable hub;
    otherwise ``local_files_only`` with huggingface_hub's offline switch on for the call, so neither the
    model, the processor nor the adapter lookup transformers does on the side spends its retries (~25 s)."""
    if local or hub_reachable():
        yield {}
        return
    import huggingface_hub.constants as hc

    old, hc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE, True
    try:
        yield {"local_files_only": True}
    finally:
        hc.HF_HUB_OFFLINE = old


def offline_error(name: str) -> str:
    return (f"cannot load {name!r}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE=1, or the id is unknown) and it is "
            f"not in the local cache; run offline with model=tiny, model=tiny_siglip or model=tiny_open_clip, or point "
            f"model.name_or_path (open_clip: model.arch) at a local folder")


# ------------------------------------------------------------------------------------------- SigLIP
class ProcessorPair:
    """A tokenizer and an image processor (what the data pipeline reads); ``save_pretrained`` writes both."""

    def __init__(self, tokenizer: Any, image_processor: Any):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))


def conform_siglip(model: nn.Module, tokenizer: Any, text_length: int = SIGLIP_TEXT_LENGTH) -> nn.Module:
    """A SiglipModel as the CLIP protocol (in place: adds parameter-free identity projections, so the
    state dict and ``save_pretrained`` are SiglipModel's own)."""
    if type(model).__name__.startswith("Siglip2"):
        raise ValueError("Siglip2Model (the NaFlex variant) is not supported: use a fixed-resolution SigLIP 2 checkpoint "
                         "such as google/siglip2-base-patch16-224 (a SiglipModel)")
    model.visual_projection, model.text_projection = nn.Identity(), nn.Identity()
    model.clipexp_family = "siglip"
    model.lora_exclude = r"\.head\.attention\.out_proj$"  # MultiheadAttention uses its weight, not its forward
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.clipexp_text = {"length": int(text_length), "pad_id": int(pad), "mask": False}
    if getattr(model.config, "projection_dim", None) is None:
        model.config.projection_dim = int(model.config.vision_config.hidden_size)
    return model


def build_siglip(architecture: Dict[str, Any], image_resolution: int, max_sequence_length: int, resample: int):
    """A random-weight SiglipModel from the tiny sizes, the generated byte-level tokenizer (no SigLIP
    SentencePiece model ships offline) padding to ``max_sequence_length``, SigLIP's processor settings
    (mean = std = 0.5), ``logit_scale = log 10`` and ``logit_bias = -10`` as in the paper."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from clipexp.models.clip import build_tokenizer

    a = architecture
    tok = build_tokenizer(max_sequence_length)
    vocab = len(tok)
    config = SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=a["text_hidden_size"], intermediate_size=a["text_intermediate_size"],
                         num_hidden_layers=a["text_layers"], num_attention_heads=a["text_heads"],
                         max_position_embeddings=max_sequence_length, pad_token_id=tok.pad_token_id,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, projection_size=a["vision_hidden_size"]),
        vision_config=dict(hidden_size=a["vision_hidden_size"], intermediate_size=a["vision_intermediate_size"],
                           num_hidden_layers=a["vision_layers"], num_attention_heads=a["vision_heads"],
                           image_size=image_resolution, patch_size=a["patch_size"]),
    )
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    ip = SiglipImageProcessor(size={"height": image_resolution, "width": image_resolution}, resample=resample,
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    ip.crop_size = {"height": image_resolution, "width": image_resolution}
    return conform_siglip(model, tok, max_sequence_length), ProcessorPair(tok, ip)


def load_siglip(path: str, local: bool, max_sequence_length: Optional[int], resample: Optional[int]):
    from transformers import AutoModel, AutoProcessor, AutoTokenizer, SiglipImageProcessor

    try:
        with hub_access(local) as kwargs:
            model = AutoModel.from_pretrained(path, **kwargs)
            try:
                processor = AutoProcessor.from_pretrained(path, **kwargs)
                tokenizer, image_processor = processor.tokenizer, processor.image_processor
            except (OSError, ValueError, TypeError):  # a clipexp-built model: byte-level tokenizer + SigLIP image processor
                tokenizer, image_processor = AutoTokenizer.from_pretrained(path, **kwargs), SiglipImageProcessor.from_pretrained(path, **kwargs)
    except OSError as err:
        if local:
            raise ValueError(f"{path!r} is not a SigLIP save_pretrained folder ({str(err).splitlines()[0]})") from None
        raise ConnectionError(offline_error(path)) from None
    length = int(max_sequence_length or SIGLIP_TEXT_LENGTH)
    length = min(length, int(model.config.text_config.max_position_embeddings))
    tokenizer.model_max_length = length
    size = getattr(image_processor, "size", None) or {}
    if not getattr(image_processor, "crop_size", None):
        image_processor.crop_size = {"height": int(size.get("height", 224)), "width": int(size.get("width", 224))}
    if resample is not None:
        image_processor.resample = resample
    return conform_siglip(model, tokenizer, length), ProcessorPair(tokenizer, image_processor)


# ----------------------------------------------------------------------------------------- open_clip
def load_open_clip_family(arch: Optional[str], pretrained: Optional[str], architecture: Optional[Dict[str, Any]],
                          image_resolution: int, max_sequence_length: int, resample: Optional[int]):
    from clipexp.models.open_clip_family import build_open_clip, load_open_clip

    if arch is None and pretrained is None:
        if architecture is None:
            raise ValueError("model.family=open_clip needs model.arch (e.g. ViT-B-32, RN50, a saved folder) or model.architecture")
        return build_open_clip(architecture, image_resolution, max_sequence_length, resample)
    local = bool(arch) and Path(arch).expanduser().is_dir()
    needs_hub = not local and (str(pretrained or "").startswith("hf-hub:") or
                               (pretrained and not Path(pretrained).expanduser().is_file()))
    with hub_access(not needs_hub) as kwargs:
        if not kwargs:
            return load_open_clip(arch, pretrained, resample)
        try:  # the local cache only
            return load_open_clip(arch, pretrained, resample)
        except Exception:  # noqa: BLE001 - open_clip's errors for a missing file vary; one line
            raise ConnectionError(offline_error(pretrained or arch)) from None
