"""The Hydra config tree: every option composes; every validation error is one line and exit code 2."""

from __future__ import annotations

import pytest

from clipexp.config.reference import config_groups
from clipexp.config.notes import CLIPFinetuningConfig, validate
from clipexp.errors import ConfigError

GROUP_OPTIONS = [(g, o) for g, opts in config_groups().items() for o in opts]


def test_groups_and_options_exist():
    groups = config_groups()
    assert set(groups["model"]) >= {"clip_vit_b32", "clip_vit_b16", "clip_vit_l14", "tiny"}
    assert set(groups["domain"]) == {"general", "medical", "industrial", "scientific"}
    assert set(groups["loss"]) >= {"contrastive", "hard_negative", "domain_specific", "multi_scale", "siglip"}
    assert set(groups["device"]) == {"auto", "cpu", "cuda", "mps"}
    assert set(groups["data"]) >= {"textile", "csv", "json", "folder", "hf"}


def _needs(group, option):
    """Extra overrides an option needs to be valid on its own (a data file path)."""
    if group in ("data", "eval_data") and option in ("csv", "json", "folder", "hf"):
        return [f"{group}.path=/tmp/somewhere"]
    if group == "data" and option == "webdataset":
        return ["data.urls=/tmp/somewhere/train-000000.tar"]
    return []


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_option_composes(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}", *_needs(group, option))
    if group in ("model", "domain"):
        assert cfg[group].name == option
    if group in ("loss", "temperature_schedule"):  # a class and its arguments, instantiated as the trainer does
        from hydra.utils import instantiate

        built = instantiate(cfg[group], **({"initial_temp": 0.07, "total_steps": 10} if group == "temperature_schedule" else {}))
        assert (built.name if group == "loss" else built.schedule_type) == option
    if group == "device":
        assert cfg.device.type == option


def test_domain_flows_into_trainer_and_loss(compose_cfg):
    cfg = compose_cfg("domain=medical", "loss=domain_specific")
    assert cfg.trainer.learning_rate == pytest.approx(3e-5)
    assert cfg.trainer.num_epochs == 15
    assert cfg.loss.domain == "medical"
    assert cfg.domain.prompt_templates[0] == "a histopathology slide showing {}."
    assert cfg.domain.augmentation.hflip is False and cfg.domain.augmentation.color_jitter == 0.0
    for name, lr, epochs in [("industrial", 5e-5, 12), ("scientific", 4e-5, 10)]:
        cfg = compose_cfg(f"domain={name}")
        assert (cfg.trainer.learning_rate, cfg.trainer.num_epochs) == (pytest.approx(lr), epochs)
    # the command line wins over the domain
    assert compose_cfg("domain=medical", "trainer.learning_rate=1e-4").trainer.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("model", ["siglip_base", "siglip2_base", "tiny_siglip"])
def test_siglip_family_trains_with_the_sigmoid_loss_unless_another_is_chosen(compose_cfg, model):
    siglip, contrastive = "clipexp.losses.SigLIPLoss", "clipexp.losses.CLIPContrastiveLoss"
    assert compose_cfg(f"model={model}").loss._target_ == siglip
    assert compose_cfg(f"model={model}", "loss=contrastive").loss._target_ == contrastive
    assert compose_cfg("experiment=quickstart", f"model={model}").loss._target_ == contrastive  # the preset names its loss
    assert compose_cfg("model=tiny").loss._target_ == compose_cfg("model=tiny_open_clip").loss._target_ == contrastive


def test_trainer_keys_override(compose_cfg):
    cfg = compose_cfg("trainer.max_steps=50", "trainer.batch_size=4", "seed=7")
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.seed) == (50, 4, 7)
    assert cfg.trainer.batch_size is not None and compose_cfg().trainer.batch_size is None


@pytest.mark.parametrize(
    "args,message",
    [
        (["domain=foo"], "clipexp: error: domain='foo' is invalid: one of general, industrial, medical, scientific"),
        (["loss=nope"], "clipexp: error: loss='nope' is invalid: one of contrastive, domain_specific, hard_negative, multi_scale, siglip"),
        (["trainer.learning_rate=0"], "clipexp: error: trainer.learning_rate=0.0 is invalid: a number > 0"),
        (["trainer.learning_rate=-1e-3"], "clipexp: error: trainer.learning_rate=-0.001 is invalid: a number > 0"),
        (["data.train_split=0.5"], "clipexp: error: data.train_split+val_split+test_split=0.7 is invalid: the three splits must sum to 1"),
        (["trainer.batch_size=0"], "clipexp: error: trainer.batch_size=0 is invalid: null (automatic) or an integer >= 1"),
        (["device=tpu"], "clipexp: error: device='tpu' is invalid: one of auto, cpu, cuda, mps"),
        (["loss=hard_negative", "loss.mining_strategy=easy"], "clipexp: error: loss.mining_strategy='easy' is invalid: one of semi-hard, "
                                                              "hard, weighted"),
        (["loss.mining_strategy=easy"], "clipexp: error: loss.mining_strategy=easy: no such config key; the keys of loss: temperature, "
                                        "learnable_temp, multi_positive, use_model_logit_scale (`clipexp train --help-all` lists every key)"),
        (["temperature_schedule=linear"], "clipexp: error: temperature_schedule='linear' is invalid: one of adaptive, constant, cosine, "
                                          "exponential, warmup"),
        (["temperature_schedule=cosine", "loss.learnable_temp=true"], "clipexp: error: temperature_schedule='cosine' is invalid: constant "
                                                                      "when loss.learnable_temp=true (a schedule would overwrite the learnt "
                                                                      "temperature): set loss.learnable_temp=false to schedule it"),
        (["data=hf"], "clipexp: error: data.path=None is invalid: required for data.source=hf: a dataset folder saved with save_to_disk, "
                      "or a hub name"),
        (["domain.name=foo"], "clipexp: error: domain.name='foo' is invalid: one of general, medical, industrial, scientific"),
        (["trainer.max_step=1"], "clipexp: error: trainer.max_step=1: no such config key; did you mean trainer.max_steps? "
                                 "(`clipexp train --help-all` lists every key)"),
        (["data=csv"], "clipexp: error: data.path=None is invalid: required for data.source=csv: the csv file or folder"),
        (["data=webdataset"], "clipexp: error: data.urls=None is invalid: shard paths or a brace pattern are required for data=webdataset, "
                              "e.g. /data/shards/train-{000000..000009}.tar"),
        (["model.image_interpolation=lanczos"], "clipexp: error: model.image_interpolation='lanczos' is invalid: one of bicubic, bilinear, nearest"),
    ],
)
def test_validation_errors_are_one_line_exit_2(run_cli, args, message):
    res = run_cli(*args, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == message
    assert "Traceback" not in res.stderr


def test_wrong_type_is_one_line(run_cli):
    res = run_cli("trainer.learning_rate=abc", timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.learning_rate=abc" in lines[0] and "Float" in lines[0]


def test_unknown_option_in_a_sweep_is_caught(run_cli):
    res = run_cli("-m", "loss=contrastive,bogus", timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().endswith("loss='bogus' is invalid: one of contrastive, domain_specific, hard_negative, multi_scale, siglip")


def test_cfg_job_prints_composed_config(run_cli):
    res = run_cli("--cfg", "job", "domain=medical", "loss=hard_negative", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "name: medical" in res.stdout and "_target_: clipexp.losses.HardNegativeMiningLoss" in res.stdout
    assert "mining_strategy: semi-hard" in res.stdout and "learning_rate: 3.0e-05" in res.stdout


def test_help_lists_groups_and_options(run_cli):
    res = run_cli("--help", timeout=120)
    assert res.returncode == 0
    for token in ("clip_vit_b16, clip_vit_b32*, clip_vit_l14, open_clip, siglip2_base, siglip_base, tiny, tiny_open_clip, tiny_siglip",
                  "general*, industrial, medical, scientific", "csv, folder, hf, json, textile*, webdataset", "auto*, cpu, cuda, mps"):
        assert token in res.stdout


def test_conf_found_from_any_directory(run_cli, tmp_path):
    res = run_cli("--cfg", "job", "model=tiny", cwd=tmp_path / ".." , timeout=120)
    assert res.returncode == 0 and "name: tiny" in res.stdout


def test_typed_view_round_trip(compose_cfg):
    from omegaconf import OmegaConf

    from clipexp.config.notes import to_typed

    composed = compose_cfg("domain=industrial", "loss=hard_negative", "temperature_schedule=cosine", "trainer.batch_size=16")
    typed = to_typed(composed)
    assert (typed.domain, typed.loss_type, typed.batch_size, typed.learning_rate) == ("industrial", "hard_negative", 16, 5e-5)
    assert typed.temperature_schedule_type == "cosine"
    assert CLIPFinetuningConfig.from_dict(typed.to_dict()) == typed
    nested = typed.to_run_dict()
    validate(OmegaConf.create(nested), check_files=False)
    assert nested["trainer"]["batch_size"] == 16 and nested["loss"]["_target_"] == "clipexp.losses.HardNegativeMiningLoss"


def test_typed_view_is_the_composed_config(compose_cfg):
    """The notes' flat config stands for exactly what the command line composes: same defaults, same files."""
    from omegaconf import OmegaConf

    for flat, overrides in [({}, []), ({"domain": "medical", "loss_type": "domain_specific"}, ["domain=medical", "loss=domain_specific"]),
                            ({"loss_type": "multi_scale", "temperature": 0.05}, ["loss=multi_scale", "loss.base_temperature=0.05"])]:
        composed = OmegaConf.to_container(compose_cfg(*overrides), resolve=True)
        typed = CLIPFinetuningConfig(**flat).to_run_dict()
        for section in ("loss", "temperature_schedule", "domain", "data", "device", "tracking"):
            assert typed[section] == composed[section], section
        differ = {k for k in composed["trainer"] if typed["trainer"][k] != composed["trainer"][k]}
        assert differ <= {"learning_rate", "num_epochs"}, differ  # the flat fields' own defaults (5e-5, 10 epochs) are explicit


def test_typed_view_validates():
    with pytest.raises(ConfigError, match=r"^learning_rate|trainer.learning_rate=0 is invalid"):
        CLIPFinetuningConfig(learning_rate=0)
    with pytest.raises(ConfigError, match="domain='dental' is invalid: one of general, industrial, medical, scientific"):
        CLIPFinetuningConfig(domain="dental")
    with pytest.raises(ConfigError, match="a field of CLIPFinetuningConfig"):
        CLIPFinetuningConfig.from_dict({"learning_rat": 1e-4})
    cfg = CLIPFinetuningConfig(domain="medical", learning_rate=3e-5, batch_size=16, num_epochs=15, use_mps=True, mixed_precision=True)
    assert cfg.to_dict()["batch_size"] == 16
