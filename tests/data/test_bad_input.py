"""Bad input, each named in one line: odd image modes, EXIF rotation, decompression bombs, symlinks out of
the dataset root, captions over the model's context, CSVs that are not UTF-8 / headerless / empty, and
data too small for its splits. Every case is a real file written here."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipexp.data.cache import ImageCache
from clipexp.data.dataset import CLIPDataset, build_datasets
from clipexp.data.images import decode_image_file
from clipexp.data.loaders import DatasetLoader
from clipexp.data.problems import DataValidationError
from clipexp.data.transforms import ImageTransform

RES, MAX_LEN = 32, 16  # as the processor fixture of tests/data/conftest.py


def _csv(path: Path, rows, header="image_path,caption,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ------------------------------------------------------------------------------------ image modes


def _write_mode(path: Path, mode: str) -> Path:
    """A 16 x 12 image in ``mode`` whose every pixel decodes to ``EXPECTED_RGB[mode]``."""
    size = (16, 12)
    if mode == "P":
        im = Image.new("P", size)
        im.putpalette([0, 0, 0, 10, 20, 250] + [0] * (256 * 3 - 6))
        im.paste(1, (0, 0, *size))
    elif mode == "I;16":  # 16-bit grayscale: 0x8000 -> 128 in 8 bits
        im = Image.fromarray(np.full(size[::-1], 0x8000, dtype=np.uint16))
    elif mode == "RGB16":  # 16-bit RGB: PIL cannot write it, OpenCV can (BGR order)
        import cv2

        cv2.imwrite(str(path), np.full((*size[::-1], 3), (0x1000, 0x4000, 0xFF00), dtype=np.uint16)[..., ::-1].copy())
        return path
    elif mode == "GIF":  # two frames: the first (red) is the image
        frames = [Image.new("RGB", size, (255, 0, 0)), Image.new("RGB", size, (0, 0, 255))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return path
    else:
        im = Image.new(mode, size, {"L": 100, "LA": (100, 7), "RGBA": (10, 200, 30, 128), "CMYK": (0, 255, 255, 0)}[mode])
    im.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


EXPECTED_RGB = {"L": (100, 100, 100), "LA": (100, 100, 100), "P": (10, 20, 250), "RGBA": (10, 200, 30),
                "I;16": (128, 128, 128), "RGB16": (0x10, 0x40, 0xFF), "CMYK": (255, 0, 0), "GIF": (255, 0, 0)}
FILES = {"L": "gray.png", "LA": "gray_alpha.png", "P": "palette.png", "RGBA": "rgba.png", "I;16": "gray16.png",
         "RGB16": "rgb16.png", "CMYK": "cmyk.jpg", "GIF": "animated.gif"}


@pytest.mark.parametrize("mode", sorted(FILES))
def test_every_image_mode_loads_as_8_bit_rgb(tmp_path, mode, processor):
    path = _write_mode(tmp_path / FILES[mode], mode)
    img = decode_image_file(path)
    assert img.shape == (3, 12, 16) and img.dtype == torch.uint8
    want = torch.tensor(EXPECTED_RGB[mode], dtype=torch.uint8).view(3, 1, 1).expand_as(img)
    # exact for lossless files; the CMYK JPEG is lossy (a solid colour: within 2 levels)
    assert (img.int() - want.int()).abs().max() <= (2 if mode == "CMYK" else 0)
    # ... and through validation (which fills the cache) and a dataset item: the same solid colour at 32 px
    csv = _csv(tmp_path / "pairs.csv", [f"{path.name},a solid colour,x"])
    cache = ImageCache("memory", RES)
    pairs = DatasetLoader.from_csv(csv, cache=cache)
    item = CLIPDataset(pairs, processor, image_transform=ImageTransform(resolution=RES, output="uint8"), cache=cache)[0]
    pixels = item["pixel_values"]
    assert pixels.shape == (3, RES, RES) and cache.misses == 1
    assert (pixels.int() - want[:, :1, :1].int()).abs().max() <= (2 if mode == "CMYK" else 1)  # resampling rounds


# ----------------------------------------------------------------------------------- EXIF rotation


def _rotated_jpeg(path: Path) -> Path:
    """Stored 32 wide x 16 tall, left half red, right half blue, EXIF orientation 6 ("rotate 90 degrees
    clockwise to display"): upright it is 16 wide x 32 tall, red on top."""
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())
    return path


def _red_on_top(img: torch.Tensor) -> bool:
    h = img.shape[1]
    top, bottom = img[:, : h // 4].float().mean((1, 2)), img[:, -(h // 4):].float().mean((1, 2))
    return bool(top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50)


def test_exif_rotated_jpeg_is_upright_when_decoded_cached_and_loaded(tmp_path, processor):
    path = _rotated_jpeg(tmp_path / "rotated.jpg")
    with Image.open(path) as raw:
        assert raw.size == (32, 16)  # as stored
    img = decode_image_file(path)
    assert img.shape == (3, 32, 16) and _red_on_top(img)
    csv = _csv(tmp_path / "pairs.csv", ["rotated.jpg,a red and blue card,x"])
    for mode in ("memory", "disk", "none"):
        cache = ImageCache(mode, RES, cache_dir=tmp_path / "cache")
        pairs = DatasetLoader.from_csv(csv, cache=cache)  # validation fills the cache
        if mode != "none":
            cached = cache.get(pairs[0].image_path)
            assert cached.shape == (3, 2 * RES, RES) and _red_on_top(cached)
        item = CLIPDataset(pairs, processor, resolution=RES, cache=cache)[0]["pixel_values"]
        assert item.shape == (3, RES, RES)
        # the eval centre crop of the upright image: its middle, red above blue
        assert item[0, 0].mean() > item[0, -1].mean() and item[2, -1].mean() > item[2, 0].mean()


# ------------------------------------------------------------------------------- decompression bomb


@pytest.mark.parametrize("limit", [1000, 500])  # 1,920 pixels: over the limit (PIL warns), over twice it (PIL refuses)
def test_image_over_the_decompression_bomb_limit_is_a_named_row_error(tmp_path, make_img, monkeypatch, limit):
    make_img(tmp_path / "small.jpg", 1, size=(20, 10))  # 200 pixels: fine
    make_img(tmp_path / "big.jpg", 2)  # 48 x 40 = 1,920 pixels (torchvision decodes JPEGs)
    make_img(tmp_path / "big.bmp", 3, fmt="BMP")  # ... and PIL decodes BMPs
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    csv = _csv(tmp_path / "pairs.csv", ["small.jpg,ok,a", "big.jpg,huge,a", "big.bmp,huge too,a"])
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv)
    reason = (f"is too large to decode (1,920 pixels, over PIL's decompression-bomb limit of {limit:,}; "
              "set PIL.Image.MAX_IMAGE_PIXELS higher if you trust this file)")
    assert str(exc.value).splitlines()[1:] == [f"  {csv}:3: image 'big.jpg' {reason}", f"  {csv}:4: image 'big.bmp' {reason}"]
    assert [p.image_path.name for p in DatasetLoader.from_csv(csv, on_error="skip")] == ["small.jpg"]


# ------------------------------------------------------------------------------------------ symlinks


def test_a_symlink_leading_outside_the_root_is_rejected_like_dotdot_when_asked(tmp_path, make_img):
    root = tmp_path / "data"
    make_img(root / "images" / "a.jpg", 1)
    secret = make_img(tmp_path / "elsewhere" / "secret.jpg", 2)
    (root / "images" / "leak.jpg").symlink_to(secret)  # a file link out of the root
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a folder link out of it
    (root / "images" / "alias.jpg").symlink_to(root / "images" / "a.jpg")  # a link that stays inside: fine
    csv = _csv(root / "pairs.csv", ["images/a.jpg,a,x", "images/leak.jpg,b,x", "linked/secret.jpg,c,x",
                                    "images/alias.jpg,d,x", "../elsewhere/secret.jpg,e,x"])
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv, allow_outside_root=False)
    outside, real = f"outside the dataset root {root}; set data.allow_outside_root=true to read images outside it", secret.resolve()
    assert str(exc.value).splitlines()[1:] == [
        f"  {csv}:3: image 'images/leak.jpg' is a symlink to {real}, {outside}",
        f"  {csv}:4: image 'linked/secret.jpg' is a symlink to {real}, {outside}",
        f"  {csv}:6: image '../elsewhere/secret.jpg' is {outside}",
    ]
    assert len(DatasetLoader.from_csv(csv)) == 5  # the default reads them


# ----------------------------------------------------------------------------------- long captions


def test_captions_over_the_context_are_cut_with_one_warning_giving_the_count(tmp_path, make_img, processor, caplog):
    rows = []
    for i in range(8):
        make_img(tmp_path / f"{i}.jpg", i)
        # byte-level tokens, no spaces: 3 captions of 30 letters (+ BOS/EOS = 32 > MAX_LEN=16), 5 short ones
        rows.append(f"{i}.jpg,{('abcdefghij' * 3) if i < 3 else f'short caption {i}'},{'ab'[i % 2]}")
    csv = _csv(tmp_path / "pairs.csv", rows)
    cfg = {"source": "csv", "path": str(csv), "train_split": 0.5, "val_split": 0.25, "test_split": 0.25, "cache_images": "none"}
    with caplog.at_level(logging.WARNING, logger="clipexp"):
        splits = build_datasets(cfg, processor=processor, image_resolution=RES, max_sequence_length=MAX_LEN)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"1 of 6 distinct captions are longer than the model's context of {MAX_LEN} tokens and are cut "
                        "to it (e.g. 'abcdefghijabcdefghijabcdefghij'); shorten them, or raise model.max_sequence_length if "
                        "the model allows"]
    # cut, not an error: the long caption's tokens fill the whole context
    ds = next(d for d in (splits.train, splits.val, splits.test) if "abcdefghij" * 3 in d.texts)
    tokens = ds.caption_tokens()
    row = [i for i, p in enumerate(ds.pairs) if p.captions[0] == "abcdefghij" * 3][0]
    assert tokens["input_ids"].shape[1] == MAX_LEN and int(tokens["attention_mask"][row].sum()) == MAX_LEN


# --------------------------------------------------------------------------------------------- CSVs


def test_csv_that_is_not_utf8_is_one_line(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("image_path,caption\na.jpg,un caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv)
    assert str(exc.value).splitlines() == [
        f"1 problem in {csv}",
        f"  {csv}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 latin1.csv > utf8-latin1.csv)",
    ]


def test_csv_without_a_header_is_one_line(tmp_path, make_img):
    make_img(tmp_path / "a.jpg", 1)
    csv = tmp_path / "no_header.csv"
    csv.write_text("a.jpg,a cat,cat\nb.jpg,a dog,dog\n")
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv)
    assert str(exc.value).splitlines()[1:] == [
        f"  {csv}:1: no header row (line 1 is data: 'a.jpg,a cat,cat'); add a first line naming the columns, "
        "e.g. image_path,caption,label"]


def test_csv_with_zero_rows_is_one_line(tmp_path):
    csv = _csv(tmp_path / "header_only.csv", ["", "  "])
    with pytest.raises(DataValidationError) as exc:
        DatasetLoader.from_csv(csv)
    assert str(exc.value).splitlines()[1:] == [f"  {csv}:1: no rows after the header; add one line per image (image_path,caption)"]


# ------------------------------------------------------------------------------------------- splits


def test_a_split_left_empty_by_tiny_data_says_how_many_images_the_ratios_need(tmp_path, make_img, processor):
    for i in range(4):
        make_img(tmp_path / f"{i}.jpg", i)
    csv = _csv(tmp_path / "pairs.csv", [f"{i}.jpg,caption {i}," for i in range(4)])
    cfg = {"source": "csv", "path": str(csv), "cache_images": "none"}  # 0.8 / 0.1 / 0.1: 4 images give 3 / 1 / 0
    with pytest.raises(DataValidationError) as exc:
        build_datasets(cfg, processor=processor, image_resolution=RES, max_sequence_length=MAX_LEN)
    assert str(exc.value) == (
        "4 images are too few for train/val/test = 0.8/0.1/0.1: the test split got none; every split needs at least "
        "1 image, so these ratios need at least 7 images (add images, or set data.test_split=0 with the other ratios "
        "summing to 1)")
    # 7 images are enough (5 / 1 / 1); a split whose ratio is 0 may stay empty
    for i in range(4, 7):
        make_img(tmp_path / f"{i}.jpg", i)
    _csv(csv, [f"{i}.jpg,caption {i}," for i in range(7)])
    splits = build_datasets(cfg, processor=processor, image_resolution=RES, max_sequence_length=MAX_LEN)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 1, 1)
    none = build_datasets({**cfg, "train_split": 0.9, "val_split": 0.1, "test_split": 0.0}, processor=processor,
                          image_resolution=RES, max_sequence_length=MAX_LEN)
    assert none.test is None and len(none.val) == 1
