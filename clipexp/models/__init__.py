"""CLIP loading, building and encoding (no Hydra, no MLflow)."""

from clipexp.models.clip import (
    CLIPFinetuningController,
    ModelLoadError,
    build_model,
    build_processor,
    build_tokenizer,
    count_parameters,
    image_features,
    load_clip,
    pack_captions,
    text_features,
    write_byte_level_vocab,
)

__all__ = [
    "CLIPFinetuningController",
    "ModelLoadError",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "count_parameters",
    "image_features",
    "load_clip",
    "pack_captions",
    "text_features",
    "write_byte_level_vocab",
]
