"""CPU time of one training item: clipexp's dataset against open_clip_train's CSV dataset, on (a)/(d)'s data.

    python benchmarks/item_cost.py --model tiny_open_clip
    python benchmarks/item_cost.py --model small --captions unique

One thread, the same training pairs as throughput.py's (a) and (d): clipexp's item (the image from its cache,
the domain's augmentation, the caption's tokens looked up) and open_clip's (PIL open and decode, its train
transform, its tokenizer on the caption), each over ``--items`` items after a warm-up; CPU seconds
(``time.process_time``), so the figure holds on a busy machine. Arguments after ``--`` go to throughput.py's
parser (``--model``, ``--captions``, ``--resolution``...).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402


def per_item_ms(get, n: int) -> float:
    for i in range(min(8, n)):  # warm-up: first-call costs (imports, caches of the tokenizer)
        get(i)
    t0 = time.process_time()
    for i in range(n):
        get(i)
    return 1e3 * (time.process_time() - t0) / n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=256)
    own, rest = p.parse_known_args(argv)
    args = throughput.parse_args(rest)
    import torch

    torch.set_num_threads(1)
    throughput._quiet()
    from open_clip_arm import register, write_train_csv

    import open_clip
    from open_clip_train.data import CsvDataset
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        throughput.prepare_process(args, work)
        train = throughput.clipexp_setup(args).data.train  # with its image cache, as (a) runs it
        n = min(own.items, len(train))
        ours = per_item_ms(lambda i: train[i], n)
        name = register(args.model, throughput.open_clip_config(throughput.model_spec(args)), work)
        _, preprocess_train, _ = open_clip.create_model_and_transforms(name, None)
        theirs_ds = CsvDataset(str(write_train_csv(work / "t.tsv", train.image_paths, train.captions)), preprocess_train,
                               "filepath", "title", sep="\t", tokenizer=open_clip.get_tokenizer(name))
        theirs = per_item_ms(lambda i: theirs_ds[i], n)
        decode = per_item_ms(lambda i: Image.open(theirs_ds.images[i]).convert("RGB").load(), n)
        tokens = per_item_ms(lambda i: theirs_ds.tokenize([str(theirs_ds.captions[i])]), n)
    print(f"{args.model}, {args.captions} captions, {n} items, CPU ms per item (one thread):")
    print(f"  clipexp   {ours:6.2f}  (cached uint8 image, OpenCV augmentation, tokens looked up)")
    print(f"  open_clip {theirs:6.2f}  (PIL open + decode {decode:.2f}, tokenize {tokens:.2f}, its transform the rest)")


if __name__ == "__main__":
    main()
