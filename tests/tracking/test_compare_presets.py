"""The comparison presets (losses, temperature schedules) and the sweep summary's mean/std over seeds."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from builders import loss_config
from test_sweeps import clipexp, parent_and_children, store_uri

LOSSES = ["contrastive", "hard_negative", "domain_specific", "multi_scale", "siglip"]
SCHEDULES = ["constant", "warmup", "cosine", "exponential", "adaptive"]


def compose_with_hydra(*overrides):
    """The composed config with its ``hydra`` node (where the sweep's params live)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from clipexp.config.schema import register_configs
    from clipexp.paths import CONF_DIR

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset, key, values", [
    ("compare_losses", "loss", LOSSES),
    ("compare_temperature_schedules", "temperature_schedule", SCHEDULES),
])
def test_comparison_presets_sweep_settings_times_three_seeds(preset, key, values):
    cfg = compose_with_hydra(f"experiment={preset}")
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = dict(cfg.hydra.sweeper.params)
    assert params == {key: ",".join(values), "seed": "0,1,2"} and list(params)[0] == "seed"  # seed-major job order
    assert cfg.tracking.experiment == preset


def test_every_compare_losses_job_is_the_quick_start_with_its_loss(compose_cfg):
    quick = compose_cfg("experiment=quickstart")
    for loss in LOSSES:
        job = compose_cfg("experiment=compare_losses", f"loss={loss}", "seed=1")  # what the sweeper composes
        assert job.loss._target_ == loss_config(loss)["_target_"] and job.seed == 1
        assert job.loss.learnable_temp is True
        assert job.model == quick.model and job.trainer == quick.trainer and job.data == quick.data
        assert job.domain.name == "industrial"
    assert compose_cfg("experiment=compare_losses", "loss=siglip").loss.temperature == 0.1  # SigLIP's own start


def test_every_temperature_schedule_job_validates(compose_cfg):
    quick = compose_cfg("experiment=quickstart")
    for schedule in SCHEDULES:
        job = compose_cfg("experiment=compare_temperature_schedules", f"temperature_schedule={schedule}", "seed=2")
        assert job.temperature_schedule.schedule_type == schedule and job.loss.learnable_temp is False
        assert job.loss.temperature == 0.07 and job.loss._target_ == "clipexp.losses.CLIPContrastiveLoss"
        assert job.temperature_schedule.get("warmup_steps", 60) == 60  # 10% of the quick start's steps where it applies
        assert job.trainer == quick.trainer and job.model == quick.model


def test_setting_summary_means_and_stds_over_seeds():
    from clipexp.tracking.sweep import setting_summary

    m = "val/zeroshot_balanced_acc"
    jobs = [  # handmade rows as child_rows makes them: two losses x two temperatures, three seeds each, one failure
        ("contrastive", "0.05", 0, 0.60, 0.55, "FINISHED"), ("contrastive", "0.05", 1, 0.70, 0.65, "FINISHED"),
        ("contrastive", "0.05", 2, 0.80, 0.60, "FINISHED"),
        ("siglip", "0.05", 0, 0.50, 0.40, "FINISHED"), ("siglip", "0.05", 1, 0.90, 0.80, "FINISHED"),
        ("siglip", "0.05", 2, None, None, "FAILED"),
        ("siglip", "0.1", 0, 0.75, 0.70, "FINISHED"),
    ]
    table = pd.DataFrame([{"job": i, "status": st, "loss": loss, "loss.temperature": t, "seed": s,
                           f"best {m}": b, f"test/zeroshot_balanced_acc": te} for i, (loss, t, s, b, te, st) in enumerate(jobs)])
    out = setting_summary(table, ["loss", "loss.temperature", "seed"], m)
    assert list(out.columns[:4]) == ["loss", "loss.temperature", "seeds", "failed"]
    got = {(r["loss"], r["loss.temperature"]): r for _, r in out.iterrows()}
    assert list(got) == [("contrastive", "0.05"), ("siglip", "0.05"), ("siglip", "0.1")]
    c, s, one = got[("contrastive", "0.05")], got[("siglip", "0.05")], got[("siglip", "0.1")]
    assert (c["seeds"], c["failed"], s["seeds"], s["failed"], one["seeds"], one["failed"]) == (3, 0, 2, 1, 1, 0)
    assert c[f"mean best {m}"] == pytest.approx(0.7, rel=1e-12)
    assert c[f"std best {m}"] == pytest.approx(0.1, rel=1e-12)                  # sqrt((0.01 + 0 + 0.01) / 2)
    assert c["mean test/zeroshot_balanced_acc"] == pytest.approx(0.6, rel=1e-12)
    assert c["std test/zeroshot_balanced_acc"] == pytest.approx(0.05, rel=1e-12)  # sqrt((0.0025 + 0.0025) / 2)
    assert s[f"mean best {m}"] == pytest.approx(0.7, rel=1e-12)
    assert s[f"std best {m}"] == pytest.approx(math.sqrt(0.08), rel=1e-12)     # the failed seed is left out
    assert s["mean test/zeroshot_balanced_acc"] == pytest.approx(0.6, rel=1e-12)
    assert one[f"mean best {m}"] == pytest.approx(0.75, rel=1e-12) and pd.isna(one[f"std best {m}"])


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_two_losses_by_two_seeds_sweep_reports_mean_and_std_per_loss(tmp_path):
    res = clipexp(["-m", "experiment=smoke", "trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2",
                   "loss=contrastive,siglip", "seed=0,1", f"tracking.uri={store_uri(tmp_path)}"], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    client, parent, children = parent_and_children(store_uri(tmp_path))
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    by_loss = {}
    for c in children:
        by_loss.setdefault(c.data.tags["loss"], []).append(c.data.metrics)
    path = client.download_artifacts(parent.info.run_id, "sweep_summary_by_setting.csv", str(tmp_path / "dl"))
    settings = pd.read_csv(path)
    assert list(settings["loss"]) == ["contrastive", "siglip"] and list(settings["seeds"]) == [2, 2]
    for _, row in settings.iterrows():
        for col, metric in (("best val/t2i_R1", "best/val/t2i_R1"), ("test/t2i_R1", "test/t2i_R1")):
            vals = pd.Series([m[metric] for m in by_loss[row["loss"]]])
            assert row[f"mean {col}"] == pytest.approx(vals.mean(), rel=1e-9, abs=1e-12)
            assert row[f"std {col}"] == pytest.approx(vals.std(ddof=1), rel=1e-9, abs=1e-12)
    jobs = pd.read_csv(client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(tmp_path / "dl2")))
    assert sorted(jobs["loss"]) == ["contrastive", "contrastive", "siglip", "siglip"]  # a group's value, from the overrides
    text = open(client.download_artifacts(parent.info.run_id, "sweep_summary.md", str(tmp_path / "dl3"))).read()
    assert "Mean and std (n - 1) over seeds per setting:" in text and "| contrastive | 2 | 0 |" in text


@pytest.mark.slow  # over 12 s: CI runs it after the suite
def test_quality_benchmark_candidates_compose_and_the_preset_takes_open_clips_augmentation(compose_cfg):
    import importlib.util

    from test_sweeps import ROOT

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    preset = compose_cfg("experiment=quickstart", "tracking.enabled=false")
    aug = preset.domain.augmentation  # open_clip_train's augmentation: a crop of 0.9-1 of the area, nothing else
    assert (aug.crop_scale_min, aug.hflip, aug.vflip, aug.rotation_degrees, aug.color_jitter) == (0.9, False, False, 0, 0)
    assert quality.CANDIDATES["preset"] == []
    for name, overrides in quality.CANDIDATES.items():
        cfg = compose_cfg("experiment=quickstart", *overrides, "tracking.enabled=false")  # every candidate is valid
        assert (cfg == preset) == (name == "preset"), name
    assert compose_cfg("experiment=quickstart", *quality.CANDIDATES["previous"]).domain.augmentation.crop_scale_min == 0.85
