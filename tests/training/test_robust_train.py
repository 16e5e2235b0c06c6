"""Robust fine-tuning through the trainer (``clipexp.training.trainer``): WiSE-FT, two-stage, EMA resume, LoRA, layer decay.

Real textile images, the tiny model, a real SQLite MLflow store; each run is the 4-step smoke preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SMOKE = ["experiment=smoke", "device=cpu", "data.max_samples=60", "trainer.keep_last=10"]
RETENTION = ["eval_data=textile", "eval_data.max_samples=48", 'eval_data.prompt_templates=["a photo of {}."]']
STAGE1 = [*SMOKE, *RETENTION, "trainer.monitor=val/loss", "trainer.monitor_mode=min", "trainer.eval_steps=4"]


def _train(overrides, out: Path):
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import train

    return train(compose_and_validate(list(overrides)), output_dir=out)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """One fine-tuning run with WiSE-FT over three alphas and a retention set, tracked in SQLite."""
    tmp = tmp_path_factory.mktemp("stage1")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    results = _train([*STAGE1, "trainer.wise_ft.alphas=[0,0.5,1]", "trainer.wise_ft.select=1", f"tracking.uri={store}"], tmp / "run")
    return tmp / "run", results, store


def _val_and_retention(metrics):
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "retention/"))}


def test_wise_ft_end_points_are_exactly_the_start_and_the_finetuned_model(stage1):
    _, results, _ = stage1
    points = results["wise_ft"]["alphas"]
    assert list(points) == ["alpha_0.00", "alpha_0.50", "alpha_1.00"]
    assert results["best"]["val/loss"] < results["baseline"]["val/loss"]  # fine-tuning moved: the ends differ
    # alpha 0: the start model's step-0 metrics; alpha 1: the fine-tuned (best) checkpoint's; exactly
    assert points["alpha_0.00"] == _val_and_retention(results["baseline"])
    assert points["alpha_1.00"] == _val_and_retention(results["best"])
    assert points["alpha_0.50"]["val/loss"] not in (points["alpha_0.00"]["val/loss"], points["alpha_1.00"]["val/loss"])
    assert set(points["alpha_0.50"]) >= {"val/zeroshot_balanced_acc", "retention/zeroshot_balanced_acc", "retention/t2i_R1"}


def test_wise_ft_is_logged_plotted_and_the_selected_alpha_is_saved(stage1):
    from mlflow.tracking import MlflowClient

    run_dir, results, store = stage1
    assert results["wise_ft"]["selected"] == 1.0
    assert (run_dir / "plots" / "wise_ft.png").is_file()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["wise_ft"]["alphas"]["alpha_0.50"] == results["wise_ft"]["alphas"]["alpha_0.50"]
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    m = run.data.metrics
    assert m["wise_ft/alpha_0.50/val/zeroshot_balanced_acc"] == results["wise_ft"]["alphas"]["alpha_0.50"]["val/zeroshot_balanced_acc"]
    assert m["wise_ft/alpha_0.00/retention/zeroshot_balanced_acc"] == results["baseline"]["retention/zeroshot_balanced_acc"]
    assert m["wise_ft/selected_alpha"] == 1.0
    assert [x.step for x in client.get_metric_history(run.info.run_id, "retention/zeroshot_acc")] == [0, 4]
    assert "plots/wise_ft.png" in [f.path for f in client.list_artifacts(run.info.run_id, "plots")]


def test_stage_two_baseline_is_the_stage_one_model(stage1, tmp_path):
    run_dir, first, _ = stage1
    # stage 2 names stage 1's run folder (its model/ is loaded): the step-0 baseline is that model's zero-shot
    second = _train([*STAGE1, f"model.name_or_path={run_dir}", "trainer.max_steps=1", "tracking.enabled=false"], tmp_path / "stage2")
    assert _val_and_retention(second["baseline"]) == _val_and_retention(first["best"])
    from_model_dir = _train([*STAGE1, f"model.name_or_path={run_dir / 'model'}", "trainer.max_steps=1", "tracking.enabled=false",
                             "trainer.eval_steps=1"], tmp_path / "stage2b")
    assert from_model_dir["baseline"] == second["baseline"]


def test_ema_is_evaluated_checkpointed_and_resumes_bit_exactly(tmp_path):
    ema = [*SMOKE, "trainer.ema.decay=0.5", "tracking.enabled=false", "trainer.monitor=ema/val/loss", "trainer.monitor_mode=min"]
    straight = _train(ema, tmp_path / "straight")
    assert {"ema/val/loss", "ema/val/zeroshot_acc", "val/loss"} <= set(straight["final"])
    assert straight["final"]["ema/val/loss"] != straight["final"]["val/loss"]
    _train([*ema, f"trainer.resume={tmp_path / 'straight' / 'checkpoints' / 'step_0000002.pt'}"], tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step_0000004.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step_0000004.pt", weights_only=False)
    assert a["robust"]["ema"]["num_updates"] == b["robust"]["ema"]["num_updates"] == 4
    shadow_a, shadow_b = a["robust"]["ema"]["shadow"], b["robust"]["ema"]["shadow"]
    assert set(shadow_a) == set(a["model"])  # every weight of the tiny CLIP trains, so every one is averaged
    assert set(shadow_a) == set(shadow_b) and all(torch.equal(shadow_a[k], shadow_b[k]) for k in shadow_a)
    # ema/... monitored: the best checkpoint holds the EMA weights, and the saved model is them
    from transformers import CLIPModel

    best = torch.load(tmp_path / "straight" / "checkpoints" / "best.pt", weights_only=False)
    assert best["monitor"] == "ema/val/loss" and best["step"] == 4  # the EMA's val loss fell at every evaluation
    saved = CLIPModel.from_pretrained(tmp_path / "straight" / "model").state_dict()
    assert all(torch.equal(saved[k], shadow_a[k]) for k in shadow_a)  # = the EMA weights of step 4
    assert not torch.equal(saved["visual_projection.weight"], a["model"]["visual_projection.weight"])  # not the raw ones


def test_lora_trains_adapters_only_and_saves_a_small_checkpoint_and_a_merged_model(tmp_path):
    from transformers import CLIPModel

    from clipexp.models.clip import ArchitectureConfig, build_model

    _train([*SMOKE, "model.lora.r=4", "model.lora.alpha=8", "tracking.enabled=false", "trainer.learning_rate=0.05"], tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step_0000004.pt", weights_only=False)
    assert ckpt["model"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["model"])  # adapters only
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"]) == 32                 # AdamW state for the adapters alone
    merged = CLIPModel.from_pretrained(tmp_path / "run" / "model")                    # plain CLIP, LoRA folded in
    from clipexp.training.checkpoint import seed_everything

    seed_everything(42)  # the start model, built as the trainer built it (seed 42)
    start = build_model(ArchitectureConfig(), 64, 77).state_dict()
    got = merged.state_dict()
    assert set(got) == set(start)
    changed = {k for k in start if not torch.equal(start[k], got[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "out_proj") for k in changed), sorted(changed)


def test_layer_decay_head_and_temperature_rates_in_the_trainer(compose_cfg, tmp_path):
    from clipexp.training.trainer import Trainer

    cfg = compose_cfg(*SMOKE, "tracking.enabled=false", "trainer.layer_decay=0.5", "trainer.head_lr=2e-3",
                      "trainer.logit_scale_lr=1e-2", "loss.learnable_temp=true", "trainer.max_steps=1")
    trainer = Trainer(cfg, tmp_path / "run").setup()
    try:
        trainer.train()  # warmup_steps=1: step 0 runs at the full base rate 1e-3
        lr = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
        named = dict(trainer.model.named_parameters())
        by_hand = {  # L = 2 layers per tower, decay 0.5
            "vision_model.embeddings.patch_embedding.weight": 1.25e-4, "text_model.embeddings.position_embedding.weight": 1.25e-4,
            "vision_model.encoder.layers.0.mlp.fc1.weight": 2.5e-4, "text_model.encoder.layers.0.self_attn.v_proj.bias": 2.5e-4,
            "vision_model.encoder.layers.1.self_attn.q_proj.weight": 5e-4, "text_model.encoder.layers.1.layer_norm1.weight": 5e-4,
            "vision_model.post_layernorm.bias": 1e-3, "text_model.final_layer_norm.weight": 1e-3,
            "visual_projection.weight": 2e-3, "text_projection.weight": 2e-3, "logit_scale": 1e-2,
        }
        for name, want in by_hand.items():
            assert lr[id(named[name])] == want, name
        assert lr[id(trainer.loss_fn.logit_scale)] == 1e-2  # the loss's learnable temperature
    finally:
        trainer.cleanup()


def test_lora_dropout_turns_caption_dedup_off():
    # one dropout mask would be drawn for every copy of a deduplicated caption: the trainer must encode each
    from clipexp.finetune.lora import apply_lora
    from clipexp.models.clip import ArchitectureConfig, build_model
    from clipexp.training.data import text_has_dropout

    assert not text_has_dropout(apply_lora(build_model(ArchitectureConfig(), 32, 16), r=2, alpha=2))
    assert text_has_dropout(apply_lora(build_model(ArchitectureConfig(), 32, 16), r=2, alpha=2, dropout=0.1))
