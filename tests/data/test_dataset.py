"""CLIPDataset / MultiCaptionCLIPDataset / build_datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from clipexp.data.dataloader import collate_fn
from clipexp.data.dataset import CLIPDataset, MultiCaptionCLIPDataset, build_datasets, item_seed
from clipexp.data.loaders import DatasetLoader
from clipexp.data.pairs import ImageTextPair
from clipexp.data.text import TextTransform
from clipexp.data.transforms import ImageTransform

AUG = {"crop_scale_min": 0.5, "hflip": True, "vflip": True, "rotation_degrees": 30.0, "color_jitter": 0.3}


@pytest.fixture
def pairs(image_root: Path):
    csv = image_root / "pairs.csv"
    csv.write_text(
        "image_path,caption,label\n"
        "a.jpg,A red square.,red\n"
        "b.png,a red square,red\n"
        "sub/c.jpg,a blue circle,blue\n"
        "d.jpg,a green thing,\n"
    )
    return DatasetLoader.from_csv(csv)


@pytest.fixture
def labelled_csv(tmp_path: Path, make_img) -> Path:
    """24 images, 2 classes (16 / 8), duplicate captions per class."""
    root = tmp_path / "set"
    lines = ["image_path,caption,label"]
    for i in range(24):
        label = "cat" if i < 16 else "dog"
        make_img(root / f"{i}.jpg", i, size=(40, 36))
        lines.append(f"{i}.jpg,a photo of a {label}.,{label}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def test_item_shapes_dtypes_labels_groups(pairs, processor):
    ds = CLIPDataset(pairs, processor)
    assert len(ds) == 4 and ds.resolution == 32 and ds.max_length == 16
    item = ds[2]
    assert set(item) == {"pixel_values", "input_ids", "attention_mask", "labels", "group_ids", "indices"}
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["input_ids"].shape == (16,) and item["input_ids"].dtype == torch.long
    assert item["attention_mask"].shape == (16,) and item["attention_mask"].dtype == torch.long
    for key in ("labels", "group_ids", "indices"):
        assert item[key].shape == () and item[key].dtype == torch.long
    assert ds.class_names == ["blue", "red"]
    assert ds.labels.tolist() == [1, 1, 0, -1]
    assert ds.group_ids.tolist() == [0, 0, 1, 2]
    assert [int(ds[i]["indices"]) for i in range(4)] == [0, 1, 2, 3]
    assert ds.captions == ["A red square.", "a red square", "a blue circle", "a green thing"]
    assert ds[-1]["indices"].item() == 3


def test_config_sets_resolution_length_and_seed(pairs, processor):
    from clipexp.config.notes import CLIPFinetuningConfig

    cfg = CLIPFinetuningConfig(image_resolution=24, max_sequence_length=12, seed=9)
    ds = CLIPDataset(pairs, processor, cfg)
    assert ds[0]["pixel_values"].shape == (3, 24, 24) and ds[0]["input_ids"].shape == (12,)
    assert ds.seed == 9 and not ds.image_transform.augment


def test_captions_are_tokenised_once_at_construction(pairs, processor):
    calls = []

    class Spy:
        model_max_length = 16

        def __call__(self, texts, **kw):
            calls.append(list(texts))
            return processor.tokenizer(texts, **kw)

    ds = CLIPDataset(pairs, Spy())
    assert calls == [["A red square.", "a red square", "a blue circle", "a green thing"]]
    for i in range(len(ds)):
        ds[i]
    assert len(calls) == 1
    batch = collate_fn([ds[i] for i in range(4)])
    want = processor.tokenizer(ds.captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(batch["input_ids"], want["input_ids"])
    assert torch.equal(batch["attention_mask"], want["attention_mask"])
    assert torch.equal(ds.caption_tokens()["input_ids"], want["input_ids"])


def test_pairs_without_group_ids_get_them_from_captions(processor, image_root):
    raw = [ImageTextPair(image_root / "a.jpg", "x."), ImageTextPair(image_root / "d.jpg", "X"), ImageTextPair(image_root / "b.png", "y")]
    ds = CLIPDataset(raw, processor, class_names=["unused"])
    assert ds.group_ids.tolist() == [0, 0, 1]
    assert raw[0].group_id == -1  # caller's pairs untouched
    assert ds.class_names == ["unused"] and ds.labels.tolist() == [-1, -1, -1]


def _aug_ds(pairs, processor, seed=0):
    return CLIPDataset(pairs, processor, image_transform=ImageTransform(resolution=32, augment=True, policy=AUG), seed=seed)


def test_augmentation_is_reproducible_per_seed_epoch_index(pairs, processor):
    ds = _aug_ds(pairs, processor)
    a = ds[1]["pixel_values"]
    torch.manual_seed(123)  # the caller's RNG state does not matter ...
    b = ds[1]["pixel_values"]
    assert torch.equal(a, b)
    assert torch.equal(_aug_ds(pairs, processor)[1]["pixel_values"], a)  # ... nor the instance
    ds.set_epoch(1)
    assert ds.epoch == 1
    c = ds[1]["pixel_values"]
    assert not torch.equal(a, c)
    assert not torch.equal(_aug_ds(pairs, processor, seed=1)[1]["pixel_values"], a)
    ds.set_epoch(0)
    assert torch.equal(ds[1]["pixel_values"], a)


def test_getitem_leaves_the_global_rng_alone(pairs, processor):
    ds = _aug_ds(pairs, processor)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    ds[0]
    ds[1]
    assert torch.equal(torch.rand(3), want)


def test_item_seed_mixes_all_three():
    seeds = {item_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)


def test_same_items_whatever_the_worker_count_and_across_epochs(pairs, processor):
    ds = _aug_ds(pairs, processor)

    def run(workers):
        loader = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_fn, persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            out.append(torch.cat([b["pixel_values"] for b in loader]))
        return out

    main, worker = run(0), run(1)
    assert torch.equal(main[0], worker[0]) and torch.equal(main[1], worker[1])
    assert not torch.equal(main[0], main[1])
    # resuming mid-epoch: item 3 of epoch 1 alone equals item 3 within the full epoch
    ds.set_epoch(1)
    assert torch.equal(ds[3]["pixel_values"], main[1][3])


def test_uint8_items_through_forked_workers_equal_float_items(pairs, processor):
    """The trainer's path: uint8 items (channels-last memory) from 2 forked workers, after the main process
    has already augmented with OpenCV (a multi-threaded OpenCV deadlocked there), normalised per batch."""
    as_float = _aug_ds(pairs, processor)
    tf_u8 = ImageTransform(resolution=32, augment=True, policy=AUG, output="uint8")
    as_u8 = CLIPDataset(pairs, processor, image_transform=tf_u8, seed=0, cache="memory")
    assert as_u8[0]["pixel_values"].dtype == torch.uint8  # OpenCV has run in this process
    loader = DataLoader(as_u8, batch_size=3, num_workers=2, collate_fn=collate_fn)
    got = torch.cat([tf_u8.normalizer(b["pixel_values"]) for b in loader])
    want = torch.stack([as_float[i]["pixel_values"] for i in range(len(as_float))])
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


def test_multi_caption_dataset_draws_one_caption_per_item(processor, image_root):
    raw = [ImageTextPair(image_root / "a.jpg", ["first caption", "second caption", "third caption"], "x", 7, "s:1"),
           ImageTextPair(image_root / "d.jpg", ["only one"], None, 8, "s:2")]
    multi = MultiCaptionCLIPDataset(raw, processor)
    single = CLIPDataset(raw, processor)
    tok = {c: tuple(TextTransform(processor, 16).encode([c])[0][0].tolist())
           for c in ["first caption", "second caption", "third caption"]}
    drawn = set()
    for epoch in range(12):
        multi.set_epoch(epoch)
        ids = tuple(multi[0]["input_ids"].tolist())
        assert multi[0]["group_ids"].item() == 7
        drawn.add(next(c for c, t in tok.items() if t == ids))
    assert drawn == {"first caption", "second caption", "third caption"}
    multi.set_epoch(3)
    assert torch.equal(multi[0]["input_ids"], multi[0]["input_ids"])
    assert all(tuple(single[0]["input_ids"].tolist()) == tok["first caption"] for _ in range(3))
    assert multi.all_captions[0] == ["first caption", "second caption", "third caption"]
    assert multi.captions == ["first caption", "only one"]


def test_text_augmentation_uses_templates_for_labelled_items_only(pairs, processor):
    tt = TextTransform(processor, 16, ["a photo of {}.", "art of {}."], augment=True)
    ds = CLIPDataset(pairs, processor, text_transform=tt)
    assert set(ds.texts) == {"A red square.", "a red square", "a blue circle", "a green thing",
                             "a photo of red.", "art of red.", "a photo of blue.", "art of blue."}
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        seen.add(tuple(ds[2]["input_ids"].tolist()))
        assert torch.equal(ds[3]["input_ids"], ds.caption_tokens()["input_ids"][3])  # unlabelled: own caption
    assert len(seen) == 3


def test_build_datasets_splits_transforms_and_cache(labelled_csv: Path, processor):
    splits = build_datasets(
        {"source": "csv", "path": str(labelled_csv), "train_split": 0.5, "val_split": 0.25, "test_split": 0.25,
         "cache_images": "memory", "augment_images": True, "augment_text": True},
        processor=processor, image_resolution=32, max_sequence_length=16,
        prompt_templates=["a picture of {}."], augmentation=AUG, seed=1,
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 6)
    assert splits.class_names == ["cat", "dog"] and splits.num_pairs == 24 and splits.skipped == []
    for ds in (splits.train, splits.val, splits.test):
        assert ds.class_names == ["cat", "dog"]
        assert ds.labels.bincount().tolist() == ([8, 4] if ds is splits.train else [4, 2])
    assert splits.train.image_transform.is_random and not splits.val.image_transform.is_random
    assert "a picture of cat." in splits.train.texts and "a picture of cat." not in splits.val.texts
    assert splits.cache is not None and len(splits.cache) == 24  # filled while validating
    misses = splits.cache.misses
    batch = collate_fn([splits.val[i] for i in range(6)])
    assert splits.cache.misses == misses and batch["pixel_values"].shape == (6, 3, 32, 32)
    assert set(splits.train.group_ids.tolist()) | set(splits.val.group_ids.tolist()) == {0, 1}
    assert "24 pairs (train 12, val 6, test 6); classes: cat, dog; image cache: memory" == splits.summary()


def test_build_datasets_skip_mode_lists_skipped_rows_and_empty_splits_are_none(labelled_csv: Path, processor):
    (labelled_csv.parent / "3.jpg").write_bytes(b"")
    splits = build_datasets(
        {"source": "csv", "path": str(labelled_csv), "on_error": "skip", "train_split": 1.0, "val_split": 0.0,
         "test_split": 0.0, "cache_images": "none", "augment_images": False},
        processor=processor, image_resolution=32, max_sequence_length=16, seed=0,
    )
    assert splits.skipped == [f"{labelled_csv}:5: image '3.jpg' is empty (0 bytes)"]
    assert len(splits.train) == 23 and splits.val is None and splits.test is None and splits.cache is None
    assert not splits.train.image_transform.is_random


def test_build_datasets_uses_multi_caption_train_set_when_pairs_have_several(tmp_path: Path, make_img, processor):
    root = tmp_path / "j"
    for i in range(4):
        make_img(root / f"{i}.jpg", i)
    (root / "p.json").write_text(str([{"image": f"{i}.jpg", "captions": [f"c{i}", f"d{i}"]} for i in range(4)]).replace("'", '"'))
    splits = build_datasets({"source": "json", "path": str(root / "p.json"), "train_split": 0.5, "val_split": 0.5,
                             "test_split": 0.0, "cache_images": "none"},
                            processor=processor, image_resolution=32, max_sequence_length=16, seed=0)
    assert type(splits.train) is MultiCaptionCLIPDataset and type(splits.val) is CLIPDataset
