"""Images of every mode PIL opens become 8-bit RGB by their real range: each file here holds an 8-bit
reference (a gradient over 0..255, or colours) in its own mode, and must decode to that reference, through
the decoder, the image cache (memory and disk), a dataset item and the served model's image loader alike.

The issue's case: a 16-bit grayscale TIFF of mean 121 decoded as 255 (saturated), where the same data as
a 16-bit PNG decoded right."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipexp.data.cache import ImageCache
from clipexp.data.dataset import CLIPDataset
from clipexp.data.images import decode_image_bytes, decode_image_file
from clipexp.data.loaders import DatasetLoader
from clipexp.data.transforms import ImageTransform, to_uint8_tensor

RES = 32  # as the processor fixture of tests/data/conftest.py
H, W = 12, 16
GRAY = (np.arange(H * W).reshape(H, W) * 255 // (H * W - 1)).astype(np.uint8)  # 0 .. 255, every step
RGB = np.stack([GRAY, GRAY[::-1], np.full((H, W), 121, np.uint8)], axis=-1)  # three different channels
BILEVEL = ((np.indices((H, W)).sum(0) % 2) * 255).astype(np.uint8)  # a checkerboard of 0 and 255
PALETTE = np.array([[10, 20, 250], [200, 100, 50], [0, 0, 0], [255, 255, 255]], np.uint8)
INDEX = (np.indices((H, W)).sum(0) % 4).astype(np.uint8)


def _gray(values: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(values) if mode != "I;16B" else Image.frombytes("I;16B", (W, H), values.astype(">u2").tobytes())


def _palette(transparent: bool) -> Image.Image:
    im = Image.fromarray(INDEX, "P")
    im.putpalette(PALETTE.flatten().tolist())
    if transparent:
        im.info["transparency"] = 2
    return im


# name -> (file, the image to save, the 8-bit reference it must decode to: [H, W] gray or [H, W, 3] RGB)
CASES = {
    "I;16 tif (16-bit gray)": ("g16.tif", lambda: _gray(GRAY.astype(np.uint16) * 257, "I;16"), GRAY),
    "I;16B tif (16-bit gray, big-endian)": ("g16b.tif", lambda: _gray(GRAY.astype(np.uint16) * 257, "I;16B"), GRAY),
    "I;16 png (16-bit gray)": ("g16.png", lambda: _gray(GRAY.astype(np.uint16) * 257, "I;16"), GRAY),
    "I tif, 16-bit values": ("i32_16.tif", lambda: Image.fromarray(GRAY.astype(np.int32) * 257), GRAY),
    "I tif, 8-bit values": ("i32_8.tif", lambda: Image.fromarray(GRAY.astype(np.int32)), GRAY),
    "I tif, 32-bit values": ("i32_32.tif", lambda: Image.fromarray(GRAY.astype(np.int32) << 23), GRAY),
    "F tif, 0..1": ("f01.tif", lambda: Image.fromarray(GRAY.astype(np.float32) / 255), GRAY),
    "F tif, 0..255": ("f255.tif", lambda: Image.fromarray(GRAY.astype(np.float32)), GRAY),
    "F tif, 0..65535": ("f16.tif", lambda: Image.fromarray(GRAY.astype(np.float32) * 257), GRAY),
    "L png": ("l.png", lambda: Image.fromarray(GRAY), GRAY),
    "LA png (alpha dropped)": ("la.png", lambda: Image.fromarray(np.stack([GRAY, GRAY[::-1]], -1), "LA"), GRAY),
    "RGBA png (alpha dropped)": ("rgba.png", lambda: Image.fromarray(np.dstack([RGB, GRAY]), "RGBA"), RGB),
    "RGBA tif (alpha dropped)": ("rgba.tif", lambda: Image.fromarray(np.dstack([RGB, GRAY]), "RGBA"), RGB),
    "P png": ("p.png", lambda: _palette(False), PALETTE[INDEX]),
    "P png with transparency": ("pt.png", lambda: _palette(True), PALETTE[INDEX]),
    "P gif with transparency": ("pt.gif", lambda: _palette(True), PALETTE[INDEX]),
    "P bmp": ("p.bmp", lambda: _palette(False), PALETTE[INDEX]),
    "1 png": ("bilevel.png", lambda: Image.fromarray(BILEVEL).convert("1"), BILEVEL),
    "1 tif": ("bilevel.tif", lambda: Image.fromarray(BILEVEL).convert("1"), BILEVEL),
    "CMYK tif": ("cmyk.tif", lambda: Image.fromarray(np.dstack([255 - RGB, np.zeros((H, W), np.uint8)]), "CMYK"), RGB),
}


def _as_rgb(ref: np.ndarray) -> torch.Tensor:
    arr = np.repeat(ref[..., None], 3, -1) if ref.ndim == 2 else ref
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _write(tmp_path: Path, case: str) -> Path:
    name, make, _ = CASES[case]
    path = tmp_path / name
    make().save(path, **({"transparency": 2} if name == "pt.gif" else {}))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_decodes_to_its_8_bit_reference(tmp_path, case):
    path = _write(tmp_path, case)
    with Image.open(path) as im:  # the file really is in the mode the case names
        assert im.mode == case.split()[0] or (case.startswith("I;16B") and im.mode in ("I;16B", "I;16"))
    img = decode_image_file(path)
    assert img.dtype == torch.uint8 and img.shape == (3, H, W)
    assert torch.equal(img, _as_rgb(CASES[case][2])), (img[0, :2], _as_rgb(CASES[case][2])[0, :2])
    assert torch.equal(decode_image_bytes(path.read_bytes(), path.name), img)  # the served model's decoder


def test_the_same_16_bit_data_decodes_alike_from_png_tiff_and_a_32_bit_tiff(tmp_path):
    """PNG goes through torchvision's decoder, TIFF through PIL: every 16-bit value maps to its high byte in both."""
    data = np.random.RandomState(1).randint(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(data).save(tmp_path / "d.png")
    Image.fromarray(data).save(tmp_path / "d.tif")
    Image.fromarray(data.astype(np.int32)).save(tmp_path / "d32.tif")
    want = _as_rgb((data >> 8).astype(np.uint8))
    for name in ("d.png", "d.tif", "d32.tif"):
        assert torch.equal(decode_image_file(tmp_path / name), want), name


def test_a_16_bit_tiff_of_mean_121_stays_121_through_cache_dataset_and_server(tmp_path, processor):
    """The issue's file: a 16-bit grayscale TIFF (value v * 257) and its 8-bit copy (v) give the same tensors
    everywhere an image goes: decoded, cached (memory and disk), as a dataset item, and in the served model."""
    from clipexp.serving.inference import CLIPInference, InferenceSpec

    rng = np.random.RandomState(0)
    eight = np.clip(rng.normal(121, 30, (40, 48)), 0, 255).astype(np.uint8)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "scan16.tif")
    Image.fromarray(eight).save(tmp_path / "scan8.png")
    sixteen = decode_image_file(tmp_path / "scan16.tif")
    assert abs(float(sixteen.double().mean()) - float(eight.mean())) < 1e-9  # ~121, never 255
    assert torch.equal(sixteen, decode_image_file(tmp_path / "scan8.png"))
    csv = tmp_path / "pairs.csv"
    csv.write_text("image_path,caption\nscan16.tif,a scan\nscan8.png,a scan\n")
    transform = ImageTransform(resolution=RES, output="uint8")
    for mode in ("memory", "disk", "none"):
        cache = ImageCache(mode, RES, cache_dir=tmp_path / "cache")
        pairs = DatasetLoader.from_csv(csv, cache=cache)
        ds = CLIPDataset(pairs, processor, image_transform=transform, cache=cache)
        assert torch.equal(ds[0]["pixel_values"], ds[1]["pixel_values"]), mode
    model = torch.nn.Module()  # the served loader needs no weights: load_image stops before the model
    spec = InferenceSpec(image_resolution=RES, image_interpolation="bicubic")
    served = CLIPInference(model, None, spec, device="cpu")
    assert torch.equal(served.load_image(str(tmp_path / "scan16.tif")), ds[1]["pixel_values"])
    assert torch.equal(served.load_image((tmp_path / "scan16.tif").read_bytes()), ds[1]["pixel_values"])


def test_a_pil_image_given_to_the_transform_is_converted_the_same_way():
    """``ImageTransform`` also takes PIL images (library use): a 16-bit one is scaled, not clipped."""
    im = Image.fromarray(GRAY.astype(np.uint16) * 257)
    assert torch.equal(to_uint8_tensor(im), _as_rgb(GRAY))


def test_images_without_a_declared_range_say_once_how_they_were_read(tmp_path, caplog):
    """A 32-bit integer or float image has no range in its header: the one chosen is logged once per mode."""
    import clipexp.data.images as images

    images._RANGE_LOGGED.clear()
    for case in ("I tif, 16-bit values", "I tif, 8-bit values", "F tif, 0..1"):
        _write(tmp_path, case)
    with caplog.at_level(logging.WARNING, logger="clipexp.data.images"):
        decode_image_file(tmp_path / "i32_16.tif")
        decode_image_file(tmp_path / "i32_8.tif")
        decode_image_file(tmp_path / "f01.tif")
    assert [r.getMessage() for r in caplog.records] == [
        f"image '{tmp_path / 'i32_16.tif'}' is 32-bit integer (mode I), whose files carry no value range: it is read as "
        "0-65535 (its largest value, 65535, fits it); every such image is read by the smallest of 0-255, 0-65535 and "
        "0-2147483647 that holds its values (save 8- or 16-bit data as 8- or 16-bit files to fix the range)",
        f"image '{tmp_path / 'f01.tif'}' is 32-bit float (mode F), whose files carry no value range: it is read as "
        "0-1 (its largest value, 1, fits it); every such image is read by the smallest of 0-1, 0-255 and 0-65535 "
        "that holds its values, else by its own largest value (save 8- or 16-bit data as 8- or 16-bit files to fix the range)",
    ]


def test_a_mode_pil_cannot_convert_is_a_row_error_naming_it():
    from clipexp.data.images import ImageDecodeError, pil_to_rgb

    with pytest.raises(ImageDecodeError) as exc:
        pil_to_rgb(Image.new("La", (4, 4)), "odd.tif")
    message = str(exc.value)  # PIL's reason in the brackets
    assert message.startswith("image 'odd.tif' has image mode La, which cannot be converted to RGB (") and \
        message.endswith("); save it as RGB") and len(message.splitlines()) == 1
