"""ImageCache: identical tensors to uncached loading, disk persistence, re-decode on change, auto."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from clipexp.data.cache import ImageCache, estimate_bytes
from clipexp.data.dataset import CLIPDataset
from clipexp.data.formats import read_csv
from clipexp.data.images import load_resized
from clipexp.data.loaders import DatasetLoader
from clipexp.data.transforms import ImageTransform

AUG = {"crop_scale_min": 0.6, "hflip": True, "rotation_degrees": 20.0, "color_jitter": 0.2}
NAMES = ["a.jpg", "b.png", "sub/c.jpg", "d.jpg"]


@pytest.fixture
def csv(image_root: Path) -> Path:
    path = image_root / "pairs.csv"
    path.write_text("image_path,caption\n" + "".join(f"{n},caption {i}\n" for i, n in enumerate(NAMES)))
    return path


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_items_equal_uncached_items(csv: Path, processor, cache_dir: Path, mode: str):
    pairs = DatasetLoader.from_csv(csv)
    cache = ImageCache(mode, 32, cache_dir=cache_dir)
    for augment in (False, True):
        tf = ImageTransform(resolution=32, augment=augment, policy=AUG)
        plain = CLIPDataset(pairs, processor, image_transform=tf, seed=4)
        cached = CLIPDataset(pairs, processor, image_transform=tf, seed=4, cache=cache)
        for epoch in range(2):
            plain.set_epoch(epoch)
            cached.set_epoch(epoch)
            for i in range(len(pairs)):
                assert torch.equal(plain[i]["pixel_values"], cached[i]["pixel_values"])
    assert cache.misses == 4 and cache.hits == 2 * 2 * 4 - 4  # 2 transforms x 2 epochs x 4 items, 4 first reads
    for p in pairs:
        assert torch.equal(cache.get(p.image_path), load_resized(p.image_path, 32))


def test_disk_cache_persists_across_instances(csv: Path, image_root: Path, cache_dir: Path):
    first = ImageCache("disk", 32, cache_dir=cache_dir)
    img = first.get(image_root / "sub" / "c.jpg")
    assert img.shape == (3, 32, 64) and img.dtype == torch.uint8
    files = list((cache_dir / "images" / "r32").rglob("*.u8"))
    assert len(files) == 1 and files[0].stat().st_size == 16 + 3 * 32 * 64
    second = ImageCache("disk", 32, cache_dir=cache_dir)
    again = second.get(image_root / "sub" / "c.jpg")
    assert (second.hits, second.misses) == (1, 0) and torch.equal(again, img)
    files[0].write_bytes(b"garbage")  # a damaged cache file is re-decoded, not trusted
    third = ImageCache("disk", 32, cache_dir=cache_dir)
    assert torch.equal(third.get(image_root / "sub" / "c.jpg"), img) and third.misses == 1


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_changed_file_is_decoded_again(image_root: Path, cache_dir: Path, make_img, mode: str):
    path = image_root / "a.jpg"
    cache = ImageCache(mode, 32, cache_dir=cache_dir)
    before = cache.get(path)
    assert torch.equal(cache.get(path), before) and cache.misses == 1
    st = path.stat()
    make_img(path, seed=99)  # new content ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # ... and a new mtime
    after = cache.get(path)
    assert cache.misses == 2
    assert torch.equal(after, load_resized(path, 32)) and not torch.equal(after, before)


def test_validation_fills_the_cache_and_bad_files_stay_reported(csv: Path, image_root: Path):
    cache = ImageCache("memory", 32)
    pairs, problems = read_csv(csv, cache=cache)
    assert len(pairs) == 4 and problems == [] and len(cache) == 4 and cache.misses == 4
    cache2 = ImageCache("memory", 32)
    bad = image_root / "bad.csv"
    bad.write_text("image_path,caption\na.jpg,x\ntrunc.jpg,y\n")
    _, problems = read_csv(bad, cache=cache2, on_error="skip")
    assert [p.where for p in problems] == [f"{bad}:3"] and len(cache2) == 1


def test_auto_mode_picks_memory_or_none_by_estimate(image_root: Path):
    paths = [image_root / n for n in NAMES]
    # a.jpg 48x40, b.png 48x40, c.jpg 64x32, d.jpg 48x40 -> at 32 px: 3*32*38 x3 + 3*32*64
    assert estimate_bytes(paths, 32) == int((3 * 3 * 32 * 38 + 3 * 32 * 64) / 4 * 4)
    assert ImageCache.auto("auto", paths, 32, memory_mb=1).mode == "memory"
    assert ImageCache.auto("auto", paths, 32, memory_mb=0.001).mode == "none"
    with pytest.raises(ValueError, match="one of memory, disk, none, auto"):
        ImageCache("ram", 32)


def test_memory_cap_stops_storing_but_keeps_serving(image_root: Path):
    cache = ImageCache("memory", 32, memory_mb=(3 * 32 * 38 + 10) / 2**20)
    a = cache.get(image_root / "a.jpg")
    b = cache.get(image_root / "b.png")
    assert len(cache) == 1 and cache.nbytes == a.numel()
    assert torch.equal(cache.get(image_root / "b.png"), b) and cache.misses == 3


def test_pickled_cache_is_one_packed_buffer_with_equal_images(image_root: Path):
    cache = ImageCache("memory", 32)
    imgs = {n: cache.get(image_root / n) for n in NAMES}
    clone = pickle.loads(pickle.dumps(cache))
    flat, index = clone._packed
    assert flat.numel() == sum(t.numel() for t in imgs.values()) and len(index) == 4
    assert len(clone) == 4 and (clone.hits, clone.misses) == (0, 4)
    for n in NAMES:
        assert torch.equal(clone.get(image_root / n), imgs[n])
    assert (clone.hits, clone.misses) == (4, 4)  # all hits: nothing decoded again


def test_dataset_rejects_a_cache_of_another_resolution(csv: Path, processor):
    with pytest.raises(ValueError, match="holds 64px images but this dataset loads 32px"):
        CLIPDataset(DatasetLoader.from_csv(csv), processor, cache=ImageCache("memory", 64))
    ds = CLIPDataset(DatasetLoader.from_csv(csv), processor, cache="auto")
    assert ds.cache is not None and ds.cache.mode == "memory"


def test_interpolation_has_its_own_disk_folder_and_must_match_the_dataset(csv: Path, image_root: Path, processor, cache_dir: Path):
    """Nearest and bicubic resizes of one file are different images: a disk cache keeps them apart
    (``r32-nearest/`` beside ``r32/``), and a dataset refuses a cache filled with the other one."""
    path = image_root / "a.jpg"  # 48 x 40: resized to 32 x 38
    bicubic, nearest = ImageCache("disk", 32, cache_dir=cache_dir), ImageCache("disk", 32, cache_dir=cache_dir, interpolation="nearest")
    a, b = bicubic.get(path), nearest.get(path)
    assert torch.equal(a, load_resized(path, 32)) and torch.equal(b, load_resized(path, 32, "nearest")) and not torch.equal(a, b)
    assert [len(list((cache_dir / "images" / sub).rglob("*.u8"))) for sub in ("r32", "r32-nearest")] == [1, 1]
    assert "interpolation='nearest'" in repr(nearest)
    pairs = DatasetLoader.from_csv(csv)
    tf = ImageTransform(resolution=32, interpolation="nearest")
    ds = CLIPDataset(pairs, processor, image_transform=tf, cache=ImageCache("memory", 32, interpolation="nearest"))
    assert ds.interpolation == "nearest" and torch.equal(ds[0]["pixel_values"], tf(load_resized(path, 32, "nearest")))
    with pytest.raises(ValueError, match="the image cache holds images resized with 'bicubic' interpolation but this dataset resizes with 'nearest'"):
        CLIPDataset(pairs, processor, image_transform=tf, cache=ImageCache("memory", 32))
