"""What a run costs as the data grows: 2k / 20k / 100k distinct images, from a CSV and from WebDataset shards.

    python benchmarks/dataset_scale.py                                   # 2000 20000 100000, in /tmp, deleted after
    python benchmarks/dataset_scale.py --sizes 2000 20000 --steps 20 --keep --workdir /tmp/scale

1. **Data.** The textile set's 2,000 JPEGs grown into ``max(--sizes)`` distinct files: image ``n`` is source
   ``n % 2000`` in variant ``n // 2000``, a square crop of 160-250 px at a random place, flipped and rotated by a
   random multiple of 90 degrees, re-encoded at JPEG quality 80-95 (no two variants of a source alike). Its
   caption is its number and its class caption (``#012345 a textile fabric with a small local defect.``: all
   distinct, under 77 byte-level tokens). The first N rows are the N-image set (each 2,000 holds every source once).
2. **Shards** of each set: ``python -m clipexp.data.to_shards`` (the run's split and seed), timed.
3. **Runs**, each in its own process, for each size and source (``csv``: ``data=csv``; ``shards``:
   ``data=webdataset``): the quick start's model and settings (tiny CLIP, 160 px, batch 64, tracking off),
   ``--steps`` steps, one validation at the end (no test evaluation, no outputs). Measured: time to the first
   step (process start to the end of optimizer step 1, the Trainer's setup inside it), samples/s from the end
   of step 5 to the last, the validation's seconds, peak RSS of the process and of process + loader workers,
   and the image cache (mode, entries, MB). With ``--cache-cap MB`` (default 1024) the largest CSV set runs once
   more with ``data.cache_images=memory data.cache_memory_mb=MB``: the cache must stay within MB.

Prints one Markdown table (and ``--json``). Generated data lives under ``--workdir`` and is deleted at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

RESULT_MARK = "SCALE_RESULT "
SEED = 42  # the run config's default seed: to_shards splits with it, as the CSV runs do
VARIANT_SIDES = (160, 250)


# --------------------------------------------------------------------------------------------------
# 1. distinct images and captions
# --------------------------------------------------------------------------------------------------


def variant_params(source: int, variant: int) -> Dict[str, int]:
    """Crop side and place, flip, rotation and JPEG quality of variant ``variant`` of source ``source``
    (for a 250 px square source): deterministic, and distinct for distinct variants of one source."""
    import random

    rng = random.Random(source * 1_000_003 + variant)
    side = rng.randint(*VARIANT_SIDES)
    return {"side": side, "x": rng.randint(0, 250 - side), "y": rng.randint(0, 250 - side), "flip": rng.randint(0, 1),
            "rot": rng.randint(0, 3), "quality": rng.randint(80, 95)}


def distinct_params(source: int, variants: int) -> List[Dict[str, int]]:
    """:func:`variant_params` for ``range(variants)``, redrawn (with a salt) where two would coincide."""
    seen, out = set(), []
    for v in range(variants):
        salt = 0
        while True:
            p = variant_params(source, v + salt * 1_000_000)
            key = tuple(sorted(p.items()))
            if key not in seen:
                break
            salt += 1
        seen.add(key)
        out.append(p)
    return out


def make_variant(src: str, dst: Path, p: Dict[str, int]) -> None:
    import cv2
    import numpy as np

    img = cv2.imread(src, cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    side = min(p["side"], h, w)
    x, y = min(p["x"], w - side), min(p["y"], h - side)
    out = img[y:y + side, x:x + side]
    if p["flip"]:
        out = out[:, ::-1]
    out = np.ascontiguousarray(np.rot90(out, p["rot"]))
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, p["quality"]])
    if not ok:
        raise RuntimeError(f"cannot encode {dst}")
    dst.write_bytes(buf.tobytes())


def _make_chunk(job) -> int:
    for src, dst, p in job:
        make_variant(src, Path(dst), p)
    return len(job)


def generate(workdir: Path, n_max: int, jobs: int) -> Dict[str, Any]:
    """``workdir/images/<class>/<n>.jpg`` for n < n_max and ``workdir/pairs.csv`` (in n order)."""
    from bench_data import textile_rows

    sources = textile_rows()
    variants = -(-n_max // len(sources))
    params = [distinct_params(i, variants) for i in range(len(sources))]
    rows, work = [], []
    for n in range(n_max):
        i, v = n % len(sources), n // len(sources)
        image, caption, label = sources[i]
        dst = workdir / "images" / label.replace(" ", "_") / f"{n:06d}.jpg"
        rows.append((str(dst.relative_to(workdir)), f"#{n:06d} {caption}", label))
        if not dst.exists():
            work.append((image, str(dst), params[i][v]))
    for label in {r[2] for r in rows}:
        (workdir / "images" / label.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chunks = [work[k:k + 500] for k in range(0, len(work), 500)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        done = sum(pool.map(_make_chunk, chunks))
    seconds = time.perf_counter() - t0
    with (workdir / "pairs.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(("image_path", "caption", "label"))
        out.writerows(rows)
    size = sum(p.stat().st_size for p in (workdir / "images").rglob("*.jpg"))
    return {"images": n_max, "generated": done, "seconds": seconds, "bytes": size}


def pairs_csv(workdir: Path, n: int) -> Path:
    """The first ``n`` rows of ``pairs.csv`` as ``pairs_<n>.csv`` (beside the images: relative paths resolve)."""
    path = workdir / f"pairs_{n}.csv"
    if not path.exists():
        with (workdir / "pairs.csv").open() as f:
            lines = [next(f) for _ in range(n + 1)]
        path.write_text("".join(lines))
    return path


# --------------------------------------------------------------------------------------------------
# 2. shards
# --------------------------------------------------------------------------------------------------


def write_shards(csv_path: Path, out: Path) -> Dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clipexp.data.to_shards", str(csv_path), str(out), "--seed", str(SEED)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(f"to_shards failed: {proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": time.perf_counter() - t0, "bytes": sum(p.stat().st_size for p in out.glob("*.tar")),
            "urls": {name: s["urls"] for name, s in manifest["splits"].items()} if "splits" in manifest else manifest}


# --------------------------------------------------------------------------------------------------
# 3. one run (child process)
# --------------------------------------------------------------------------------------------------


def run_overrides(args) -> List[str]:
    out = ["experiment=quickstart", "tracking.enabled=false", f"seed={SEED}", f"trainer.max_steps={args.steps}",
           f"trainer.eval_steps={args.steps}", f"trainer.save_steps={10 ** 9}", "trainer.eval_at_start=false",
           "trainer.progress=false", "trainer.logging_steps=1", "data.augment_text=false"]
    if args.source == "csv":
        out += ["data=csv", f"data.path={args.pairs}"]
    else:
        urls = json.loads(args.urls)
        out += ["data=webdataset", f"data.urls='{urls['train']}'", f"data.val_urls='{urls['val']}'"]  # quoted: brace patterns
    return out + list(args.set)


def measure(args) -> Dict[str, Any]:
    from throughput import MemoryWatch

    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    cfg = compose_and_validate(run_overrides(args))
    stamps: List[float] = []
    val_s: List[float] = []
    with tempfile.TemporaryDirectory() as out, MemoryWatch() as mem:
        trainer = Trainer(cfg, Path(out))
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        update, evaluate = trainer.scaler.update, trainer.evaluate

        def timed_update(*a, **k):
            result = update(*a, **k)
            stamps.append(time.perf_counter())
            return result

        def timed_evaluate(split="val"):
            t = time.perf_counter()
            try:
                return evaluate(split)
            finally:
                val_s.append(time.perf_counter() - t)

        trainer.scaler.update, trainer.evaluate = timed_update, timed_evaluate
        trainer.finish = lambda: None  # no test evaluation, no outputs: not what this measures
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        cache = trainer.data.cache
    warm = min(5, args.steps - 1)
    samples = (len(stamps) - warm) * trainer.global_batch
    return {
        "first_step_s": stamps[0] - T_START, "setup_s": setup_s, "samples_per_s": samples / (stamps[-1] - stamps[warm - 1]),
        "val_s": val_s[0] if val_s else None, "val_pairs": len(trainer.data.val) if trainer.data.val is not None else 0,
        "train_pairs": getattr(trainer.data.train, "__len__", lambda: None)() if not getattr(trainer.data.train, "is_stream", False)
        else trainer.steps_per_epoch * trainer.global_batch,
        "cache_mode": getattr(cache, "mode", "none") if cache is not None else "none",
        "cache_entries": len(cache) if cache is not None else 0, "cache_mb": (cache.nbytes / 2**20) if cache is not None else 0.0,
        "cache_limit_mb": getattr(cache, "memory_mb", None) if cache is not None else None, "workers": trainer.train_loader.num_workers,
        **mem.result(),
    }


def child(args, source: str, n: int, pairs: Path, urls: Optional[Dict[str, str]], extra: List[str]) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", source, "--pairs", str(pairs), "--steps", str(args.steps)]
    if urls:
        cmd += ["--urls", json.dumps(urls)]
    for o in extra:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
    return {"error": " / ".join(tail) or f"exit {proc.returncode}"}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def table(rows: List[Dict[str, Any]]) -> str:
    head = ("| images | source | to first step s (setup) | samples/s | validation s (pairs) | peak RSS MB (+workers) "
            "| image cache |\n|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        m = r["result"]
        if "error" in m:
            out.append(f"| {r['n']:,} | {r['label']} | failed: {m['error'][:200]} | | | | |")
            continue
        cache = (f"{m['cache_mode']}, {m['cache_entries']:,} images, {m['cache_mb']:.0f} MB"
                 + (f" (limit {m['cache_limit_mb']:g})" if m["cache_limit_mb"] and m["cache_mode"] != "none" else ""))
        out.append(f"| {r['n']:,} | {r['label']} | {m['first_step_s']:.1f} ({m['setup_s']:.1f}) | {m['samples_per_s']:.1f} "
                   f"| {m['val_s']:.1f} ({m['val_pairs']:,}) | {m['peak_rss_mb']:.0f} ({m['peak_tree_rss_mb']:.0f}) | {cache} |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    p.add_argument("--sources", default="csv,shards", help="csv, shards or both")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (samples/s from the end of step 5)")
    p.add_argument("--cache-cap", type=int, default=1024, help="MB for the capped-cache run of the largest set (0: none)")
    p.add_argument("--workdir", type=Path, default=None, help="where the images and shards go (default: a new folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--jobs", type=int, default=2, help="processes generating images")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--measure", choices=["csv", "shards"], help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--urls", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.source = args.measure
    if args.steps < 7:
        p.error("--steps must be >= 7 (samples/s is timed from the end of step 5)")
    bad = set(args.sources.split(",")) - {"csv", "shards"}
    if bad:
        p.error(f"--sources: unknown {', '.join(sorted(bad))}; csv, shards or csv,shards")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger().setLevel(logging.WARNING)
        print(RESULT_MARK + json.dumps(measure(args)), flush=True)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clipexp_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes, sources = sorted(args.sizes), args.sources.split(",")
    print(f"data in {workdir}; free there: {shutil.disk_usage(workdir).free / 2**30:.1f} GiB", flush=True)
    rows: List[Dict[str, Any]] = []
    report: Dict[str, Any] = {"sizes": sizes, "steps": args.steps}
    try:
        gen = generate(workdir, sizes[-1], args.jobs)
        report["generate"] = gen
        print(f"generated {gen['generated']:,} of {gen['images']:,} images in {gen['seconds']:.0f} s "
              f"({gen['bytes'] / 2**30:.2f} GiB)", flush=True)
        report["shards"] = {}
        for n in sizes:
            pairs = pairs_csv(workdir, n)
            urls = None
            if "shards" in sources:
                sh = write_shards(pairs, workdir / f"shards_{n}")
                report["shards"][n] = sh
                urls = sh["urls"]
                print(f"{n:,}: shards written in {sh['seconds']:.0f} s ({sh['bytes'] / 2**20:.0f} MiB)", flush=True)
            runs = [(s, []) for s in sources]
            if n == sizes[-1] and args.cache_cap and "csv" in sources:
                runs.append(("csv", ["data.cache_images=memory", f"data.cache_memory_mb={args.cache_cap}"]))
            for source, extra in runs:
                result = child(args, source, n, pairs, urls if source == "shards" else None, extra)
                label = source + (f", cache capped at {args.cache_cap} MB" if extra else "")
                rows.append({"n": n, "label": label, "result": result})
                print(f"{n:,} {label}: {json.dumps(result)}", flush=True)
                if extra and "error" not in result:
                    within = result["cache_mb"] <= args.cache_cap
                    print(f"  capped cache: {result['cache_mb']:.0f} MB of {args.cache_cap} MB: {'within' if within else 'OVER'} the limit")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(rows))
    report["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
