"""benchmarks/peer_open_clip.py: the split it writes for open_clip's trainer is the one clipexp's trainer uses, its one
evaluation scores a model as a per-image loop does, and (slow) both trainers run two steps and are scored."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.max_samples=150", "model.image_resolution=32", "model.architecture.patch_size=16"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_open_clip", ROOT / "benchmarks" / "peer_open_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_split_csvs_are_the_trainers_split(peer, tmp_path):
    from clipexp.data.textile import TEXTILE_CAPTIONS
    from clipexp.models.loading import load_clip
    from clipexp.training.data import build_data

    cfg = peer.compose(SMALL, seed=3)
    paths = peer.write_split(cfg, tmp_path)
    _, processor = load_clip(None, dict(cfg.model.architecture), 32, 77, family="open_clip")
    data = build_data(cfg, processor)  # what the trainer builds for this config
    for name in ("train", "val", "test"):
        rows = _rows(paths[name])
        ours = [(str(Path(p.image_path).resolve()), p.label) for p in getattr(data, name).pairs]
        assert sorted((r["filepath"], r["label"]) for r in rows) == sorted(ours)
        assert all(r["title"] == TEXTILE_CAPTIONS[r["label"]] for r in rows)  # the class's fixed caption
    assert [len(_rows(paths[n])) for n in ("train", "val", "test")] == [120, 15, 15]
    other = peer.write_split(peer.compose(SMALL, seed=4), tmp_path / "seed4")
    assert _rows(other["test"]) != _rows(paths["test"])  # the split follows the seed


def test_one_evaluation_scores_as_a_per_image_loop(peer, tmp_path):
    """The scorer against an independent reference: each test image preprocessed and encoded alone, each prompt
    encoded alone, argmax of the cosine, recall per class by hand."""
    import open_clip
    import torch.nn.functional as F
    from PIL import Image

    cfg = peer.compose(SMALL, seed=0)
    split = peer.write_split(cfg, tmp_path / "split")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / f"{peer.PEER_MODEL}.json").write_text(json.dumps(peer.model_config(cfg)))
    scorer = peer.Scorer(cfg, tmp_path / "config", split["test"])
    torch.manual_seed(1)
    model = open_clip.create_model(peer.PEER_MODEL, precision="fp32", device="cpu").eval()
    got = scorer.score(model)

    _, _, preprocess = open_clip.create_model_and_transforms(peer.PEER_MODEL)
    tokenizer = open_clip.get_tokenizer(peer.PEER_MODEL)
    rows = _rows(split["test"])
    classes = sorted({r["label"] for r in rows})
    with torch.no_grad():
        def text(s):
            return F.normalize(model.encode_text(tokenizer([s]))[0], dim=0)

        csv_prompts = [text(next(r["title"] for r in rows if r["label"] == c)) for c in classes]
        domain = [F.normalize(torch.stack([text(t.format(c)) for t in cfg.domain.prompt_templates]).mean(0), dim=0) for c in classes]
        hits = {"csv": {c: [] for c in classes}, "domain": {c: [] for c in classes}}
        for r in rows:
            image = F.normalize(model.encode_image(preprocess(Image.open(r["filepath"]))[None])[0], dim=0)
            for name, prompts in (("csv", csv_prompts), ("domain", domain)):
                best = max(range(len(classes)), key=lambda i: float(image @ prompts[i]))
                hits[name][r["label"]].append(classes[best] == r["label"])
    for name, key in (("csv", ""), ("domain", "domain_")):
        recall = {c: sum(h) / len(h) for c, h in hits[name].items()}
        assert got[f"{key}recall"] == pytest.approx(recall, abs=1e-9)
        assert got[f"{key}balanced_acc"] == pytest.approx(sum(recall.values()) / 3, abs=1e-9)
        assert got[f"{key}acc"] == pytest.approx(sum(map(sum, hits[name].values())) / len(rows), abs=1e-9)


@pytest.mark.slow
def test_both_trainers_run_two_steps_and_print_the_paired_table(peer, tmp_path, capsys):
    steps = ["trainer.batch_size=60", "trainer.max_steps=2", "trainer.warmup_steps=1", "trainer.eval_steps=1", "trainer.save_steps=1"]
    peer.main(["--seeds", "0", "--results", str(tmp_path), "--set", *SMALL, *steps])
    out = capsys.readouterr().out
    ours, theirs = (json.loads((tmp_path / v / "seed0.json").read_text()) for v in ("clipexp", "open_clip"))
    assert ours["steps"] == theirs["steps"] == 2
    assert ours["model_config"] == theirs["model_config"] and ours["model_config"]["vision_cfg"]["patch_size"] == 16
    for row in (ours, theirs):
        assert row["final"]["balanced_acc"] == pytest.approx(sum(row["final"]["recall"].values()) / 3)
    assert 0 <= ours["best"]["balanced_acc"] <= 1 and 0 <= ours["printed_test"] <= 1
    diff = ours["final"]["balanced_acc"] - theirs["final"]["balanced_acc"]
    assert f"| 0 | {theirs['final']['balanced_acc']:.3f} |" in out and f"| {diff:+.3f} |" in out
    assert not (tmp_path / "runs" / "clipexp-seed0").exists()  # training folders are deleted once scored
    # resumable: a second call runs nothing and prints the same table
    peer.main(["--seeds", "0", "--results", str(tmp_path), "--set", *SMALL, *steps])
    assert capsys.readouterr().out == out
