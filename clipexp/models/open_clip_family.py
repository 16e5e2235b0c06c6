"""open_clip models behind the CLIP protocol the trainer uses (no Hydra, no MLflow).

:class:`OpenCLIPDual` exposes ``vision_model`` / ``text_model`` (towers whose output has ``pooler_output``),
identity ``visual_projection`` / ``text_projection`` (open_clip's projections live inside its towers),
``logit_scale`` (and ``logit_bias`` for SigLIP-style checkpoints) and ``save_pretrained``. The towers
hold open_clip's own submodules and parameters (the same objects, not copies) and run open_clip's own
``encode_image`` / ``encode_text``, so embeddings are the reference forward's bit for bit, and the
state dict that ``save_pretrained`` writes is open_clip's (``open_clip_config.json`` +
``open_clip_pytorch_model.bin``: ``open_clip.create_model('local-dir:<dir>')`` loads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"


class _Pooled(SimpleNamespace):
    pooler_output: torch.Tensor


class OpenCLIPVision(nn.Module):
    def __init__(self, oc: nn.Module):
        super().__init__()
        self.visual = oc.visual

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> _Pooled:
        return _Pooled(pooler_output=self.visual(pixel_values))


class OpenCLIPText(nn.Module):
    """open_clip's text encoder. A ``CLIP`` keeps its text parts at the top level: they are registered
    here (same objects) and ``oc.encode_text`` runs; a ``CustomTextCLIP`` (e.g. BiomedCLIP's BERT) has ``oc.text``.
    Token ids shorter than the context (padding cut by the trainer) are padded back with 0, open_clip's
    pad id, so every pooling type ('argmax', 'last', 'eos') sees what the reference sees."""

    def __init__(self, oc: nn.Module, context_length: int, pad_id: int = 0):
        super().__init__()
        object.__setattr__(self, "_oc", oc)
        self.context_length, self.pad_id = int(context_length), int(pad_id)
        if hasattr(oc, "text"):
            self.text = oc.text
        else:
            self.token_embedding, self.transformer, self.ln_final = oc.token_embedding, oc.transformer, oc.ln_final
            self.positional_embedding = oc.positional_embedding
            if isinstance(oc.text_projection, nn.Parameter):
                self.text_projection = oc.text_projection
            elif oc.text_projection is not None:
                self.text_proj = oc.text_projection
            if getattr(oc, "attn_mask", None) is not None:
                self.register_buffer("attn_mask", oc.attn_mask, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_: Any) -> _Pooled:
        if input_ids.shape[1] < self.context_length:
            input_ids = nn.functional.pad(input_ids, (0, self.context_length - input_ids.shape[1]), value=self.pad_id)
        if hasattr(self, "attn_mask"):
            self._oc._buffers["attn_mask"] = self.attn_mask  # the device this module was moved to
        return _Pooled(pooler_output=self._oc.encode_text(input_ids))


class OpenCLIPDual(nn.Module):
    """An open_clip model as the trainer's CLIP protocol (see the module docstring)."""

    clipexp_family = "open_clip"
    # attention pooling / MultiheadAttention use these linears' weights directly, not their forward: a LoRA adapter there would never run
    lora_exclude = r"attnpool\.|\.attn\.out_proj$"

    def __init__(self, oc: nn.Module, model_cfg: Dict[str, Any], preprocess_cfg: Dict[str, Any], tokenizer_name: str):
        super().__init__()
        object.__setattr__(self, "oc", oc)
        self.model_cfg, self.preprocess_cfg, self.tokenizer_name = dict(model_cfg), dict(preprocess_cfg), tokenizer_name
        ctx = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
        self.vision_model = OpenCLIPVision(oc)
        self.text_model = OpenCLIPText(oc, ctx)
        self.visual_projection, self.text_projection = nn.Identity(), nn.Identity()
        self.logit_scale = oc.logit_scale
        if getattr(oc, "logit_bias", None) is not None:
            self.logit_bias = oc.logit_bias
        text_cfg = model_cfg.get("text_cfg", {})
        self.config = SimpleNamespace(projection_dim=int(model_cfg["embed_dim"]), text_config=SimpleNamespace(
            dropout=float(text_cfg.get("dropout", 0.0) or 0.0), attention_dropout=float(text_cfg.get("attn_dropout", 0.0) or 0.0)),
            family="open_clip", context_length=ctx)

    def open_clip_state_dict(self) -> Dict[str, torch.Tensor]:
        """open_clip's own state dict (the towers share its modules, so it is the trained weights)."""
        if hasattr(self.text_model, "attn_mask"):
            self.oc._buffers["attn_mask"] = self.text_model.attn_mask
        return self.oc.state_dict()

    def set_tower_checkpointing(self, towers: str = "both") -> None:
        for name, tower in (("image", self.vision_model), ("text", self.text_model)):
            on = towers in ("both", True, name)
            for module in tower.modules():
                if hasattr(module, "grad_checkpointing"):
                    module.grad_checkpointing = on

    def save_pretrained(self, directory: Union[str, Path], **_: Any) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg,
                  "clipexp": {"tokenizer": self.tokenizer_name}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        torch.save({k: v.detach().cpu() for k, v in self.open_clip_state_dict().items()}, directory / WEIGHTS_FILE)
        return directory


class OpenCLIPTokenizer:
    """open_clip's tokenizer with the HF call the data pipeline makes:
    ``tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")`` ->
    ``{"input_ids", "attention_mask"}`` (1 up to the last non-pad token)."""

    def __init__(self, tokenizer: Any, context_length: int, name: str):
        self.tokenizer, self.model_max_length, self.name = tokenizer, int(context_length), name
        self.pad_token_id = 0

    def __call__(self, texts: Union[str, Sequence[str]], padding: Any = "max_length", truncation: bool = True,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = "pt", **_: Any) -> Dict[str, Any]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = min(int(max_length or self.model_max_length), self.model_max_length)
        ids = self.tokenizer(texts, context_length=self.model_max_length)[:, :length]
        nz = (ids != self.pad_token_id).long()
        last = torch.where(nz.any(1), ids.shape[1] - 1 - nz.flip(1).argmax(1), torch.zeros(len(texts), dtype=torch.long))
        mask = (torch.arange(ids.shape[1])[None, :] <= last[:, None]).long()
        if return_tensors == "pt":
            return {"input_ids": ids, "attention_mask": mask}
        return {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}

    def save_pretrained(self, directory: Union[str, Path]) -> None:  # the tokenizer is named in open_clip_config.json
        return None


class OpenCLIPProcessor:
    """``.tokenizer`` and ``.image_processor`` (a CLIPImageProcessor with open_clip's size, mean, std and
    interpolation): what the data pipeline reads. ``save_pretrained`` writes ``preprocessor_config.json``."""

    def __init__(self, tokenizer: OpenCLIPTokenizer, image_processor: Any):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        self.image_processor.save_pretrained(str(directory))


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def _image_processor(preprocess_cfg: Dict[str, Any], image_size: int, resample: Optional[int] = None):
    from transformers import CLIPImageProcessor

    from clipexp.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = preprocess_cfg.get("size", image_size)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    rs = resample if resample is not None else _RESAMPLE.get(str(preprocess_cfg.get("interpolation", "bicubic")), 3)
    return CLIPImageProcessor(resample=rs, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(preprocess_cfg.get("mean", OPENAI_CLIP_MEAN)),
                              image_std=list(preprocess_cfg.get("std", OPENAI_CLIP_STD)))


VISION_TOWERS = ("conv", "vit")


def tiny_open_clip_config(architecture: Dict[str, Any], image_resolution: int, max_sequence_length: int) -> Dict[str, Any]:
    """An open_clip model config (the dict of open_clip's model JSONs: ``open_clip.add_model_config`` reads it, and
    ``open_clip_train`` builds the same model from it) with a small text transformer and, per
    ``architecture["vision_tower"]``, a ModifiedResNet (``conv``, the default) or a ViT (``vit``) image tower."""
    from clipexp.errors import ConfigError

    a = architecture
    tower = a.get("vision_tower") or "conv"
    if tower not in VISION_TOWERS:
        raise ConfigError("model.architecture.vision_tower", tower, "conv (a ModifiedResNet) or vit (a ViT of the vision_* sizes)")
    if tower == "vit":
        width, heads = int(a["vision_hidden_size"]), int(a["vision_heads"])
        vision = {"image_size": int(image_resolution), "layers": int(a["vision_layers"]), "width": width,
                  "head_width": width // heads, "mlp_ratio": a["vision_intermediate_size"] / width, "patch_size": int(a["patch_size"])}
    else:
        width = int(a.get("vision_hidden_size", 64)) // 4 or 16  # ModifiedResNet's stem width; its output is 32x that
        layers = int(a.get("vision_layers", 2))
        vision = {"image_size": int(image_resolution), "layers": [max(1, layers // 2), max(1, layers - layers // 2), 1, 1],
                  "width": max(8, width), "head_width": 16, "patch_size": None}
    return {
        "embed_dim": int(a["projection_dim"]),
        "vision_cfg": vision,
        "text_cfg": {"context_length": int(max_sequence_length), "vocab_size": 49408, "width": int(a["text_hidden_size"]),
                     "heads": int(a["text_heads"]), "layers": int(a["text_layers"]), "mlp_ratio": a["text_intermediate_size"] / a["text_hidden_size"]},
    }


def _wrap(oc: nn.Module, model_cfg: Dict[str, Any], preprocess_cfg: Dict[str, Any], tokenizer_name: str,
          resample: Optional[int] = None):
    import open_clip

    ctx = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    if tokenizer_name.startswith(("hf-hub:", "local-dir:")):
        raw = open_clip.get_tokenizer(tokenizer_name)
    else:
        hf_tok = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
        raw = open_clip.tokenizer.HFTokenizer(hf_tok, context_length=ctx) if hf_tok else open_clip.SimpleTokenizer(context_length=ctx)
    model = OpenCLIPDual(oc, model_cfg, preprocess_cfg, tokenizer_name)
    image_size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    proc = OpenCLIPProcessor(OpenCLIPTokenizer(raw, ctx, tokenizer_name), _image_processor(preprocess_cfg, int(image_size), resample))
    return model, proc


def build_open_clip(architecture: Dict[str, Any], image_resolution: int, max_sequence_length: int, resample: Optional[int] = None):
    """``(OpenCLIPDual, processor)`` with random weights (the caller's seed) from the tiny sizes: offline."""
    import open_clip
    from open_clip.model import CLIP

    cfg = tiny_open_clip_config(architecture, image_resolution, max_sequence_length)
    oc = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    preprocess = {"size": int(image_resolution), "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return _wrap(oc, cfg, preprocess, "builtin", resample)


def load_open_clip(arch: Optional[str], pretrained: Optional[str], resample: Optional[int] = None):
    """``(OpenCLIPDual, processor)`` from an open_clip architecture + pretrained tag / file, an ``hf-hub:`` id,
    or a folder holding ``open_clip_config.json`` (what :meth:`OpenCLIPDual.save_pretrained` writes)."""
    import open_clip

    if arch and Path(arch).expanduser().is_dir():
        directory = Path(arch).expanduser().resolve()
        config = json.loads((directory / CONFIG_FILE).read_text())
        model_cfg, preprocess = config["model_cfg"], config.get("preprocess_cfg", {})
        oc = open_clip.create_model(f"local-dir:{directory}")
        return _wrap(oc, model_cfg, preprocess, config.get("clipexp", {}).get("tokenizer", "builtin"), resample)
    name = arch if not (pretrained or "").startswith("hf-hub:") else pretrained
    tag = None if name == pretrained else pretrained
    oc = open_clip.create_model(name, pretrained=tag)
    if name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        config = _get_hf_config(name[len("hf-hub:"):])
        model_cfg, preprocess = config["model_cfg"], config.get("preprocess_cfg", {})
        tok_name = name
    else:
        model_cfg, preprocess = open_clip.get_model_config(name), {}
        tok_name = "builtin"
    pp = getattr(oc.visual, "preprocess_cfg", None) or {}
    preprocess = {**{k: v for k, v in pp.items() if k in ("mean", "std", "interpolation", "resize_mode")}, **preprocess}
    preprocess.setdefault("size", oc.visual.image_size)
    return _wrap(oc, model_cfg, preprocess, tok_name, resample)


def is_open_clip_dir(path: Union[str, Path]) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()
