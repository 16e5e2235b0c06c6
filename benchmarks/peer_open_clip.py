"""clipexp against open_clip's own trainer (``open_clip_train``) on the same split, model, steps and optimiser.

    python benchmarks/peer_open_clip.py --seeds 0 1 2 3 4 5 6 7             # open_clip vs clipexp, the paired table
    python benchmarks/peer_open_clip.py --seeds 0 1 2 3 4 5 6 7 --factors    # + the one-factor-at-a-time variants
    python benchmarks/peer_open_clip.py --table                              # reprint the tables from the results

What is the same on both sides (per seed):

* **Split**: clipexp's own seeded 1,600 / 200 / 200 textile split (``split_pairs`` of the run's seed, as the trainer
  builds it), written to ``train.csv`` / ``val.csv`` / ``test.csv`` (``filepath,title,label``; the title is the
  class's fixed caption); open_clip reads ``train.csv``. After each clipexp run its ``test_split.csv`` is checked
  against ``test.csv``.
* **Model**: ``model=tiny_open_clip model.architecture.vision_tower=vit`` at the quick start's 160 px / 20 px
  patches (a 2-layer, 64-wide ViT and text transformer, open_clip's BPE tokenizer: 3,390,529 parameters). Its
  open_clip model config (``tiny_open_clip_config``, what clipexp builds) is written to ``clipexp_peer.json`` and
  registered with ``open_clip.add_model_config``, so both trainers build the same ``open_clip.model.CLIP``, and
  with the same seed the same initial weights (``tests/models/test_open_clip_vit_tower.py``).
* **Optimisation**: from the composed clipexp config: steps (open_clip trains whole epochs: steps / (1,600 // 64)
  = 24), batch 64, AdamW lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.05 (open_clip: off for gains, biases
  and the logit scale; clipexp: also off for embeddings unless ``trainer.decay_embeddings=true``), gradient
  clipping 1.0, linear warm-up 30 steps then cosine to 0 (the same formula), fp32, CPU, one torch thread
  (``OMP_NUM_THREADS=1``), no loader workers.
* **Evaluation**: one function scores every final model, loaded as an ``open_clip.model.CLIP``: open_clip's eval
  preprocessing of the model config (resize the short side to 160 px, bicubic, centre crop, OpenAI mean/std), the
  three CSV captions as the class prompts (``domain prompts``: the industrial domain's three templates, averaged,
  as clipexp's evaluator does), the 200 test images; balanced accuracy = mean per-class recall.

What differs is each trainer's recipe; ``--factors`` moves clipexp's towards open_clip's one difference at a time
(``VARIANTS``). The checkpoint kept needs no run of its own: every clipexp run is scored with its final weights
(``final``, as open_clip's) and with the best-by-val weights it saves as ``model/`` (``best``); clipexp's own
printed test figure (best-by-val, its own preprocessing and the domain prompts) is kept beside them.

Each (variant, seed) runs in a child process (``--jobs N`` at a time) and writes ``<results>/<variant>/seed<N>.json``
when it ends: a run that crashes loses only itself, and a (variant, seed) already written is skipped (delete its
JSON to rerun it). Training folders are deleted once scored (``--keep`` keeps them). ``--set KEY=VALUE ...``
adds Hydra overrides to every variant and to the peer's settings (the test runs two steps with them).
Run it as ``OMP_NUM_THREADS=1 nice -n 19 python benchmarks/peer_open_clip.py ...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEER = "open_clip"          # open_clip_train.main
# peer variants -> offset added to the seed of the data order and augmentation draws (its second random_seed call;
# the first seeds the model's initial weights): "open_clip_reorder" is the same split and initial weights, another order
PEERS = {PEER: 0, "open_clip_reorder": 1000}
PEER_MODEL = "clipexp_peer"  # the open_clip model config's name (clipexp_peer.json)
# clipexp's side: the quick start (160 px, 20 px patches) with the open_clip ViT model both trainers build
# The augmentation is pinned to the quick start's as measured (no crop, flips, 10 degree rotation, colour jitter 0.1):
# the quick start took open_clip's crop-only augmentation (the open_clip_aug variant) after this comparison.
_QUICKSTART_AUG = ["domain.augmentation.crop_scale_min=1.0", "domain.augmentation.hflip=true", "domain.augmentation.vflip=true",
                   "domain.augmentation.rotation_degrees=10", "domain.augmentation.color_jitter=0.1"]
BASE = ["experiment=quickstart", "model=tiny_open_clip", "model.architecture.vision_tower=vit",
        "device.type=cpu", "device.precision=fp32", "tracking.enabled=false", "trainer.progress=false", *_QUICKSTART_AUG]
_OPEN_CLIP_AUG = ["domain.augmentation.crop_scale_min=0.9", "domain.augmentation.hflip=false", "domain.augmentation.vflip=false",
                  "domain.augmentation.rotation_degrees=0", "domain.augmentation.color_jitter=0"]
_LOSS = ["loss.multi_positive=false", "loss.use_model_logit_scale=true"]
_CAPTIONS = ["data.augment_text=false"]
_DECAY = ["trainer.decay_embeddings=true"]
# clipexp variants: overrides on BASE. The first is the quick start's recipe; each factor moves one difference
# to open_clip's setting; "like_open_clip" moves them all.
VARIANTS: Dict[str, List[str]] = {
    "clipexp": [],
    "plain_loss": _LOSS,              # textbook CLIP loss with the model's logit_scale (not multi-positive, no loss temperature)
    "csv_captions": _CAPTIONS,        # the fixed CSV caption, not drawn among it and the domain's templates
    "open_clip_aug": _OPEN_CLIP_AUG,  # random resized crop 0.9-1 only: no flips, rotation, colour jitter
    "decay_embeddings": _DECAY,       # weight decay on token / position embeddings too
    "like_open_clip": [*_LOSS, *_CAPTIONS, *_OPEN_CLIP_AUG, *_DECAY],
}
FACTORS = ["plain_loss", "csv_captions", "open_clip_aug", "decay_embeddings", "like_open_clip"]
CSV_FIELDS = ("filepath", "title", "label")


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compose(overrides: Sequence[str], seed: int):
    from clipexp.config.compose import compose as compose_and_validate

    return compose_and_validate([*BASE, *overrides, f"seed={seed}"])


def architecture(cfg) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.model.architecture, resolve=True)


def model_config(cfg) -> Dict[str, Any]:
    """The open_clip model config of the run config's model: what clipexp builds, as open_clip's JSON."""
    from clipexp.models.open_clip_family import tiny_open_clip_config

    return tiny_open_clip_config(architecture(cfg), cfg.model.image_resolution, cfg.model.max_sequence_length)


# ------------------------------------------------------------------------------------------------- split
def write_split(cfg, folder: Path) -> Dict[str, Path]:
    """clipexp's split of ``cfg`` (its source, ratios and seed, as ``build_datasets`` makes it) as three CSVs."""
    from omegaconf import OmegaConf

    from clipexp.data.loaders import read_source
    from clipexp.data.split import split_pairs

    data = OmegaConf.to_container(cfg.data, resolve=True)
    pairs, _ = read_source({**data, "check_images": False}, list(cfg.domain.prompt_templates), seed=cfg.seed)
    parts = split_pairs(pairs, data["train_split"], data["val_split"], data["test_split"], cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, part in zip(("train", "val", "test"), parts):
        path = folder / f"{name}.csv"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_FIELDS)
            for p in part:
                w.writerow([str(Path(p.image_path).resolve()), p.captions[0], p.label])
        os.replace(tmp, path)  # two processes may write the same split: each writes it whole
        out[name] = path
    return out


def read_rows(path: Path) -> List[Dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------- scoring
class Scorer:
    """One evaluation for every model (an ``open_clip.model.CLIP``): open_clip's eval preprocessing of the model
    config and open_clip's own zero-shot classifier (``build_zero_shot_classifier``: each prompt's normalised text
    embedding, averaged over a class's templates, normalised) on the test CSV's images."""

    def __init__(self, cfg, config_dir: Path, test_csv: Path):
        import open_clip
        import torch
        from PIL import Image

        register(config_dir)
        _, _, preprocess = open_clip.create_model_and_transforms(PEER_MODEL, precision="fp32", device="cpu")
        self.tokenizer = open_clip.get_tokenizer(PEER_MODEL)
        rows = read_rows(test_csv)
        caption_of = {r["label"]: r["title"] for r in rows}  # one fixed caption per class
        self.classes = sorted(caption_of)
        self.labels = torch.tensor([self.classes.index(r["label"]) for r in rows])
        # prompt set -> (one string per class, templates): the CSV captions as they are; the domain's templates
        self.prompts = {"csv": ([caption_of[c] for c in self.classes], ["{}"]),
                        "domain": (list(self.classes), list(cfg.domain.prompt_templates))}
        self.pixels = torch.stack([preprocess(Image.open(r["filepath"])) for r in rows])

    def score(self, model) -> Dict[str, Any]:
        """Balanced accuracy (mean per-class recall), accuracy and per-class recall of ``model`` on the test images;
        keys without a prefix for the CSV captions as prompts, ``domain_...`` for the domain's templates."""
        import open_clip
        import torch
        import torch.nn.functional as F

        model.eval()
        out: Dict[str, Any] = {}
        with torch.no_grad():
            images = F.normalize(model.encode_image(self.pixels).float(), dim=-1)
            for name, (names, templates) in self.prompts.items():
                classifier = open_clip.build_zero_shot_classifier(model, self.tokenizer, names, templates, device="cpu")
                pred = (images @ classifier.float()).argmax(dim=1)
                recall = {c: int((pred[self.labels == i] == i).sum()) / int((self.labels == i).sum()) for i, c in enumerate(self.classes)}
                key = "" if name == "csv" else f"{name}_"
                out[f"{key}balanced_acc"] = statistics.fmean(recall.values())
                out[f"{key}acc"] = int((pred == self.labels).sum()) / len(self.labels)
                out[f"{key}recall"] = recall
        return out


def register(config_dir: Path) -> None:
    import open_clip

    open_clip.add_model_config(str(config_dir))


def open_clip_model(config_dir: Path, state_dict: Dict[str, Any]):
    import open_clip

    register(config_dir)
    model = open_clip.create_model(PEER_MODEL, precision="fp32", device="cpu")
    model.load_state_dict(state_dict)
    return model


# ------------------------------------------------------------------------------------------------- one run
# open_clip_train.main with clipexp's model config registered: argv = config folder, order offset, its arguments
PEER_MAIN = """
import sys
import open_clip
import open_clip_train.main as peer
open_clip.add_model_config(sys.argv[1])
offset, calls = int(sys.argv[2]), []
seed_once = peer.random_seed
def random_seed(seed=42, rank=0):  # main() seeds twice: before building the model, then for the data
    seed_once(seed + (offset if calls else 0), rank)
    calls.append(seed)
peer.random_seed = random_seed
sys.exit(peer.main(sys.argv[3:]) or 0)
"""


def run_peer(cfg, split: Dict[str, Path], config_dir: Path, run_dir: Path, order_offset: int = 0) -> Dict[str, Any]:
    """open_clip_train.main on ``train.csv`` with the run config's settings; returns its final state dict.
    ``order_offset``: added to the seed of its data order and augmentation (not of its initial weights)."""
    t = cfg.trainer
    n_train = len(read_rows(split["train"]))
    per_epoch = n_train // t.batch_size
    if t.max_steps % per_epoch:
        raise SystemExit(f"open_clip trains whole epochs of {per_epoch} steps: trainer.max_steps={t.max_steps} is not a multiple")
    epochs = t.max_steps // per_epoch
    args = ["--train-data", str(split["train"]), "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", ",",
            "--model", PEER_MODEL, "--batch-size", str(t.batch_size), "--epochs", str(epochs), "--lr", str(t.learning_rate),
            "--warmup", str(t.warmup_steps), "--wd", str(t.weight_decay), "--beta1", str(t.adam_beta1), "--beta2", str(t.adam_beta2),
            "--eps", str(t.adam_eps), "--grad-clip-norm", str(t.max_grad_norm), "--lr-scheduler", "cosine", "--precision", "fp32",
            "--device", "cpu", "--workers", "0", "--seed", str(cfg.seed), "--logs", str(run_dir), "--name", "peer",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--log-every-n-steps", "100", "--report-to", ""]
    log_path = run_dir / "open_clip.log"
    with log_path.open("w") as log_file:
        proc = subprocess.run([sys.executable, "-c", PEER_MAIN, str(config_dir), str(order_offset), *args], stdout=log_file, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"open_clip_train failed (exit {proc.returncode}); the end of {log_path}:\n" + "\n".join(tail))
    import torch

    state = torch.load(run_dir / "peer" / "checkpoints" / f"epoch_{epochs}.pt", map_location="cpu", weights_only=False)
    return {"state_dict": state["state_dict"], "steps": epochs * per_epoch}


def run_clipexp(cfg, run_dir: Path, config_dir: Path, test_csv: Path) -> Dict[str, Any]:
    """clipexp's trainer on the run config; returns the final and the best-by-val weights as open_clip state dicts."""
    import open_clip

    from clipexp.models.open_clip_family import build_open_clip
    from clipexp.training import checkpoint
    from clipexp.training.trainer import train

    results = train(cfg, run_dir)
    info = json.loads((run_dir / "metrics.json").read_text())
    ours = sorted(Path(r["image_path"]).resolve() for r in read_rows(run_dir / "test_split.csv"))
    mine = sorted(Path(r["filepath"]) for r in read_rows(test_csv))
    if ours != mine:
        raise SystemExit(f"clipexp's test split ({run_dir / 'test_split.csv'}) is not the one written to {test_csv}")
    final = checkpoint.load_checkpoint(checkpoint.step_path(run_dir / "checkpoints", info["steps"]), map_location="cpu")
    dual, _ = build_open_clip(architecture(cfg), cfg.model.image_resolution, cfg.model.max_sequence_length)
    dual.load_state_dict(final["model"])
    best = open_clip.create_model(f"local-dir:{run_dir / 'model'}", precision="fp32", device="cpu")
    return {"final": dual.open_clip_state_dict(), "best": best.state_dict(), "steps": info["steps"],
            "best_step": info["best_step"], "printed_test": results["test"]["test/zeroshot_balanced_acc"],
            "printed_test_acc": results["test"]["test/zeroshot_acc"]}


def run_unit(variant: str, seed: int, results: Path, extra: List[str], keep: bool) -> Dict[str, Any]:
    """Train and score one (variant, seed); write ``<results>/<variant>/seed<N>.json``."""
    overrides = [*VARIANTS.get(variant, []), *extra]
    cfg = compose(overrides, seed)
    split = write_split(cfg, results / "splits" / f"seed{seed}")
    run_dir = results / "runs" / f"{variant}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config_dir = run_dir / "model_config"  # the open_clip config of clipexp's model, which open_clip_train builds
    config_dir.mkdir(parents=True)
    (config_dir / f"{PEER_MODEL}.json").write_text(json.dumps(model_config(cfg), indent=1))
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    if variant in PEERS:
        trained = run_peer(cfg, split, config_dir, run_dir, PEERS[variant])
    else:
        trained = run_clipexp(cfg, run_dir, config_dir, split["test"])
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    scorer = Scorer(cfg, config_dir, split["test"])
    row = {"variant": variant, "seed": seed, "overrides": overrides, "model_config": model_config(cfg), "steps": trained["steps"], "wall_s": wall, "cpu_s": cpu,
           "final": scorer.score(open_clip_model(config_dir, trained["final" if variant not in PEERS else "state_dict"]))}
    if variant not in PEERS:
        row.update(best=scorer.score(open_clip_model(config_dir, trained["best"])), best_step=trained["best_step"],
                   printed_test=trained["printed_test"], printed_test_acc=trained["printed_test_acc"])
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    path = results / variant / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(row, indent=1))
    os.replace(path.with_suffix(".tmp"), path)
    return row


# ------------------------------------------------------------------------------------------------- tables
def load_rows(results: Path) -> Dict[str, Dict[int, Dict[str, Any]]]:
    rows: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for path in sorted(results.glob("*/seed*.json")):
        row = json.loads(path.read_text())
        rows.setdefault(row["variant"], {})[row["seed"]] = row
    return rows


def _ms(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} +- {std:.3f}"


def _recall(rows: Sequence[Dict[str, Any]], which: str) -> str:
    classes = sorted(rows[0][which]["recall"])
    return " / ".join(f"{statistics.fmean(r[which]['recall'][c] for r in rows):.2f}" for c in classes)


def paired_table(rows: Dict[str, Dict[int, Dict[str, Any]]], seeds: Sequence[int], variant: str = "clipexp") -> str:
    """Per seed: open_clip final, clipexp final, their difference; clipexp's best-by-val (one evaluation) and printed test."""
    peer, ours = rows.get(PEER, {}), rows.get(variant, {})
    seeds = [s for s in seeds if s in peer and s in ours]
    if not seeds:
        return f"(no seed with both {PEER} and {variant} results yet)"
    classes = sorted(peer[seeds[0]]["final"]["recall"])
    short = "/".join(c.split()[0][:3] for c in classes)
    lines = [f"| seed | {PEER} final | recall {short} | {variant} final | recall {short} | {variant} - {PEER} | "
             f"{variant} best-by-val | {variant} printed test (best-by-val) |", "|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        p, o = peer[s], ours[s]
        rec = lambda r: " / ".join(f"{r['final']['recall'][c]:.2f}" for c in classes)  # noqa: E731
        lines.append(f"| {s} | {p['final']['balanced_acc']:.3f} | {rec(p)} | {o['final']['balanced_acc']:.3f} | {rec(o)} | "
                     f"{o['final']['balanced_acc'] - p['final']['balanced_acc']:+.3f} | {o['best']['balanced_acc']:.3f} | "
                     f"{o['printed_test']:.3f} |")
    diff = [ours[s]["final"]["balanced_acc"] - peer[s]["final"]["balanced_acc"] for s in seeds]
    pv, ov = [peer[s] for s in seeds], [ours[s] for s in seeds]
    lines.append(f"| mean +- std ({len(seeds)}) | {_ms([r['final']['balanced_acc'] for r in pv])} | {_recall(pv, 'final')} | "
                 f"{_ms([r['final']['balanced_acc'] for r in ov])} | {_recall(ov, 'final')} | {_ms(diff)} | "
                 f"{_ms([r['best']['balanced_acc'] for r in ov])} | {_ms([r['printed_test'] for r in ov])} |")
    return "\n".join(lines)


def summary_table(rows: Dict[str, Dict[int, Dict[str, Any]]], seeds: Sequence[int]) -> str:
    """Per variant over the seeds it has: final (and best-by-val) balanced accuracy, recall, the paired difference to open_clip."""
    peer = rows.get(PEER, {})
    names = [n for n in [*PEERS, *VARIANTS] if n in rows] + sorted(n for n in rows if n not in VARIANTS and n not in PEERS)
    any_class = next(iter(next(iter(rows.values())).values()))["final"]["recall"]
    short = "/".join(c.split()[0][:3] for c in sorted(any_class))
    lines = [f"| variant | seeds | final: test balanced acc | recall {short} | domain prompts | - {PEER}, paired (seeds above / equal / below) | "
             f"best-by-val | printed test | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = [rows[n][s] for s in seeds if s in rows[n]]
        if not rs:
            continue
        fin = [r["final"]["balanced_acc"] for r in rs]
        paired = [r["final"]["balanced_acc"] - peer[r["seed"]]["final"]["balanced_acc"] for r in rs if r["seed"] in peer]
        above, equal = sum(d > 0 for d in paired), sum(d == 0 for d in paired)
        diff = f"{_ms(paired)} ({above} / {equal} / {len(paired) - above - equal})" if paired and n != PEER else "-"
        best = _ms([r["best"]["balanced_acc"] for r in rs]) if "best" in rs[0] else "-"
        printed = _ms([r["printed_test"] for r in rs]) if "printed_test" in rs[0] else "-"
        lines.append(f"| {n} | {len(rs)} | {_ms(fin)} | {_recall(rs, 'final')} | {_ms([r['final']['domain_balanced_acc'] for r in rs])} | "
                     f"{diff} | {best} | {printed} | {statistics.fmean(r['cpu_s'] for r in rs):.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5, 6, 7])
    p.add_argument("--variants", nargs="+", default=[PEER, "clipexp"], help=f"{', '.join(PEERS)} and/or: {', '.join(VARIANTS)}")
    p.add_argument("--factors", action="store_true", help="also run the one-factor-at-a-time variants: " + ", ".join(FACTORS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every variant and the peer")
    p.add_argument("--jobs", type=int, default=1, help="(variant, seed) runs at a time, each a child process")
    p.add_argument("--results", type=Path, default=ROOT / "outputs" / "peer_open_clip")
    p.add_argument("--keep", action="store_true", help="keep the training folders (checkpoints, logs) under <results>/runs")
    p.add_argument("--table", action="store_true", help="only print the tables of the results")
    p.add_argument("--unit", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)  # one run, in a child process
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    results = args.results.resolve()
    variants = list(dict.fromkeys([*args.variants, *(FACTORS if args.factors else [])]))
    unknown = [v for v in variants if v not in PEERS and v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}: one of {', '.join([*PEERS, *VARIANTS])}")

    if args.unit:
        row = run_unit(args.unit[0], int(args.unit[1]), results, args.set, args.keep)
        extra = f", best-by-val {row['best']['balanced_acc']:.3f}, printed {row['printed_test']:.3f}" if "best" in row else ""
        print(f"{row['variant']} seed {row['seed']}: final test balanced acc {row['final']['balanced_acc']:.3f}{extra}; "
              f"{row['steps']} steps, {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU", flush=True)
        return
    if not args.table:
        pending = [(v, s) for s in args.seeds for v in variants if not (results / v / f"seed{s}.json").is_file()]
        running: List[tuple] = []
        failed: List[str] = []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                v, s = pending.pop(0)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--results", str(results), "--set", *args.set,
                       *(["--keep"] if args.keep else []), "--unit", v, str(s)]
                running.append((v, s, subprocess.Popen(cmd, env=env)))
            time.sleep(0.5)
            for item in [r for r in running if r[2].poll() is not None]:
                running.remove(item)
                if item[2].returncode:
                    failed.append(f"{item[0]} seed {item[1]} (exit {item[2].returncode})")
        if failed:
            print("failed: " + "; ".join(failed), file=sys.stderr)
            raise SystemExit(1)
    rows = load_rows(results)
    if not rows:
        print(f"no results in {results} yet")
        return
    print(f"\nPaired, per seed (test balanced accuracy of the final models, one evaluation; results in {results}):\n")
    print(paired_table(rows, args.seeds))
    print("\nPer variant (mean +- sample std over the seeds; paired = the variant's final minus open_clip's, per seed):\n")
    print(summary_table(rows, args.seeds))


if __name__ == "__main__":
    main()
