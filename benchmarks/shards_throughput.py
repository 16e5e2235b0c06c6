"""Training-loader samples/s: WebDataset shards against the same images from the CSV source, side by side.

    python benchmarks/shards_throughput.py                          # textile 2,000 JPEGs, 224 px, batch 64, 1 worker
    python benchmarks/shards_throughput.py --workers 0 --repeats 5
    python benchmarks/shards_throughput.py --workers 2 --shard-size 100

One invocation writes the textile set as a CSV of its image paths and, from that CSV, shards
(``python -m clipexp.data.to_shards``, 0.8/0.1/0.1 split, seed 42: the same 1,600 training images
either way), then times the trainer's own training loader (``build_train_loader``: the domain's
augmentation, uint8 batches of ``--batch-size``) over ``--epochs`` epochs for

| (csv)       | ``data=csv``, ``data.cache_images=none``: every image read and decoded from its file each epoch |
| (csv-cache) | ``data=csv`` with the default cache (``auto``: the resized images kept in memory after the first read) |
| (shards)    | ``data=webdataset``, shuffle buffer 1000: every image read from the tars and decoded each epoch |

interleaved ``--repeats`` times; the first epoch of each loader is not timed (workers starting, the
cache filling). It prints the median samples/s and the range, and the ratio shards/csv. Only the data
side is timed (no model step), so it is the upper bound the loader puts on training speed.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _train_data():
    from clipexp.training import data as train_data

    return train_data


def write_sources(work: Path, shard_size: int):
    from clipexp.data.textile import TEXTILE_CAPTIONS, read_textile

    pairs, _ = read_textile(None, None, check_images=False)
    path = work / "textile.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption", "label"])
        w.writerows([str(p.image_path), TEXTILE_CAPTIONS[p.label], p.label] for p in pairs)
    subprocess.run([sys.executable, "-m", "clipexp.data.to_shards", str(path), str(work / "shards"), "--shard-size", str(shard_size),
                    "--allow-outside-root"], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)
    n = len(list((work / "shards").glob("train-*.tar")))
    return path, str(work / "shards" / (f"train-{{000000..{n - 1:06d}}}.tar" if n > 1 else "train-000000.tar"))


def build_loader(kind: str, csv_path: Path, urls: str, args):
    from clipexp.data import build_datasets
    from clipexp.data.webdataset import build_webdataset_splits
    from clipexp.data.transforms import DEFAULT_TEMPLATES
    from clipexp.models.clip import build_processor

    td = _train_data()
    processor = build_processor(args.resolution, 77)
    if kind == "shards":
        data = {"source": "webdataset", "urls": urls, "shuffle_buffer": 1000}
    else:
        data = {"source": "csv", "path": str(csv_path), "cache_images": "none" if kind == "csv" else "auto", "check_images": kind != "csv",
                "allow_outside_root": True}
    aug = {"crop_scale_min": 0.8, "hflip": True, "vflip": True, "rotation_degrees": 10.0, "color_jitter": 0.1}  # domain=industrial
    build = build_webdataset_splits if kind == "shards" else build_datasets
    train = build(data, processor=processor, image_resolution=args.resolution, max_sequence_length=77, prompt_templates=DEFAULT_TEMPLATES,
                  augmentation=aug, seed=42, pixels="uint8", image_interpolation="bicubic").train
    n = len(train)
    sampler = td.EpochSampler(n, args.batch_size, n // args.batch_size, 42)
    loader = td.build_train_loader(train, sampler, args.workers, "cuda")  # "cuda": keep the thread count as set, pin off below
    loader.pin_memory = False
    return SimpleNamespace(loader=loader, sampler=sampler, dataset=train, steps=getattr(loader, "steps_per_epoch", sampler.num_batches))


def epoch(b, e: int) -> int:
    b.sampler.set_epoch(e)
    b.dataset.set_epoch(e)
    count = 0
    for batch in b.loader:
        count += batch["pixel_values"].shape[0]
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per repeat (after one untimed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=200)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    kinds = ["csv", "csv-cache", "shards"]
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, urls = write_sources(Path(tmp), args.shard_size)
        loaders = {k: build_loader(k, csv_path, urls, args) for k in kinds}
        for k, b in loaders.items():
            epoch(b, 0)  # untimed: workers start, the cache fills
        rates = {k: [] for k in kinds}
        for r in range(args.repeats):
            for k in kinds:
                start, n = time.perf_counter(), 0
                for e in range(args.epochs):
                    n += epoch(loaders[k], 1 + r * args.epochs + e)
                rates[k].append(n / (time.perf_counter() - start))
        for b in loaders.values():
            _train_data().stop_workers(b.loader)
    print(f"training loader, {args.resolution} px, batch {args.batch_size}, {args.workers} worker(s), {args.epochs} epochs x {args.repeats} "
          f"repeats (textile, 1,600 training JPEGs; shards of {args.shard_size})")
    for k in kinds:
        v = rates[k]
        print(f"  {k:10s} {statistics.median(v):8.1f} samples/s  (range {min(v):.1f}-{max(v):.1f}; {loaders[k].steps} batches/epoch)")
    print(f"  shards/csv {statistics.median(rates['shards']) / statistics.median(rates['csv']):.2f}   "
          f"shards/csv-cache {statistics.median(rates['shards']) / statistics.median(rates['csv-cache']):.2f}")


if __name__ == "__main__":
    main()
