"""collate_fn, create_dataloader, create_train_val_dataloaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler

from clipexp.config.notes import CLIPFinetuningConfig
from clipexp.data.dataloader import collate_fn, create_dataloader, create_train_val_dataloaders, default_num_workers
from clipexp.data.dataset import CLIPDataset
from clipexp.data.loaders import DatasetLoader
from clipexp.data.transforms import ImageTransform


@pytest.fixture
def dataset(tmp_path: Path, make_img, processor) -> CLIPDataset:
    root = tmp_path / "dl"
    for i in range(10):
        make_img(root / f"{i}.jpg", i)
    (root / "p.csv").write_text("image_path,caption,label\n" + "".join(f"{i}.jpg,caption {i % 3},c{i % 2}\n" for i in range(10)))
    return CLIPDataset(DatasetLoader.from_csv(root / "p.csv"), processor, cache="memory")


def indices(loader):
    return [i for b in loader for i in b["indices"].tolist()]


def test_batches_have_the_item_keys_shapes_and_dtypes(dataset):
    loader = create_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["input_ids"].shape == b["attention_mask"].shape == (4, 16)
    assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    assert b["labels"].tolist() == [0, 1, 0, 1] and b["group_ids"].tolist() == [0, 1, 2, 0]
    assert b["indices"].tolist() == [0, 1, 2, 3]
    assert [len(x["indices"]) for x in create_dataloader(dataset, batch_size=4, drop_last=True, num_workers=0)] == [4, 4]


def test_shuffle_is_seeded(dataset):
    a = indices(create_dataloader(dataset, batch_size=4, num_workers=0, seed=1))
    b = indices(create_dataloader(dataset, batch_size=4, num_workers=0, seed=1))
    c = indices(create_dataloader(dataset, batch_size=4, num_workers=0, seed=2))
    assert a == b and a != c and sorted(a) == list(range(10)) and a != list(range(10))


def test_sampler_is_passed_through(dataset):
    class Reverse(SequentialSampler):
        def __iter__(self):
            return iter(range(len(self.data_source) - 1, -1, -1))

    loader = create_dataloader(dataset, batch_size=3, sampler=Reverse(dataset), num_workers=0)
    assert indices(loader) == list(range(9, -1, -1))


def test_config_shuffle_workers_seed_and_cpu_defaults(dataset):
    cfg = CLIPFinetuningConfig(shuffle=False, num_workers=0, seed=5)
    loader = create_dataloader(dataset, cfg, batch_size=4)
    assert loader.num_workers == 0 and indices(loader) == list(range(10))
    assert loader.pin_memory is torch.cuda.is_available()
    workers = create_dataloader(dataset, batch_size=5, shuffle=False, num_workers=1)
    assert workers.persistent_workers and workers.prefetch_factor == 2  # torch's default, as the trainer's loader
    assert indices(workers) == list(range(10))
    assert torch.equal(next(iter(workers))["pixel_values"], next(iter(create_dataloader(dataset, batch_size=5, shuffle=False, num_workers=0)))["pixel_values"])


def test_the_notes_loader_takes_the_trainers_worker_rule(dataset, monkeypatch):
    """create_dataloader (the original notes' call) and the trainer choose workers by one rule: default_num_workers."""
    assert [default_num_workers(n, "cpu") for n in (1, 2, 3, 4, 8, 32)] == [0, 0, 0, 1, 2, 4]
    assert [default_num_workers(n, "cuda") for n in (1, 2, 4, 8, 16)] == [0, 1, 2, 4, 4]
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert create_dataloader(dataset, batch_size=4).num_workers == default_num_workers(8, accelerator)


def test_train_val_loaders(dataset):
    train, val = create_train_val_dataloaders(dataset, dataset, CLIPFinetuningConfig(num_workers=0, seed=3), batch_size=4)
    assert indices(val) == list(range(10))
    assert sorted(indices(train)) == list(range(10)) and indices(train) != list(range(10))
    only_train, none = create_train_val_dataloaders(dataset, None, batch_size=4, num_workers=0)
    assert none is None and len(only_train) == 3


def test_collate_fn_stacks_tensors_and_lists_the_rest():
    batch = collate_fn([{"x": torch.tensor(1), "name": "a"}, {"x": torch.tensor(2), "name": "b"}])
    assert batch["x"].tolist() == [1, 2] and batch["name"] == ["a", "b"]
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])


def test_collate_fn_keeps_channels_last_images_channels_last():
    # clipexp's transforms return [3, H, W] images with [H, W, 3] memory: stacked without transposing
    images = [torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(4)]
    batch = collate_fn([{"pixel_values": im} for im in images])["pixel_values"]
    assert batch.shape == (4, 3, 5, 7) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(images))
    plain = collate_fn([{"pixel_values": im.contiguous()} for im in images])["pixel_values"]
    assert plain.is_contiguous() and torch.equal(plain, batch)
