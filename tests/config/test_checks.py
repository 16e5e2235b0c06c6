"""Up-front checks: trainer.monitor against the metrics the run logs, unknown keys with the nearest one
suggested, paths that must exist (one line each, exit code 2, before the model loads), and the step-based
settings scaled to a short run with one warning."""

from __future__ import annotations

import logging
import re

import pytest
from omegaconf import OmegaConf

from clipexp.config.compose import check_command_line
from clipexp.config.validate import eval_metric_names, known_keys
from clipexp.errors import ConfigError
from clipexp.evaluate import split_metric_names


def test_monitor_names_come_from_the_metric_functions(compose_cfg):
    names = eval_metric_names(compose_cfg("model=tiny"))
    assert names == [f"val/{m}" for m in split_metric_names()]
    assert {"val/t2i_R1", "val/mean_R1", "val/loss", "val/zeroshot_balanced_acc", "val/i2t_median_rank"} <= set(names)
    ema = eval_metric_names(compose_cfg("model=tiny", "trainer.ema.decay=0.99", "eval_data=textile"))
    assert {"ema/val/t2i_R1", "retention/zeroshot_acc", "ema/retention/loss"} <= set(ema)
    unlabelled = eval_metric_names(compose_cfg("data=csv", "data.path=x.csv", "data.label_column=null"))
    assert "val/t2i_R1" in unlabelled and not any("zeroshot" in n for n in unlabelled)


@pytest.mark.parametrize("overrides,message", [
    (["trainer.monitor=val/acc"], r"^trainer.monitor='val/acc' is invalid: did you mean val/zeroshot_acc\? a metric each evaluation "
                                  r"logs: val/loss, val/i2t_R1, .*val/zeroshot_balanced_acc$"),
    (["trainer.monitor=val/loss"], r"^trainer.monitor_mode='max' is invalid: min for trainer.monitor=val/loss \(lower is better\)$"),
    (["trainer.monitor=val/t2i_R1", "trainer.monitor_mode=min"], r"^trainer.monitor_mode='min' is invalid: max for .* \(higher is better\)$"),
    (["trainer.monitor=ema/val/t2i_R1"], r"^trainer.monitor='ema/val/t2i_R1' is invalid: .*needs trainer.ema.decay"),
    (["trainer.ema.decay=0.9", "trainer.monitor=ema/val/t2i_R"], r"did you mean ema/val/t2i_R\d\? .* \(and ema/val/...\)$"),
    (["eval_data=textile", "trainer.monitor=retention/zeroshot"], r"did you mean retention/zeroshot_acc\? .* \(and retention/...\)$"),
    (["data=csv", "data.path=x.csv", "data.label_column=null", "trainer.monitor=val/zeroshot_acc"],
     r"zero-shot metrics need class labels and this data has none"),
])
def test_monitor_is_checked_against_what_the_run_logs(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_cfg("model=tiny", *overrides)


@pytest.mark.parametrize("overrides,monitor,mode", [
    (["experiment=quickstart"], "val/zeroshot_balanced_acc", "max"),
    (["experiment=smoke"], "val/t2i_R1", "max"),
    (["model=tiny", "trainer.ema.decay=0.5", "trainer.monitor=ema/val/loss", "trainer.monitor_mode=min"], "ema/val/loss", "min"),
    (["model=tiny", "eval_data=textile", "trainer.monitor=retention/zeroshot_acc"], "retention/zeroshot_acc", "max"),
])
def test_monitors_the_presets_use_pass(compose_cfg, overrides, monitor, mode):
    """Each is accepted, and is a metric that every evaluation of that run logs (so best.pt and early stopping have it)."""
    cfg = compose_cfg(*overrides)
    assert (cfg.trainer.monitor, cfg.trainer.monitor_mode) == (monitor, mode)
    assert monitor in eval_metric_names(cfg)


def test_known_keys_reach_optional_sections():
    keys = known_keys()
    assert {"trainer.ema.decay", "eval_data.path", "eval_data.name", "model.architecture", "model.lora.r", "seed"} <= set(keys)
    assert keys["trainer"] and not keys["trainer.max_steps"]


@pytest.mark.parametrize("override,message", [
    ("trainer.warmup_step=5", "trainer.warmup_step=5: no such config key; did you mean trainer.warmup_steps?"),
    ("traner.max_steps=5", "traner.max_steps=5: no such config key; did you mean trainer.max_steps?"),
    ("trainer.lerning_rate=1e-4,1e-3", "trainer.lerning_rate=1e-4,1e-3: no such config key; did you mean trainer.learning_rate?"),
    ("trainer.foo=1", "trainer.foo=1: no such config key; the keys of trainer: learning_rate, batch_size,"),
])
def test_unknown_keys_name_the_nearest(override, message):
    with pytest.raises(ConfigError) as info:
        check_command_line([override])
    assert str(info.value).startswith(message) and str(info.value).endswith("(`clipexp train --help-all` lists every key)")


@pytest.mark.parametrize("known,misspelt,message", [
    ("trainer.max_steps=3", "trainer.max_step=3", "did you mean trainer.max_steps?"),
    ("model.architecture.vision_hidden_size=32", "model.architectur.vision_hidden_size=32", "did you mean model.architecture"),
    ("loss.temperature=0.03,0.07", "loss.temprature=0.03,0.07", "did you mean loss.temperature?"),
    ("temperature_schedule=cosine temperature_schedule.min_temp=0.02", "temperature_schedule=cosine temperature_schedule.min_tmp=0.02",
     "did you mean temperature_schedule.min_temp?"),
    ("loss=multi_scale loss.base_temperature=0.05", "loss=multi_scale loss.temperature=0.05", "did you mean loss.base_temperature?"),
    ("loss=siglip loss.init_bias=-5", "loss.siglip_init_bias=-5", "it moved: use loss.init_bias"),
    ("temperature_schedule=warmup", "loss.temperature_schedule=warmup", "it moved: use temperature_schedule=<option>"),
])
def test_keys_pass_where_a_near_miss_is_named(known, misspelt, message):
    """Each known key (schema keys, the chosen loss's and schedule's arguments, sweeps, additions) passes, and the
    near miss beside it is refused naming the right one: the check knows which keys each loss has."""
    check_command_line(["experiment=smoke", "+trainer.extra=1", "hydra.run.dir=x", "hydra/launcher=joblib", *known.split()])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_command_line(["experiment=smoke", *misspelt.split()])


@pytest.mark.parametrize("args,message", [
    (["trainer.foo=1"], "clipexp: error: trainer.foo=1: no such config key; the keys of trainer: learning_rate, "),
    (["trainer.warmup_step=5"], "clipexp: error: trainer.warmup_step=5: no such config key; did you mean trainer.warmup_steps? "
                                "(`clipexp train --help-all` lists every key)"),
    (["-m", "trainer.lerning_rate=1e-4,1e-3"], "clipexp: error: trainer.lerning_rate=1e-4,1e-3: no such config key; did you mean "
                                               "trainer.learning_rate?"),
    (["trainer.monitor=val/acc"], "clipexp: error: trainer.monitor='val/acc' is invalid: did you mean val/zeroshot_acc? "),
    (["data=csv", "data.path=missing.csv"], "clipexp: error: data.path='missing.csv' is invalid: an existing CSV file ("),
    (["data=folder", "data.path=/no/such/folder"], "clipexp: error: data.path='/no/such/folder' is invalid: an existing folder"),
    (["model.name_or_path=./my-model"], "clipexp: error: model.name_or_path='./my-model' is invalid: a hub id or an existing local "
                                        "folder (this path does not exist)"),
    (["trainer.resume=/no/run/step_0000004.pt"], "clipexp: error: trainer.resume='/no/run/step_0000004.pt' is invalid: latest, "
                                                 "latest_or_new, or an existing run folder or checkpoint file"),
    (["eval_data.path=/tmp"], "clipexp: error: eval_data.path: there is no eval_data section to set; choose one first, e.g. "
                              "eval_data=csv (one of csv, folder, textile)"),
    (["trainer.adam_beta2=1.0"], "clipexp: error: trainer.adam_beta2=1.0 is invalid: a number in [0, 1), e.g. 0.98"),
])
def test_cli_errors_are_one_line_before_the_model_loads(run_cli, args, message):
    res = run_cli(*args, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr[-2000:]


# ------------------------------------------------------------------------------- step-based settings
def _trainer(**values):
    t = OmegaConf.create({"max_steps": 300, "num_epochs": 1, "warmup_steps": 500, "eval_steps": 500, "save_steps": 1000, **values})
    OmegaConf.set_readonly(t, True)  # as a composed config may be: the plan is computed, the config never rewritten
    return t


def test_step_settings_that_do_not_fit_are_scaled_with_one_warning(caplog):
    from clipexp.training.optim import plan_steps

    t = _trainer()
    with caplog.at_level(logging.WARNING, logger="clipexp.training.optim"):
        plan = plan_steps(t, steps_per_epoch=25)
    assert (plan.total_steps, plan.warmup_steps, plan.eval_steps, plan.save_steps, plan.epochs) == (300, 30, 300, 300, 12.0)
    assert (t.warmup_steps, t.eval_steps, t.save_steps) == (500, 500, 1000)
    assert [r.getMessage() for r in caplog.records] == [
        "this run has 300 steps; settings that did not fit are scaled: trainer.warmup_steps 500 -> 30 (10% of the steps), "
        "trainer.eval_steps 500 -> 300 (an evaluation at the last step only), trainer.save_steps 1000 -> 300 (a checkpoint at "
        "the last step only); set them below 300 to choose"]


def test_step_settings_that_fit_are_left_alone(caplog):
    from clipexp.training.optim import plan_steps

    with caplog.at_level(logging.WARNING, logger="clipexp.training.optim"):
        plan = plan_steps(_trainer(warmup_steps=30, eval_steps=100, save_steps=300), steps_per_epoch=25)
    assert (plan.warmup_steps, plan.eval_steps, plan.save_steps) == (30, 100, 300) and not caplog.records
    plan = plan_steps(_trainer(max_steps=4, warmup_steps=0, eval_steps=2, save_steps=2), steps_per_epoch=12)  # experiment=smoke-like
    assert (plan.total_steps, plan.warmup_steps, plan.eval_steps, plan.save_steps) == (4, 0, 2, 2)
    plan = plan_steps(_trainer(max_steps=None, num_epochs=3), steps_per_epoch=25)  # num_epochs when max_steps is null
    assert (plan.total_steps, plan.epochs) == (75, 3.0)
