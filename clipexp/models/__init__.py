"""Model loading (CLIP, SigLIP, open_clip families), building and encoding (no Hydra, no MLflow)."""

from clipexp.errors import ModelLoadError
from clipexp.models.clip import (
    build_model,
    build_processor,
    build_tokenizer,
    count_parameters,
    image_features,
    pack_captions,
    text_features,
    write_byte_level_vocab,
)
from clipexp.models.loading import CLIPFinetuningController, load_clip
from clipexp.models.levers import (DualEncoder, apply_levers, build_training_model, enable_checkpointing, load_training_model,
                                   prepare_for_training, quiet_transformers)

__all__ = [
    "CLIPFinetuningController",
    "DualEncoder",
    "ModelLoadError",
    "apply_levers",
    "build_training_model",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "count_parameters",
    "enable_checkpointing",
    "image_features",
    "load_clip",
    "load_training_model",
    "pack_captions",
    "prepare_for_training",
    "quiet_transformers",
    "text_features",
    "write_byte_level_vocab",
]
