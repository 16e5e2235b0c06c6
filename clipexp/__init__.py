"""clipexp: Hydra-configured experiments for fine-tuning CLIP on specialised domains.

The public API (the original design notes' names) is importable from here; submodules load lazily so
``import clipexp`` stays fast and light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPFinetuningConfig": "clipexp.config",
    "ConfigError": "clipexp.config",
    "RunConfig": "clipexp.config",
    "validate": "clipexp.config",
    "DeviceManager": "clipexp.device",
    "DeviceError": "clipexp.device",
    "CLIPFinetuningController": "clipexp.models",
    "ModelLoadError": "clipexp.models",
    "load_clip": "clipexp.models",
    "DatasetLoader": "clipexp.data",
    "DataValidationError": "clipexp.data",
    "ImageTextPair": "clipexp.data",
    "CLIPDataset": "clipexp.data",
    "MultiCaptionCLIPDataset": "clipexp.data",
    "ImageTransform": "clipexp.data",
    "MultiResolutionImageTransform": "clipexp.data",
    "TextTransform": "clipexp.data",
    "create_dataloader": "clipexp.data",
    "create_train_val_dataloaders": "clipexp.data",
    "CLIPContrastiveLoss": "clipexp.losses",
    "HardNegativeMiningLoss": "clipexp.losses",
    "DomainSpecificLoss": "clipexp.losses",
    "MultiScaleLoss": "clipexp.losses",
    "SigLIPLoss": "clipexp.losses",
    "TemperatureScheduler": "clipexp.losses",
    "build_loss": "clipexp.losses",
    "evaluate_retrieval": "clipexp.evaluate",
    "Trainer": "clipexp.train",
    "train": "clipexp.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipexp' has no attribute {name!r}")
