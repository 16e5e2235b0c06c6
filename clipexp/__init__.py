"""clipexp: Hydra-configured experiments for fine-tuning CLIP on specialised domains.

The public API (the original design notes' names, the trainer, the config composer and the errors) is importable
from here; submodules load lazily so ``import clipexp`` stays fast and light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPFinetuningConfig": "clipexp.config.notes",
    "UserError": "clipexp.errors",
    "ConfigError": "clipexp.errors",
    "RunConfig": "clipexp.config.schema",
    "compose": "clipexp.config.compose",
    "validate": "clipexp.config.validate",
    "DeviceManager": "clipexp.device",
    "DeviceError": "clipexp.errors",
    "CLIPFinetuningController": "clipexp.models.loading",
    "ModelLoadError": "clipexp.errors",
    "load_clip": "clipexp.models.loading",
    "DatasetLoader": "clipexp.data.loaders",
    "DataValidationError": "clipexp.data.problems",
    "ImageTextPair": "clipexp.data.pairs",
    "CLIPDataset": "clipexp.data.dataset",
    "MultiCaptionCLIPDataset": "clipexp.data.dataset",
    "ImageTransform": "clipexp.data.transforms",
    "MultiResolutionImageTransform": "clipexp.data.transforms",
    "TextTransform": "clipexp.data.text",
    "create_dataloader": "clipexp.data.dataloader",
    "create_train_val_dataloaders": "clipexp.data.dataloader",
    "CLIPContrastiveLoss": "clipexp.losses.contrastive",
    "HardNegativeMiningLoss": "clipexp.losses.hard_negative",
    "DomainSpecificLoss": "clipexp.losses.domain_specific",
    "MultiScaleLoss": "clipexp.losses.multi_scale",
    "SigLIPLoss": "clipexp.losses.siglip",
    "TemperatureScheduler": "clipexp.losses.temperature_scheduler",
    "evaluate_retrieval": "clipexp.evaluate",
    "evaluate_heads": "clipexp.heads",
    "load_heads": "clipexp.heads",
    "Trainer": "clipexp.training.trainer",
    "train": "clipexp.training.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipexp' has no attribute {name!r}")
