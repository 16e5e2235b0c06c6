"""``load_clip`` and the controller that uses it (:class:`CLIPFinetuningController`): any family's model and processor from a hub id, a local folder, a run folder, or built
sizes (no Hydra, no MLflow). What differs per family is in :mod:`clipexp.models.families`."""

from __future__ import annotations

import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from torch import nn

import clipexp.models.families as fam
from clipexp.errors import ModelLoadError
from clipexp.models.clip import (ArchitectureConfig, _looks_like_path, build_model, build_processor, count_parameters, image_features,
                                 resolve_run_folder, text_features)

log = logging.getLogger(__name__)


def load_clip(
    name_or_path: Optional[str],
    architecture: Optional[Union[Mapping[str, Any], Any]] = None,
    image_resolution: int = 224,
    max_sequence_length: int = 77,
    image_interpolation: Optional[str] = None,
    family: Optional[str] = None,
    arch: Optional[str] = None,
    pretrained: Optional[str] = None,
) -> Tuple[nn.Module, Any]:
    """Return ``(model, processor)`` of any family (:mod:`clipexp.models.families`).

    ``image_interpolation`` (``model.image_interpolation``; None keeps the processor's own) becomes the
    image processor's ``resample``, so a saved ``model/`` resizes as the run did in plain transformers too.

    ``name_or_path``: a hub id (``openai/clip-vit-base-patch32``, ``google/siglip-base-patch16-224``), a
    local folder in any family's layout, or a clipexp run folder (its ``model/`` is loaded). ``None``
    with ``architecture`` builds a random-weight model of ``family`` (default clip) and a generated
    tokenizer. open_clip: ``arch`` (``ViT-B-32``, ``RN50``, a saved folder) and ``pretrained`` (a tag,
    a checkpoint file, or ``hf-hub:<id>``).
    """
    from clipexp.data.images import PIL_RESAMPLE, RESIZE_INTERPOLATION  # here: clipexp.data imports this module

    arch_dict = None if architecture is None else (asdict(architecture) if is_dataclass(architecture) else dict(architecture))
    family = fam.detect_family(name_or_path or arch or pretrained, family)
    resample = PIL_RESAMPLE[image_interpolation] if image_interpolation is not None else None
    if family == "open_clip":
        if name_or_path is not None and arch is None:
            arch = name_or_path if not str(name_or_path).startswith("hf-hub:") else None
            pretrained = name_or_path if str(name_or_path).startswith("hf-hub:") else pretrained
        if arch and _looks_like_path(arch):
            arch = str(resolve_run_folder(Path(arch).expanduser()))
        try:
            return fam.load_open_clip_family(arch, pretrained, arch_dict, image_resolution, max_sequence_length,
                                             resample if (arch or pretrained) else PIL_RESAMPLE[image_interpolation or RESIZE_INTERPOLATION])
        except (ConnectionError, ValueError, FileNotFoundError, RuntimeError) as err:
            raise ModelLoadError(str(err).splitlines()[0]) from None

    if name_or_path is None:
        if arch_dict is None:
            raise ModelLoadError("model.name_or_path is null and no model.architecture is set; use model=tiny or a hub id")
        if arch_dict.get("vision_tower") not in (None, "vit"):
            raise ModelLoadError(f"model.architecture.vision_tower={arch_dict['vision_tower']!r} is invalid for a built {family} model: "
                                 "vit or null (only model=tiny_open_clip builds a conv tower)")
        resample = PIL_RESAMPLE[image_interpolation or RESIZE_INTERPOLATION]
        if family == "siglip":
            return fam.build_siglip(arch_dict, image_resolution, max_sequence_length, resample)
        model = build_model(arch_dict, image_resolution, max_sequence_length)  # weights follow the caller's seed
        return model, build_processor(image_resolution, max_sequence_length, resample)

    local = _looks_like_path(name_or_path)
    path = str(Path(name_or_path).expanduser()) if local else name_or_path
    if local and not Path(path).is_dir():
        raise ModelLoadError(f"model.name_or_path={name_or_path!r}: no such directory; give a save_pretrained folder or a hub id")
    path = str(resolve_run_folder(path)) if local else path
    if family == "siglip":
        try:
            return fam.load_siglip(path, local, max_sequence_length, resample)
        except (ConnectionError, ValueError) as err:
            raise ModelLoadError(str(err).splitlines()[0]) from None

    from transformers import CLIPModel, CLIPProcessor

    try:
        with fam.hub_access(local) as kwargs:  # offline: the local cache only, no ~50 s of retries
            model = CLIPModel.from_pretrained(path, **kwargs)
            processor = CLIPProcessor.from_pretrained(path, **kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(f"model.name_or_path={name_or_path!r} is not a CLIP save_pretrained folder ({str(err).splitlines()[0]})") from None
        raise ModelLoadError(fam.offline_error(name_or_path)) from None
    if max_sequence_length:
        processor.tokenizer.model_max_length = max_sequence_length
    if image_interpolation is not None:
        processor.image_processor.resample = PIL_RESAMPLE[image_interpolation]
    return model, processor


class CLIPFinetuningController:
    """Load a CLIP onto the chosen device and encode with it (the original notes' controller).

    ``config`` is a :class:`clipexp.config.notes.CLIPFinetuningConfig`. ``model_name=None`` (or ``"tiny"``)
    builds a random-weight CLIP of ``architecture`` (default: ``ArchitectureConfig()``), offline.
    """

    def __init__(self, config, architecture=None, device_manager=None):
        from clipexp.device import DeviceManager

        self.config = config
        self.architecture = architecture
        if config.model_name in (None, "tiny") and architecture is None:
            self.architecture = ArchitectureConfig()
        self.device_manager = device_manager or DeviceManager(
            config.device, "fp32" if not config.mixed_precision else config.precision, use_mps=config.use_mps
        )
        self.model: Optional[nn.Module] = None
        self.processor = None

    @property
    def device(self) -> torch.device:
        return self.device_manager.device

    def setup(self) -> "CLIPFinetuningController":
        name = None if self.config.model_name in (None, "tiny") else self.config.model_name
        self.model, self.processor = load_clip(  # the loader the trainer uses (load_training_model)
            name, self.architecture, self.config.image_resolution, self.config.max_sequence_length,
            image_interpolation=getattr(self.config, "image_interpolation", "bicubic"))
        self.model.to(self.device)
        self.device_manager.log_device_info()
        log.info("model %s: %.2fM parameters on %s", name or "built", count_parameters(self.model) / 1e6, self.device)
        return self

    def _require(self):
        if self.model is None:
            raise RuntimeError("call setup() before encoding")

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        return self.processor.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.config.max_sequence_length, return_tensors="pt"
        )

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (float32, on the model's device)."""
        self._require()
        self.model.eval()
        tok = self.tokenize(texts)
        with self.device_manager.info.autocast():
            return text_features(self.model, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))

    @torch.no_grad()
    def encode_image(self, images: List[Any]) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] for PIL images."""
        self._require()
        self.model.eval()
        pixels = self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with self.device_manager.info.autocast():
            return image_features(self.model, pixels.to(self.device))

    @torch.no_grad()
    def compute_similarity(self, text: Sequence[str], images: List[Any]) -> torch.Tensor:
        """Cosine similarity [n_images, n_texts]."""
        return self.encode_image(images) @ self.encode_text(text).T

    def get_model_state(self) -> Dict[str, Any]:
        state = {
            "model_name": self.config.model_name or "tiny",
            "is_loaded": self.model is not None,
            **self.device_manager.describe(),
        }
        if self.model is not None:
            state["num_parameters"] = count_parameters(self.model)
            state["num_trainable_parameters"] = count_parameters(self.model, trainable_only=True)
            state["embedding_dim"] = int(self.model.config.projection_dim)
        return state

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write model + tokenizer + image processor; ``CLIPModel.from_pretrained(directory)`` loads it."""
        self._require()
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        return directory
