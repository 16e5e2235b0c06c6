"""benchmarks/throughput.py's code paths that need no timing: its arguments, the unique-caption data, the
open_clip model config and CSV that (d) hands open_clip's own trainer, the stop after N timed steps, the
FLOP count and the ratios. The timings themselves are not tested (benchmarks print figures)."""

from __future__ import annotations

import csv
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_data  # noqa: E402
import open_clip_arm  # noqa: E402
import throughput  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*argv: str) -> Namespace:
    return throughput.parse_args(list(argv))


# ------------------------------------------------------------------------------------------ arguments
def test_defaults_run_the_open_clip_arm_on_the_templated_captions():
    args = _args()
    assert args.only.split(",") == ["a", "a0", "b", "c", "d"] and args.captions == "template" and args.family is None
    assert args.precision == "fp32" and _args("--device", "cuda").precision == "bf16"
    assert throughput.model_spec(args)["family"] == "hf"
    assert throughput.model_spec(_args("--model", "tiny_open_clip"))["family"] == "open_clip_conv"
    assert throughput.model_spec(_args("--model", "small", "--family", "open_clip"))["family"] == "open_clip"


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny_open_clip", "--family", "hf"], "--family does not apply to --model tiny_open_clip"),
    (["--only", "a,x"], "unknown measurement(s) x"),
    (["--captions", "repeated"], "invalid choice: 'repeated'"),
])
def test_bad_arguments_are_refused_with_their_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _args(*argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_each_family_and_caption_mode_composes_its_clipexp_config(tmp_path):
    def overrides(*argv):
        args = _args(*argv)
        throughput.prepare_process(args, tmp_path)
        return throughput._clipexp_overrides(args, throughput.model_spec(args))

    conv = overrides("--model", "tiny_open_clip")
    assert conv[0] == "model=tiny_open_clip" and "model.architecture.vision_hidden_size=64" in conv and "data=textile" in conv
    vit = overrides("--model", "tiny", "--family", "open_clip", "--captions", "unique")
    assert vit[0] == "model=open_clip" and "model.arch=clipexp_bench_tiny" in vit and "model.pretrained=null" in vit
    assert ["data=csv", f"data.path={tmp_path / 'unique_captions.csv'}", "data.allow_outside_root=true"] == \
           [o for o in vit if o.startswith("data.") or o.startswith("data=")][:3]
    assert overrides("--model", "tiny")[0] == "model=tiny"


# ------------------------------------------------------------------------------------ unique captions
def test_unique_caption_csv_holds_every_textile_image_once_with_its_class_and_a_caption_of_its_own(tmp_path):
    from clipexp.data.textile import TEXTILE_CAPTIONS, read_textile

    path = bench_data.write_unique_caption_csv(tmp_path / "u.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2000 and len({r["caption"] for r in rows}) == 2000
    textile, _ = read_textile(check_images=False)
    assert [r["image_path"] for r in rows] == [str(Path(p.image_path).resolve()) for p in textile]
    assert [r["label"] for r in rows] == [p.label for p in textile]
    assert rows[1234]["caption"] == f"#1234 {TEXTILE_CAPTIONS[rows[1234]['label']]}"


@pytest.mark.parametrize("model", ["tiny", "tiny_open_clip"])
def test_unique_captions_stay_distinct_after_each_tokenizer_and_split(model, tmp_path):
    """What the benchmark's children build: every training caption its own token row and caption group, so
    caption packing has nothing to dedupe (clipexp's byte-level tokenizer truncates at 77 tokens: the
    number comes first, and no caption reaches the limit)."""
    args = _args("--model", model, "--captions", "unique")
    throughput.prepare_process(args, tmp_path)
    train = throughput.clipexp_setup(args, images_on_disk=True).data.train
    tokens = train.caption_tokens()
    assert len(train) == 1600 and len(set(train.captions)) == 1600
    assert torch.unique(tokens["input_ids"], dim=0).shape[0] == 1600  # distinct after tokenizing (and truncation)
    assert int(tokens["attention_mask"].sum(1).max()) < 77             # nothing was cut
    assert len(set(train.group_ids.tolist())) == 1600


# ----------------------------------------------------------------------------- (d): open_clip's config
def test_conv_config_is_the_model_clipexp_builds_for_tiny_open_clip(tmp_path):
    import open_clip

    from clipexp.models.open_clip_family import build_open_clip

    spec = throughput.model_spec(_args("--model", "tiny_open_clip"))
    name = open_clip_arm.register("tiny_open_clip", throughput.open_clip_config(spec), tmp_path)
    theirs = open_clip.create_model(name).state_dict()
    ours, _ = build_open_clip(spec["arch"], spec["resolution"], spec["seq_len"])
    mine = ours.open_clip_state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in mine.items()}


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_vit_config_has_the_hf_models_widths_and_the_formulas_flops(model, tmp_path):
    """The open_clip ViT (d) trains is the HF CLIP of (a) at the same sizes: the same parameters per
    transformer layer, and torch's FLOP count of its forward equals the benchmark's formula exactly."""
    from clipexp.models.clip import build_model

    spec = throughput.model_spec(_args("--model", model))
    config = throughput.open_clip_config(spec)
    counted = throughput.counted_flops_per_sample(config, spec["resolution"], spec["seq_len"])
    assert counted["forward"] == throughput.flops_per_sample(spec["arch"], spec["resolution"], spec["seq_len"])["forward"]

    import open_clip

    oc = open_clip.create_model(open_clip_arm.register(model, config, tmp_path))
    hf = build_model(spec["arch"], spec["resolution"], spec["seq_len"])
    layer = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert [layer(b) for b in oc.visual.transformer.resblocks] == [layer(x) for x in hf.vision_model.encoder.layers]
    assert [layer(b) for b in oc.transformer.resblocks] == [layer(x) for x in hf.text_model.encoder.layers]


def test_open_clip_reads_the_csv_and_arguments_it_is_given(tmp_path):
    from open_clip_train.data import CsvDataset
    from open_clip_train.params import parse_args

    captions = ['a "quoted" caption, with a comma', "#0001 plain"]
    path = open_clip_arm.write_train_csv(tmp_path / "t.tsv", ["/x/a.jpg", "/x/b.jpg"], captions)
    data = CsvDataset(str(path), None, img_key="filepath", caption_key="title", sep="\t")
    assert data.images == ["/x/a.jpg", "/x/b.jpg"] and data.captions == captions
    with pytest.raises(ValueError, match="tab or newline"):
        open_clip_arm.write_train_csv(tmp_path / "bad.tsv", ["/x/a.jpg"], ["a\tb"])

    argv = open_clip_arm.train_argv(model="m", train_csv=path, logs=tmp_path, batch_size=64, workers=1, precision="bf16",
                                    device="cuda", epochs=2, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6,
                                    grad_clip=1.0, seed=3)
    got = parse_args(argv)
    assert (got.batch_size, got.workers, got.precision, got.device, got.epochs, got.save_frequency) == (64, 1, "amp_bf16", "cuda", 2, 0)
    assert (got.lr, got.wd, got.beta1, got.beta2, got.eps, got.grad_clip_norm, got.warmup, got.seed) == (1e-4, 0.01, 0.9, 0.98, 1e-6, 1.0, 0, 3)
    assert got.csv_separator == "\t" and got.dataset_type == "csv" and got.report_to == ""
    assert [open_clip_arm.OPEN_CLIP_PRECISION[p] for p in ("fp32", "bf16", "fp16")] == ["fp32", "amp_bf16", "amp"]


def test_epochs_cover_the_steps_open_clip_must_take():
    assert open_clip_arm.epochs_for(10, 1600, 64) == 1      # 25 full batches an epoch
    assert open_clip_arm.epochs_for(25, 1600, 64) == 1
    assert open_clip_arm.epochs_for(26, 1600, 64) == 2
    with pytest.raises(ValueError, match="make no batch of 64"):
        open_clip_arm.epochs_for(1, 10, 64)


def test_open_clips_trainer_is_stopped_after_the_timed_steps(tmp_path):
    """open_clip_train.main on 24 textile images, batch 4 (6 steps an epoch, 2 epochs asked): stamped after
    each optimizer step, the marks taken at the steps asked for, and stopped after step 3."""
    from clipexp.data.textile import read_textile

    spec = throughput.model_spec(_args("--model", "tiny_open_clip", "--resolution", "32"))
    model = open_clip_arm.register("stop_test", throughput.open_clip_config(spec), tmp_path)
    pairs = read_textile(check_images=False)[0][:24]
    path = open_clip_arm.write_train_csv(tmp_path / "t.tsv", [str(p.image_path) for p in pairs], [p.captions[0] for p in pairs])

    def argv(name: str, epochs: int):
        out = open_clip_arm.train_argv(model=model, train_csv=path, logs=tmp_path / "logs", batch_size=4, workers=0,
                                       precision="fp32", device="cpu", epochs=epochs, lr=1e-4, weight_decay=0.0,
                                       betas=(0.9, 0.98), eps=1e-6, grad_clip=None, seed=0)
        out[out.index("--name") + 1] = name
        return out

    marked = []
    stamps = open_clip_arm.run_timed(argv("run", 2), 3, {1, 3}, marked.append)
    assert len(stamps) == 3 and stamps == sorted(stamps) and marked == [1, 3]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert "Start epoch 0" in log and "Start epoch 1" not in log  # stopped inside the first epoch
    with pytest.raises(RuntimeError, match="stopped after 6 of 7 steps"):  # one epoch holds only 6
        open_clip_arm.run_timed(argv("short", 1), 7)


def test_ratios_pair_the_repeats_in_the_order_they_ran():
    def runs(*values, cpu=1.0):
        return [{"samples_per_s": v, "cpu_ms_per_sample": cpu} for v in values]

    got = {r["name"]: r for r in throughput.ratios({"a": runs(100.0, 120.0, 90.0, cpu=4.0), "b": runs(110.0, 100.0, 100.0, cpu=3.0),
                                                      "b1": runs(50.0, 50.0, 50.0), "d": runs(125.0, 80.0, 100.0)})}
    assert set(got) == {"a/b", "a/b'", "a/d"}                          # c and a0 did not run
    assert got["a/b"]["value"] == pytest.approx(100 / 100) and got["a/b"]["ok"] is True
    assert got["a/b"]["per_repeat"] == pytest.approx([100 / 110, 120 / 100, 90 / 100])
    assert got["a/b"]["best"] == pytest.approx(120 / 110)
    assert got["a/b"]["cpu"] == pytest.approx(3.0 / 4.0)  # a spends more CPU per sample than b: below 1
    assert got["a/d"]["value"] == pytest.approx(100 / 100) and got["a/d"]["target"] == 1.0
    assert got["a/b'"]["value"] == pytest.approx(2.0) and got["a/b'"]["ok"] is None
    below = throughput.ratios({"a": runs(90.0), "d": runs(100.0)})[0]
    assert below["name"] == "a/d" and below["ok"] is False
