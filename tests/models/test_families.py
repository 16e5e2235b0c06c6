"""Model families (issue 23), offline: SigLIP (HF SiglipModel) and open_clip beside HF CLIP.

Each family's tiny model is built from its own config with random weights; nothing touches the hub."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from numerics import assert_close

from clipexp.models import image_features, load_clip, text_features

ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(projection_dim=64, patch_size=8, vision_hidden_size=64, vision_layers=2, vision_heads=2, vision_intermediate_size=128,
            text_hidden_size=64, text_layers=2, text_heads=2, text_intermediate_size=128)
CAPTIONS = ["a woven textile with a local defect", "plain fabric", "a textile"]


def _tiny(family: str):
    torch.manual_seed(0)
    model, processor = load_clip(None, ARCH, 64, 64 if family == "siglip" else 77, family=family)
    return model.eval(), processor


def _tokens(processor):
    tok = processor.tokenizer
    return tok(CAPTIONS, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt")


def _reference(family: str, model, pixels, ids):
    """The family's own forward on the same weights."""
    with torch.no_grad():
        if family == "siglip":
            img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(input_ids=ids)
            return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
        return model.oc.encode_image(pixels), model.oc.encode_text(ids)


def _ours(model, pixels, tok):
    with torch.no_grad():
        return (image_features(model, pixels, normalize=False),
                text_features(model, tok["input_ids"], tok["attention_mask"], normalize=False))


@pytest.mark.parametrize("family", ["siglip", "open_clip"])
def test_embeddings_equal_the_family_reference_forward(family):
    model, processor = _tiny(family)
    pixels, tok = torch.randn(3, 3, 64, 64), _tokens(processor)
    img, txt = _ours(model, pixels, tok)
    ref_img, ref_txt = _reference(family, model, pixels, tok["input_ids"])
    assert img.shape == (3, 64) and txt.shape == (3, 64)
    assert_close(img, ref_img, name="image")
    assert_close(txt, ref_txt, name="text")
    # the trainer cuts padding after the longest caption: the family's text spec puts it back
    n = int(tok["attention_mask"].sum(1).max())
    cut = text_features(model, tok["input_ids"][:, :n], tok["attention_mask"][:, :n], normalize=False)
    assert_close(cut, ref_txt, name="packed text")


def test_siglip_logit_init_text_length_and_image_processor():
    model, processor = _tiny("siglip")
    assert type(model).__name__ == "SiglipModel"
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(10.0)) and float(model.logit_bias.detach()) == -10.0
    assert processor.tokenizer.model_max_length == 64 and model.clipexp_text == {"length": 64, "pad_id": processor.tokenizer.pad_token_id, "mask": False}
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5] and processor.image_processor.crop_size["height"] == 64


def test_open_clip_preprocessing_and_tokenizer_from_its_config(tmp_path):
    import open_clip

    model, processor = _tiny("open_clip")
    assert type(model.vision_model.visual).__name__ == "ModifiedResNet"  # a convolutional tower
    raw = open_clip.get_tokenizer("RN50")  # the BPE tokenizer bundled with open_clip
    assert torch.equal(_tokens(processor)["input_ids"], raw(CAPTIONS))
    model.preprocess_cfg.update(mean=[0.1, 0.2, 0.3], std=[0.9, 0.8, 0.7], size=48, interpolation="bilinear")
    model.save_pretrained(tmp_path)
    _, reloaded = load_clip(str(tmp_path))
    ip = reloaded.image_processor
    assert list(ip.image_mean) == [0.1, 0.2, 0.3] and list(ip.image_std) == [0.9, 0.8, 0.7]
    assert ip.crop_size == {"height": 48, "width": 48} and ip.resample == 2


@pytest.mark.parametrize("family", ["siglip", "open_clip"])
def test_saved_layout_reloads_by_path_and_with_the_reference_library(family, tmp_path):
    model, processor = _tiny(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pixels, tok = torch.randn(2, 3, 64, 64), _tokens(processor)
    want_img, want_txt = _ours(model, pixels, tok)
    ours, ours_proc = load_clip(str(tmp_path))
    got_img, got_txt = _ours(ours.eval(), pixels, _tokens(ours_proc))
    assert torch.equal(got_img, want_img) and torch.equal(got_txt, want_txt)
    with torch.no_grad():
        if family == "siglip":
            from transformers import AutoModel

            ref = AutoModel.from_pretrained(str(tmp_path)).eval()
            assert type(ref).__name__ == "SiglipModel"
            img = ref.get_image_features(pixel_values=pixels)
            img = getattr(img, "pooler_output", img)
            txt = ref.get_text_features(input_ids=tok["input_ids"])
            txt = getattr(txt, "pooler_output", txt)
        else:
            import open_clip

            assert (tmp_path / "open_clip_config.json").is_file() and (tmp_path / "open_clip_pytorch_model.bin").is_file()
            ref = open_clip.create_model(f"local-dir:{tmp_path}").eval()
            img, txt = ref.encode_image(pixels), ref.encode_text(tok["input_ids"])
    assert torch.equal(img, want_img) and torch.equal(txt, want_txt)


def test_lora_targets_and_layer_ids_per_family():
    from clipexp.finetune import apply_lora, tower_depths
    from clipexp.finetune.layer_decay import lr_scale

    siglip, _ = _tiny("siglip")
    assert tower_depths(siglip) == {"vision": 2, "text": 2}
    assert lr_scale("vision_model.encoder.layers.1.mlp.fc1.weight", {"vision": 2, "text": 2}, 1.0, 0.5) == ("vision.layer_1", 0.5)
    assert lr_scale("vision_model.head.probe", {"vision": 2}, 1.0, 0.5)[0] == "head"
    assert lr_scale("logit_bias", {}, 1.0, 0.5, logit_scale_lr=0.1) == ("logit_scale", pytest.approx(0.1))
    lora = apply_lora(siglip, 4, 8)
    adapted = {n.split(".lora_")[0] for n, p in lora.named_parameters() if p.requires_grad}
    assert len(adapted) == 2 * 2 * 4  # q, k, v, out in 2 layers of 2 towers; the pooling head's MultiheadAttention is skipped
    assert not any(".head.attention" in n for n in adapted)

    oc, _ = _tiny("open_clip")
    depths = tower_depths(oc)
    assert depths == {"vision": 4, "text": 2}  # ModifiedResNet's 4 stages, 2 text resblocks
    scale = lambda n: lr_scale(n, depths, 1.0, 0.5)  # noqa: E731
    assert scale("vision_model.visual.layer1.0.conv1.weight") == ("vision.layer_0", 0.5 ** 4)
    assert scale("vision_model.visual.conv1.weight") == ("vision.embeddings", 0.5 ** 5)
    assert scale("text_model.transformer.resblocks.1.mlp.c_fc.weight") == ("text.layer_1", 0.5)
    assert scale("text_model.token_embedding.weight") == ("text.embeddings", 0.5 ** 3)
    assert scale("text_model.text_projection")[0] == "head" and scale("vision_model.visual.attnpool.c_proj.weight")[0] == "head"
    lora = apply_lora(oc, 4, 8, ["c_fc", "c_proj"])
    adapted = {n.split(".lora_")[0] for n, p in lora.named_parameters() if p.requires_grad}
    assert adapted == {f"base_model.model.text_model.transformer.resblocks.{i}.mlp.{m}" for i in range(2) for m in ("c_fc", "c_proj")}


def test_open_clip_checkpointing_and_tower_locking():
    from clipexp.models import apply_levers

    model, processor = _tiny("open_clip")
    apply_levers(model, lock_image=True, gradient_checkpointing="text")
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert model.text_model.transformer.grad_checkpointing and all(p.requires_grad for p in model.text_model.parameters())
    model.train()
    tok = _tokens(processor)
    txt = text_features(model, tok["input_ids"], tok["attention_mask"])
    txt.sum().backward()
    assert model.text_model.token_embedding.weight.grad is not None


def _python(code: str, env_extra: dict, timeout: int = 120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_extra}
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    return res, time.monotonic() - start


@pytest.mark.parametrize("offline_env", [{}, {"HF_HUB_OFFLINE": "1"}], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_unreachable_hub_fails_fast_with_one_line_per_family(offline_env, tmp_path):
    """The network is blocked here: every family's hub id costs a few seconds and one line naming the id."""
    code = ("from clipexp.models import load_clip, ModelLoadError\n"
            "for kw in [dict(name_or_path='openai/clip-vit-base-patch32'), dict(name_or_path='google/siglip-base-patch16-224'),\n"
            "           dict(name_or_path=None, family='open_clip', pretrained='hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224')]:\n"
            "    try:\n        load_clip(**kw)\n    except ModelLoadError as e:\n        print('ERR', e)\n")
    env = {"HF_HOME": str(tmp_path / "hf"), **offline_env}  # an empty cache
    res, seconds = _python(code, env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 3, res.stdout + res.stderr[-2000:]
    for line, name in zip(lines, ["openai/clip-vit-base-patch32", "google/siglip-base-patch16-224", "hf-hub:microsoft/BiomedCLIP"]):
        assert name in line and "model=tiny_open_clip" in line
    assert "Retrying" not in res.stderr and "thrown while requesting" not in res.stderr, res.stderr[-2000:]  # no hub retries
    assert seconds < 30, seconds  # three loads, imports included: ~6 s here; SigLIP's adapter lookup alone used to retry ~25 s


def _clipexp(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "CLIPEXP_RUN_STAMP"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "clipexp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("model_name", ["tiny_siglip", "tiny_open_clip"])
def test_four_step_run_saves_reloads_and_predicts(model_name, tmp_path):
    from PIL import Image

    from clipexp.serving.inference import CLIPInference
    from clipexp.serving.predict import main

    res = _clipexp(["experiment=smoke", f"model={model_name}", "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'run'}",
                    "model.lora.r=0"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    model_dir = tmp_path / "run" / "model"
    images = tmp_path / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(80, 80, 3, generator=gen) * 255).byte().numpy()).save(images / f"{i}.png")
    out = tmp_path / "preds.csv"
    assert main(["zero_shot", "--model", str(tmp_path / "run"), "--images", str(images), "--out", str(out), "--no-progress"]) == 0
    import pandas as pd

    assert len(pd.read_csv(out)) == 3

    inf = CLIPInference.from_pretrained(model_dir, device="cpu", precision="fp32")
    crops = [inf.load_image(images / f"{i}.png") for i in range(3)]
    ours_img, ours_txt = inf.encode_images(crops), inf.encode_texts(CAPTIONS)
    from clipexp.data import collate_fn

    pixels = inf.normalize(collate_fn([{"pixel_values": c} for c in crops])["pixel_values"])
    tok = inf.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=inf.spec.max_sequence_length, return_tensors="pt")
    with torch.no_grad():
        if model_name == "tiny_siglip":
            from transformers import AutoModel

            ref = AutoModel.from_pretrained(str(model_dir)).eval()
            img = ref.get_image_features(pixel_values=pixels)
            txt = ref.get_text_features(input_ids=tok["input_ids"])
            img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
        else:
            import open_clip

            ref = open_clip.create_model(f"local-dir:{model_dir}").eval()
            img, txt = ref.encode_image(pixels), ref.encode_text(tok["input_ids"])
    assert_close(ours_img, torch.nn.functional.normalize(img, dim=-1), name="image")
    assert_close(ours_txt, torch.nn.functional.normalize(txt, dim=-1), name="text")


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_quickstart_sweep_over_families_is_one_parent_with_three_children(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = _clipexp(["-m", "experiment=quickstart", "model=tiny,tiny_siglip,tiny_open_clip", "data.max_samples=96",
                    "trainer.batch_size=8", "trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2",
                    "trainer.progress=false", "tracking.pyfunc_model=false", f"tracking.uri={uri}", "tracking.experiment=families"],
                   tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("families").experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "sweep_parent"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["model"] for r in children) == ["tiny", "tiny_open_clip", "tiny_siglip"]
    assert all(r.info.status == "FINISHED" for r in children)
