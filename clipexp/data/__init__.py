"""Data pipeline: sources -> validated pairs -> splits -> datasets -> DataLoaders (no Hydra, no MLflow).

``build_datasets(data_cfg, processor=..., ...)`` is the trainer's one call; the pieces are public for
library use (see the README section "Data").
"""

from clipexp.data.cache import ImageCache
from clipexp.data.dataloader import collate_fn, create_dataloader, create_train_val_dataloaders, default_num_workers
from clipexp.data.dataset import CLIPDataset, DataSplits, MultiCaptionCLIPDataset, build_datasets, item_seed
from clipexp.data.images import decode_image_file, load_resized
from clipexp.data.loaders import DatasetLoader, load_pairs
from clipexp.data.pairs import ImageTextPair, assign_group_ids, normalize_caption
from clipexp.data.problems import DataValidationError, Problem
from clipexp.data.split import split_pairs
from clipexp.data.text import TextTransform
from clipexp.data.textile import TEXTILE_CAPTIONS, TEXTILE_CLASSES
from clipexp.data.transforms import ImageTransform, MultiResolutionImageTransform

__all__ = [
    "CLIPDataset",
    "DataSplits",
    "DataValidationError",
    "DatasetLoader",
    "ImageCache",
    "ImageTextPair",
    "ImageTransform",
    "MultiCaptionCLIPDataset",
    "MultiResolutionImageTransform",
    "Problem",
    "TEXTILE_CAPTIONS",
    "TEXTILE_CLASSES",
    "TextTransform",
    "assign_group_ids",
    "build_datasets",
    "collate_fn",
    "create_dataloader",
    "create_train_val_dataloaders",
    "decode_image_file",
    "default_num_workers",
    "item_seed",
    "load_pairs",
    "load_resized",
    "normalize_caption",
    "split_pairs",
]
