"""The real textile set (conformal-clip-data): counts, captions, one batch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("conformal_clip_data")

from clipexp.data.cache import ImageCache
from clipexp.data.dataloader import create_dataloader
from clipexp.data.dataset import CLIPDataset, build_datasets
from clipexp.data.loaders import DatasetLoader
from clipexp.data.split import split_pairs
from clipexp.data.textile import (
    TEXTILE_CAPTIONS,  # noqa: E402
    textile_root,  # noqa: E402
)


@pytest.fixture(scope="module")
def textile_pairs():
    return DatasetLoader.from_textile(cache=ImageCache("memory", 32))


def test_textile_counts_labels_and_captions(textile_pairs):
    assert len(textile_pairs) == 2000
    assert Counter(p.label for p in textile_pairs) == {"nominal": 1000, "local defect": 500, "global defect": 500}
    assert {p.caption for p in textile_pairs} == {
        "a close-up photo of defect-free textile fabric.",
        "a textile fabric with a small local defect.",
        "a textile fabric with a defect spread across the whole surface.",
    }
    assert all(p.caption == TEXTILE_CAPTIONS[p.label] for p in textile_pairs)
    assert Counter(p.group_id for p in textile_pairs) == {0: 1000, 1: 500, 2: 500}
    root = textile_root()
    assert textile_pairs[0].image_path == root / "nominal" / "textile_0001.jpg"
    assert all(p.image_path.parent.parent == root for p in textile_pairs)


def test_textile_one_batch(textile_pairs, processor):
    train, val, test = split_pairs(textile_pairs, 0.8, 0.1, 0.1, seed=42)
    assert (len(train), len(val), len(test)) == (1600, 200, 200)
    assert Counter(p.label for p in val) == {"nominal": 100, "local defect": 50, "global defect": 50}
    ds = CLIPDataset(train, processor, cache="memory")
    assert ds.class_names == ["global defect", "local defect", "nominal"]
    batch = next(iter(create_dataloader(ds, batch_size=16, num_workers=0, seed=0)))
    assert batch["pixel_values"].shape == (16, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == (16, 16)
    assert set(batch["labels"].tolist()) <= {0, 1, 2} and set(batch["group_ids"].tolist()) <= {0, 1, 2}


def test_textile_build_datasets_with_max_samples(processor):
    splits = build_datasets({"source": "textile", "max_samples": 100, "cache_images": "auto"},
                            processor=processor, image_resolution=32, max_sequence_length=16,
                            prompt_templates=["a close-up photo of {} textile fabric."],
                            augmentation={"crop_scale_min": 0.85, "hflip": True}, seed=0)
    assert splits.num_pairs == 100
    assert Counter(splits.train.class_names[i] for i in splits.train.labels.tolist()) == {
        "nominal": 40, "local defect": 20, "global defect": 20}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 10, 10)
    assert splits.cache is not None and splits.cache.mode == "memory" and len(splits.cache) == 100
