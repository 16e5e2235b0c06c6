"""data=webdataset on shards the tests write (to_shards from a CSV of generated images): the manifest,
the stream's split over loader workers, resume positions, and each bad-shard case with its exact count.

80 pairs -> 8 train shards of 10 (``--split 1,0,0``), sample ids 0..79; labels a/b; captions repeat
every 20 pairs (caption groups)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shards_helpers import N, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")

RES, MAX_LEN = 32, 16  # the data tests' tiny processor (tests/data/conftest.py)
SHARD = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from clipexp.data.to_shards import main

    root = tmp_path_factory.mktemp("src")
    out = root / "shards"
    assert main([str(write_csv(root)), str(out), "--split", "1,0,0", "--shard-size", str(SHARD)]) == 0
    return out


def _copy(shards: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in shards.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _urls(d: Path) -> str:
    return str(d / "train-{000000..000007}.tar")


def _stream(processor, urls: str, **cfg):
    from clipexp.data.webdataset import build_webdataset_splits

    data = {"source": "webdataset", "urls": urls, "shuffle": False, "shuffle_buffer": 0, "augment_images": False,
            "max_bad_fraction": 0.5, **cfg}
    return build_webdataset_splits(data, processor=processor, image_resolution=RES, max_sequence_length=MAX_LEN, prompt_templates=None,
                                   augmentation=None, seed=0, pixels="uint8", image_interpolation="bicubic").train


def _loader(stream, workers: int, batch: int, start_batches: int = 0):
    from clipexp.data import collate_fn
    from clipexp.data.webdataset import StreamLoader

    position = SimpleNamespace(rank=0, world_size=1, batch_size=batch, global_batch=batch, start=start_batches * batch)
    return StreamLoader(stream, position, workers, collate_fn=collate_fn)


def _epoch_ids(loader, epoch: int = 0):
    loader.dataset.set_epoch(epoch)
    return [b["indices"].tolist() for b in loader]


def test_to_shards_writes_the_source_as_shards_and_a_manifest(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["count"] == N and [s["count"] for s in train["shards"]] == [SHARD] * 8
    assert [s["first_index"] for s in train["shards"]] == list(range(0, N, SHARD))
    assert train["urls"].endswith("train-{000000..000007}.tar") and manifest["class_names"] == ["a", "b"]
    with tarfile.open(shards / "train-000001.tar") as tar:
        names = tar.getnames()[:3]
        assert names == ["000000010.jpg", "000000010.txt", "000000010.json"]
        jpg = tar.extractfile(names[0]).read()
        meta = json.loads(tar.extractfile(names[2]).read())
    assert jpg == (shards.parent / "img" / "010.jpg").read_bytes()  # the file's bytes, not re-encoded
    assert meta["caption"] == "pattern number 10" and meta["label"] == "a" and meta["index"] == 10


def test_items_match_the_csv_dataset(shards, processor):
    """Same pairs, same seed: the stream's items are the CSV dataset's tensors (augmentation included)."""
    from clipexp.data import build_datasets

    data = {"source": "csv", "path": str(shards.parent / "pairs.csv"), "train_split": 1.0, "val_split": 0.0, "test_split": 0.0,
            "cache_images": "none"}
    kw = dict(processor=processor, image_resolution=RES, max_sequence_length=MAX_LEN, seed=0, pixels="uint8",
              augmentation={"crop_scale_min": 0.5, "hflip": True, "rotation_degrees": 10.0, "color_jitter": 0.2})
    ref = build_datasets(data, **kw).train
    from clipexp.data.webdataset import build_webdataset_splits

    stream = build_webdataset_splits({"source": "webdataset", "urls": _urls(shards), "shuffle": False}, prompt_templates=None,
                                     image_interpolation="bicubic", **kw).train
    ref.set_epoch(1)
    stream.set_epoch(1)
    items = list(iter(stream))
    assert len(items) == N and [int(it["indices"]) for it in items] == list(range(N))
    for it in items[:12]:
        want = ref[int(it["indices"])]
        assert torch.equal(it["pixel_values"], want["pixel_values"]) and torch.equal(it["input_ids"], want["input_ids"])
        assert int(it["labels"]) == int(want["labels"])
    groups = [int(it["group_ids"]) for it in items]  # caption groups: equal captions, equal ids, as the CSV's
    assert [a == b for a in groups[:20] for b in groups[:40]] == [int(a) == int(b) for a in ref.group_ids[:20] for b in ref.group_ids[:40]]


def test_two_workers_see_every_sample_once_per_epoch(shards, processor):
    stream = _stream(processor, _urls(shards), shuffle=True, shuffle_buffer=16)
    loader = _loader(stream, workers=2, batch=5)
    assert loader.steps_per_epoch == 16  # 2 workers x 4 shards x 10 samples / 5
    seen = [_epoch_ids(loader, e) for e in (0, 1)]
    for epoch in seen:
        flat = [i for b in epoch for i in b]
        assert sorted(flat) == list(range(N))
    assert seen[0] != seen[1]  # shards dealt and the buffer drawn afresh each epoch


@pytest.mark.parametrize("start", [3, 8])
def test_a_resumed_epoch_continues_with_the_next_batch(shards, processor, start):
    """trainer.resume: the epoch restarted after ``start`` batches gives the uninterrupted epoch's remaining batches."""
    stream = _stream(processor, _urls(shards), shuffle=True, shuffle_buffer=16, augment_images=True)
    full = _epoch_ids(_loader(stream, workers=2, batch=5), epoch=2)
    resumed = _epoch_ids(_loader(stream, workers=2, batch=5, start_batches=start), epoch=2)
    assert resumed == full[start:]


def test_uneven_shards_give_every_stream_the_same_number_of_batches(tmp_path, shards, processor):
    from clipexp.data.to_shards import main

    out = tmp_path / "uneven"
    assert main([str(shards.parent / "pairs.csv"), str(out), "--split", "1,0,0", "--shard-size", "30"]) == 0  # 30, 30, 20
    loader = _loader(_stream(processor, str(out / "train-{000000..000002}.tar"), shuffle=True), workers=2, batch=5)
    assert loader.steps_per_epoch == 8  # the smaller stream holds 20 (or 30): 4 batches per worker
    for e in range(3):
        flat = [i for b in _epoch_ids(loader, e) for i in b]
        assert len(flat) == 40 and len(set(flat)) == 40


def _rewrite(path: Path, change) -> None:
    """Rewrite a shard, ``change(name, data)`` -> new data, or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        import io

        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _truncate_inside(path: Path, member: str) -> None:
    with tarfile.open(path) as tar:
        m = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: m.offset_data + 20])  # cut inside that member's data


CASES = {
    # shard 3 holds ids 30..39
    "truncated_tar": (lambda d: _truncate_inside(d / "train-000003.tar", "000000034.jpg"), 6),  # 30..33 read, 34..39 lost
    "missing_image": (lambda d: _rewrite(d / "train-000003.tar", lambda n, b: None if n == "000000035.jpg" else b), 1),
    "missing_caption": (lambda d: _rewrite(d / "train-000003.tar", lambda n, b: None if n == "000000035.txt" else b), 1),
    "undecodable_image": (lambda d: _rewrite(d / "train-000003.tar", lambda n, b: b"\xff\xd8 not a jpeg" if n == "000000035.jpg" else b), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_samples_are_named_skipped_and_counted(tmp_path, shards, processor, caplog, case):
    damage, bad = CASES[case]
    d = _copy(shards, tmp_path / "s")
    damage(d)
    stream = _stream(processor, _urls(d))
    with caplog.at_level("WARNING"):
        ids = [int(it["indices"]) for it in iter(stream)]
    assert stream.bad_counts() == (bad, N + bad)  # (read: the epoch, then the top-up re-reads)
    lost = set(range(34, 40)) if case == "truncated_tar" else {35}
    assert len(ids) == N  # the epoch's quota: topped up from the start of the shards (warned)
    assert ids[: N - bad] == [i for i in range(N) if i not in lost] and ids[N - bad:] == list(range(bad))
    assert "train-000003.tar" in caplog.text and "repeating samples" in caplog.text


def test_too_many_bad_samples_stop_with_one_line(tmp_path, shards, processor):
    from clipexp.data import DataValidationError

    d = _copy(shards, tmp_path / "s")
    CASES["truncated_tar"][0](d)
    loader = _loader(_stream(processor, _urls(d), max_bad_fraction=0.05), workers=1, batch=5)
    with pytest.raises(DataValidationError) as err:
        _epoch_ids(loader)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("6 bad samples of 40 read (15.0%) exceed data.max_bad_fraction=0.05")
    assert "train-000003.tar: 6 of the manifest's 10 samples missing" in msg


def test_img2dataset_stats_give_the_counts(tmp_path, shards, processor):
    from clipexp.data.shards import shard_set

    d = _copy(shards, tmp_path / "s")
    (d / "manifest.json").unlink()
    for k in range(8):
        (d / f"train-{k:06d}.tar").rename(d / f"{k:05d}.tar")
        (d / f"{k:05d}_stats.json").write_text(json.dumps({"successes": SHARD, "count": SHARD + 2}))
    s = shard_set(str(d / "{00000..00007}.tar"))
    assert s.counts == [SHARD] * 8 and s.first_index == list(range(0, N, SHARD)) and s.manifest is None
    (d / "00003_stats.json").unlink()
    from clipexp.data import DataValidationError

    with pytest.raises(DataValidationError, match="no sample count for 1 shard"):
        shard_set(str(d / "{00000..00007}.tar"))


def test_pipe_urls_with_a_manifest_read_the_same_samples(shards, processor):
    """``pipe:`` URLs (webdataset's gopen runs the command): the manifest named in data.manifest gives the counts."""
    local = [int(it["indices"]) for it in iter(_stream(processor, _urls(shards)))]
    piped = _stream(processor, "::".join(f"pipe:cat {shards / f'train-{k:06d}.tar'}" for k in range(8)),
                    manifest=str(shards / "manifest.json"))
    assert len(piped) == N and [int(it["indices"]) for it in iter(piped)] == local == list(range(N))
