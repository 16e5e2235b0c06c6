"""Every check of a run config, in one place, before anything loads.

OmegaConf already rejects values of the wrong type while composing (the schema in :mod:`clipexp.config.schema`).
:func:`validate` then checks the rest once, up front, and raises :class:`~clipexp.errors.ConfigError` naming the
key, the bad value and what is allowed:

* the range of every value (:data:`RULES`), and the keys that depend on each other (splits summing to 1, a
  temperature schedule beside a learnt temperature, WiSE-FT, LoRA, EMA, ``eval_data``);
* the loss and the temperature schedule: ``_target_`` names the class, every other key must be one of its
  constructor's arguments (the nearest one is suggested), and the arguments with a range are checked;
* ``trainer.monitor``: a metric each evaluation logs (the names come from
  :func:`clipexp.evaluate.split_metric_names`, so they cannot drift from what is logged), with the
  ``monitor_mode`` that fits it;
* the files and folders the run reads exist (the data, a local model, a checkpoint to resume).

Two checks read a command line rather than a config, and run before it is composed: every ``group=option``
names a file of that group (:func:`check_group_options`), every ``key=value`` a key of the schema or of the
chosen loss or schedule (:func:`check_override_keys`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from clipexp.config.schema import EvalDataConfig, RunConfig
from clipexp.errors import ConfigError, UsageError
from clipexp.evaluate import LOWER_IS_BETTER, split_metric_names
from clipexp.heads import check_options as check_eval_options
from clipexp.names import (
    ACCUMULATION,
    CACHE_MODES,
    DEVICES,
    DOMAINS,
    INTERPOLATION_NAMES,
    MINING_STRATEGIES,
    MONITOR_MODES,
    ON_ERROR,
    PRECISIONS,
    SCHEDULES,
    SOURCES,
)

EMA = "ema/"
EVAL_SPLITS = ("val", "test", "all")

# --------------------------------------------------------------------------------------------------
# Ranges: one table of rules
# --------------------------------------------------------------------------------------------------


def _one_of(options):
    return (lambda v: v in options), "one of " + ", ".join(options)


def _positive(v):
    return v is not None and v > 0


def _optional(check):
    return lambda v: v is None or check(v)


_ratio = (lambda v: 0.0 <= v <= 1.0), "a number in [0, 1]"
_pos = _positive, "a number > 0"
_pos_int_or_null = _optional(lambda v: v >= 1), "null (automatic) or an integer >= 1"
_int_ge1 = (lambda v: v >= 1), "an integer >= 1"
_ge0 = (lambda v: v >= 0), "a number >= 0"
_unit = (lambda v: 0 < v <= 1), "a number in (0, 1]"

RULES: Dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.image_resolution": _int_ge1,
    "model.image_interpolation": _one_of(INTERPOLATION_NAMES),
    "model.gradient_checkpointing": ((lambda v: v is True or v is False or v in ("image", "text")), "true, false, image or text"),
    "model.max_sequence_length": _int_ge1,
    "domain.name": _one_of(DOMAINS),
    "domain.learning_rate": _pos,
    "domain.num_epochs": _int_ge1,
    "domain.loss_weight": _ge0,
    "domain.augmentation.crop_scale_min": ((lambda v: 0 < v <= 1), "a number in (0, 1]"),
    "domain.augmentation.rotation_degrees": _ge0,
    "domain.augmentation.color_jitter": _ratio,
    "data.source": _one_of(SOURCES),
    "data.train_split": _ratio,
    "data.val_split": _ratio,
    "data.test_split": _ratio,
    "data.max_samples": _pos_int_or_null,
    "data.num_workers": (_optional(lambda v: v >= 0), "null (automatic) or an integer >= 0"),
    "data.on_error": _one_of(ON_ERROR),
    "data.cache_images": _one_of(CACHE_MODES),
    "data.max_bad_fraction": _ratio,
    "data.shuffle_buffer": _ge0,
    "data.cache_memory_mb": _ge0,
    "tracking.retry_s": _pos,
    "tracking.end_timeout_s": _ge0,
    "device.type": _one_of(DEVICES),
    "device.precision": _one_of(PRECISIONS),
    "trainer.learning_rate": _pos,
    "trainer.batch_size": _pos_int_or_null,
    "trainer.eval_batch_size": _pos_int_or_null,
    "trainer.num_epochs": _int_ge1,
    "trainer.max_steps": _pos_int_or_null,
    "trainer.warmup_steps": _ge0,
    "trainer.gradient_accumulation_steps": _int_ge1,
    "trainer.accumulation": _one_of(ACCUMULATION),
    "trainer.max_grad_norm": _ge0,
    "trainer.adam_beta1": ((lambda v: 0 <= v < 1), "a number in [0, 1), e.g. 0.9"),
    "trainer.adam_beta2": ((lambda v: 0 <= v < 1), "a number in [0, 1), e.g. 0.98"),
    "trainer.adam_eps": _pos,
    "trainer.weight_decay": _ge0,
    "trainer.save_steps": _int_ge1,
    "trainer.eval_steps": _int_ge1,
    "trainer.logging_steps": _int_ge1,
    "trainer.monitor_mode": _one_of(MONITOR_MODES),
    "trainer.keep_last": _int_ge1,
    "trainer.early_stopping_patience": _pos_int_or_null,
    "trainer.dist_timeout_s": _int_ge1,
    "trainer.layer_decay": (_optional(lambda v: 0 < v <= 1), "null (off) or a number in (0, 1], e.g. 0.65"),
    "trainer.head_lr": (_optional(_positive), "null (= trainer.learning_rate) or a number > 0"),
    "trainer.logit_scale_lr": (_optional(_positive), "null (= trainer.learning_rate) or a number > 0"),
    "trainer.ema.decay": (_optional(lambda v: 0 <= v < 1), "null or 0 (off) or a number in (0, 1), e.g. 0.999"),
    "model.lora.r": (lambda v: isinstance(v, int) and v >= 0, "0 (off) or an integer >= 1"),
    "model.lora.alpha": _pos,
    "model.lora.dropout": ((lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "seed": _ge0,
}

#: the ranges of the loss's and the schedule's constructor arguments, by argument name (checked when the class has it)
ARGUMENT_RULES: Dict[str, Dict[str, tuple[Callable[[Any], bool], str]]] = {
    "loss": {
        "temperature": _pos, "base_temperature": _pos, "hard_negative_ratio": _ratio, "mining_strategy": _one_of(MINING_STRATEGIES),
        "hard_negative_weight": _pos, "domain": _one_of(DOMAINS), "domain_weight": _ge0,
        "init_bias": ((lambda v: math.isfinite(v)), "a finite number"),
    },
    "temperature_schedule": {
        "schedule_type": _one_of(SCHEDULES), "min_temp": _pos, "max_temp": _pos, "warmup_steps": _ge0, "decay_rate": _unit,
        "patience": _int_ge1, "factor": _unit,
    },
}

#: keys that moved: a command line naming one is answered with where it went
MOVED = {
    "loss.name": "loss=<option> (conf/loss/)",
    "loss.temperature_schedule": "temperature_schedule=<option> (constant, warmup, cosine, exponential, adaptive)",
    "loss.min_temp": "temperature_schedule.min_temp", "loss.max_temp": "temperature_schedule.max_temp",
    "loss.temp_warmup_steps": "temperature_schedule.warmup_steps", "loss.temp_decay_rate": "temperature_schedule.decay_rate",
    "loss.temp_patience": "temperature_schedule.patience", "loss.temp_factor": "temperature_schedule.factor",
    "loss.siglip_init_bias": "loss.init_bias (loss=siglip)",
}


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part, default) if hasattr(node, "get") else getattr(node, part, default)
    return node


def _check(key: str, value: Any, rule: tuple[Callable[[Any], bool], str]) -> None:
    check, allowed = rule
    try:
        ok = bool(check(value))
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(key, value, allowed)


# --------------------------------------------------------------------------------------------------
# The run config
# --------------------------------------------------------------------------------------------------


def validate(cfg: Any, check_files: bool = True) -> None:
    """Check a composed run config (a DictConfig or a nested dict) once; raise :class:`ConfigError` on the first
    problem. ``check_files``: the files and folders it reads exist (off for a config made for another machine)."""
    for key, rule in RULES.items():
        _check(key, _get(cfg, key), rule)
    splits = [_get(cfg, f"data.{s}_split") for s in ("train", "val", "test")]
    if not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        raise ConfigError("data.train_split+val_split+test_split", round(sum(splits), 6), "the three splits must sum to 1")
    _check_component(cfg, "loss")
    _check_component(cfg, "temperature_schedule")
    schedule = _get(cfg, "temperature_schedule.schedule_type", "constant")
    if _get(cfg, "temperature_schedule.min_temp", 0.01) > _get(cfg, "temperature_schedule.max_temp", 0.1):
        raise ConfigError("temperature_schedule.min_temp", _get(cfg, "temperature_schedule.min_temp"), "<= temperature_schedule.max_temp")
    if schedule != "constant" and _get(cfg, "loss.learnable_temp"):
        raise ConfigError("temperature_schedule", schedule, "constant when loss.learnable_temp=true (a schedule would overwrite the "
                                                            "learnt temperature): set loss.learnable_temp=false to schedule it")
    if _get(cfg, "loss.scales") is not None and len(_get(cfg, "loss.scales")) != len(_get(cfg, "loss.scale_weights") or []):
        raise ConfigError("loss.scale_weights", list(_get(cfg, "loss.scale_weights") or []), "one weight per entry of loss.scales")
    if _get(cfg, "model.family") not in (None, "clip", "siglip", "open_clip"):
        raise ConfigError("model.family", _get(cfg, "model.family"), "clip, siglip or open_clip (or null: from the folder or hub id)")
    if _get(cfg, "model.name_or_path") is None and _get(cfg, "model.architecture") is None and _get(cfg, "model.arch") is None:
        raise ConfigError("model.name_or_path", None, "a hub id or local directory (or set model.architecture to build one)")
    _check_data_source(_get(cfg, "data"), "data")
    root = _get(cfg, "tracking.serve_file_root")
    if root is not None and not os.path.isdir(os.path.expanduser(str(root))):
        raise ConfigError("tracking.serve_file_root", root, "null (the served model reads no server files) or an existing folder "
                                                            "it may read images from")
    _check_robust(cfg)
    _check_eval_data(cfg)
    if _get(cfg, "eval") is not None:  # the heads' options (clipexp.heads.check_options): eval.heads, shots, draws, conformal.*
        check_eval_options(list(_get(cfg, "eval.heads")), list(_get(cfg, "eval.shots")), _get(cfg, "eval.draws"),
                           _get(cfg, "eval.conformal.alpha"), _get(cfg, "eval.conformal.score"))
    check_monitor(cfg)
    if check_files:
        check_paths(cfg)


def _check_data_source(data: Any, section: str) -> None:
    source = _get(data, "source")
    if source in ("csv", "json", "folder", "hf") and not _get(data, "path"):
        example = {"hf": "a dataset folder saved with save_to_disk, or a hub name"}.get(source, f"the {source} file or folder")
        raise ConfigError(f"{section}.path", None, f"required for {section}.source={source}: {example}")
    if source == "webdataset" and not _get(data, "urls"):
        raise ConfigError(f"{section}.urls", None, "shard paths or a brace pattern are required for data=webdataset, e.g. "
                                                   "/data/shards/train-{000000..000009}.tar")


def component_class(cfg: Any, section: str) -> type:
    """The class a ``loss`` or ``temperature_schedule`` section's ``_target_`` names (a ConfigError if none)."""
    target = _get(cfg, f"{section}._target_")
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except ImportError:
        cls = None
    if not inspect.isclass(cls):
        example = "clipexp.losses.CLIPContrastiveLoss" if section == "loss" else "clipexp.losses.TemperatureScheduler"
        raise ConfigError(f"{section}._target_", target, f"an importable class, e.g. {example} (the files of conf/{section}/ name one)")
    return cls


def component_arguments(cls: type) -> Optional[List[str]]:
    """The constructor's keyword arguments (None when it takes ``**kwargs``: any key)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_component(cfg: Any, section: str) -> None:
    """``loss`` / ``temperature_schedule``: a class in ``_target_``, and keys that are its arguments, in range."""
    node = _get(cfg, section)
    cls = component_class(cfg, section)
    allowed = component_arguments(cls)
    keys = [k for k in node.keys() if not str(k).startswith("_")]
    if section == "temperature_schedule":
        keys = [k for k in keys if k not in ("initial_temp", "total_steps")] if allowed is None else keys
        for given in ("initial_temp", "total_steps"):
            if given in keys:
                raise ConfigError(f"{section}.{given}", _get(node, given), "not set in the config: the trainer passes the loss's "
                                                                           "temperature and the run's steps")
    for key in keys:
        if allowed is not None and key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            raise ConfigError(f"{section}.{key}", _get(node, key), (f"did you mean {section}.{near[0]}? " if near else "")
                              + f"an argument of {cls.__name__}: " + ", ".join(allowed))
        rule = ARGUMENT_RULES[section].get(key)
        if rule is not None:
            _check(f"{section}.{key}", _get(node, key), rule)


def _check_wise_ft(alphas: List[Any], select: Any) -> None:
    key = "trainer.wise_ft.alphas"
    if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in alphas):
        raise ConfigError(key, list(alphas), "a list of numbers in [0, 1] (0 = the start model, 1 = the fine-tuned one), e.g. [0,0.25,0.5,0.75,1]")
    if len({float(a) for a in alphas}) != len(alphas):
        raise ConfigError(key, list(alphas), "distinct numbers")
    if select == "best_val":
        return
    try:
        ok = float(select) in {float(a) for a in alphas}
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError("trainer.wise_ft.select", select, f"best_val or one of trainer.wise_ft.alphas={list(alphas)}")


def _check_robust(cfg: Any) -> None:
    """The robust fine-tuning keys that depend on each other (docs/robust-finetuning.md)."""
    _check_wise_ft(list(_get(cfg, "trainer.wise_ft.alphas")), _get(cfg, "trainer.wise_ft.select"))
    if list(_get(cfg, "trainer.wise_ft.alphas")) and not _get(cfg, "data.val_split") > 0:
        raise ConfigError("data.val_split", _get(cfg, "data.val_split"), "> 0 with trainer.wise_ft.alphas set (each alpha is evaluated on val)")
    if _get(cfg, "model.lora.r") > 0 and not list(_get(cfg, "model.lora.target_modules")):
        raise ConfigError("model.lora.target_modules", [], "a list of module names, e.g. [q_proj,k_proj,v_proj,out_proj]")
    monitor = _get(cfg, "trainer.monitor")
    if str(monitor).startswith(EMA) and not _get(cfg, "trainer.ema.decay"):
        raise ConfigError("trainer.monitor", monitor, "a metric of the trained weights (ema/... needs trainer.ema.decay, e.g. 0.999)")


def _check_eval_data(cfg: Any) -> None:
    ev = _get(cfg, "eval_data")
    if ev is None:
        return
    for key, rule in (("source", _one_of(SOURCES)), ("split", _one_of(EVAL_SPLITS)), ("on_error", _one_of(ON_ERROR)),
                      ("max_samples", _pos_int_or_null)):
        _check(f"eval_data.{key}", _get(ev, key), rule)
    _check_data_source(ev, "eval_data")
    splits = [_get(ev, f"{s}_split") for s in ("train", "val", "test")]
    if _get(ev, "split") != "all" and (not math.isclose(sum(splits), 1.0, abs_tol=1e-6) or _get(ev, f"{_get(ev, 'split')}_split") <= 0):
        raise ConfigError(f"eval_data.{_get(ev, 'split')}_split", _get(ev, f"{_get(ev, 'split')}_split"),
                          "> 0 with the three eval_data splits summing to 1 (or eval_data.split=all to evaluate every pair)")
    if not str(_get(ev, "name")) or "/" in str(_get(ev, "name")) or _get(ev, "name") in ("val", "test", "train", "ema", "wise_ft", "best"):
        raise ConfigError("eval_data.name", _get(ev, "name"), "a metric prefix without '/', other than train, val, test, ema, wise_ft, best")


# --------------------------------------------------------------------------------------------------
# trainer.monitor
# --------------------------------------------------------------------------------------------------


def _labelled(data: Any) -> bool:
    """Whether a data section can give class labels (zero-shot metrics); folders and textile can."""
    source = _get(data, "source")
    if source in ("csv", "json", "hf"):
        return _get(data, "label_column") is not None
    if source == "webdataset":
        return _get(data, "label_key") is not None
    return True


def eval_metric_names(cfg: Any) -> List[str]:
    """Every metric an evaluation of this run logs, i.e. what ``trainer.monitor`` may name: ``val/<m>``, the
    eval_data set's ``<name>/<m>``, and ``ema/`` before each of those when ``trainer.ema.decay`` is set."""
    sets = [("val", _labelled(_get(cfg, "data")))]
    ev = _get(cfg, "eval_data")
    if ev is not None:
        sets.append((str(_get(ev, "name")), _labelled(ev)))
    names = [f"{prefix}/{m}" for prefix, labelled in sets for m in split_metric_names(labelled)]
    if _get(cfg, "trainer.ema.decay"):
        names += [EMA + n for n in names]
    return names


def check_monitor(cfg: Any) -> None:
    monitor, mode = str(_get(cfg, "trainer.monitor")), _get(cfg, "trainer.monitor_mode")
    names = eval_metric_names(cfg)
    zero_shot = monitor.rsplit("/", 1)[-1] in split_metric_names(True)[len(split_metric_names(False)):]
    if monitor not in names and zero_shot and monitor.replace(EMA, "", 1).startswith("val/") and not _labelled(_get(cfg, "data")):
        raise ConfigError("trainer.monitor", monitor, "a retrieval metric or the loss: zero-shot metrics need class labels "
                                                      "and this data has none (data.label_column / data.label_key is null)")
    if monitor not in names:
        near = difflib.get_close_matches(monitor, names, n=1, cutoff=0.5)
        val = [n for n in names if n.startswith("val/")]
        more = sorted({n.rsplit("/", 1)[0] + "/..." for n in names if not n.startswith("val/")})
        raise ConfigError("trainer.monitor", monitor, (f"did you mean {near[0]}? " if near else "")
                          + "a metric each evaluation logs: " + ", ".join(val) + (f" (and {', '.join(more)})" if more else ""))
    lower = monitor.endswith(LOWER_IS_BETTER)
    if mode == ("max" if lower else "min"):
        raise ConfigError("trainer.monitor_mode", mode, f"{'min' if lower else 'max'} for trainer.monitor={monitor} "
                                                        f"({'lower' if lower else 'higher'} is better)")
    optimized = _get(cfg, "optimized_metric")
    if optimized is not None and optimized not in names:
        raise ConfigError("optimized_metric", optimized, "a metric each evaluation logs, e.g. ${trainer.monitor}")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _local(value: Optional[str]) -> bool:
    return bool(value) and (str(value).startswith(("/", "./", "../", "~")) or Path(str(value)).suffix in (".csv", ".json", ".pt"))


def check_paths(cfg: Any) -> None:
    """The files and folders the run reads exist, so a typo fails before the model loads."""
    for section in ("data", "eval_data"):
        data = _get(cfg, section)
        if data is None or not _get(data, "path"):
            continue
        source, path = _get(data, "source"), Path(str(_get(data, "path"))).expanduser()
        if source in ("csv", "json") and not path.is_file():
            raise ConfigError(f"{section}.path", str(_get(data, "path")), f"an existing {source.upper()} file ({path.absolute()} is not one)")
        if source in ("folder", "textile") and not path.is_dir():
            raise ConfigError(f"{section}.path", str(_get(data, "path")), f"an existing folder ({path.absolute()} is not one)")
        if source == "hf" and _local(str(_get(data, "path"))) and not path.exists():
            raise ConfigError(f"{section}.path", str(_get(data, "path")), "a dataset folder saved with save_to_disk, or a hub name")
    for key in ("model.name_or_path", "model.arch"):
        value = _get(cfg, key)
        if _local(value) and not Path(str(value)).expanduser().exists():
            raise ConfigError(key, value, "a hub id or an existing local folder (this path does not exist)")
    resume = _get(cfg, "trainer.resume")
    if resume not in (None, "latest", "latest_or_new") and not Path(str(resume)).expanduser().exists():
        raise ConfigError("trainer.resume", resume, "latest, latest_or_new, or an existing run folder or checkpoint file")


# --------------------------------------------------------------------------------------------------
# The command line, before it is composed
# --------------------------------------------------------------------------------------------------


def _parse(overrides: List[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors; reported as one line
        raise UsageError(f"cannot parse the overrides: {first_lines(err)}") from None


def check_group_options(overrides: List[str], groups: Dict[str, List[str]]) -> None:
    """Every ``group=option`` (sweeps included) must name an existing file in that group (``groups``: group -> options)."""
    from hydra.core.override_parser.types import ChoiceSweep

    for ov in _parse(overrides):
        group = ov.key_or_group.lstrip("+~")
        if group not in groups or ov.is_delete():
            continue
        value = ov.value()
        for v in value.list if isinstance(value, ChoiceSweep) else [value]:
            if v is not None and str(v) not in groups[group]:
                raise ConfigError(group, str(v), "one of " + ", ".join(groups[group]))


def _schema_keys(cls: type, prefix: str = "") -> Dict[str, bool]:
    """{dotted key: is a section} of a schema dataclass, through optional sub-sections."""
    out: Dict[str, bool] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        sub = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        if cls is RunConfig and f.name == "eval_data":
            sub = EvalDataConfig
        out[prefix + f.name] = sub is not None or typing.get_origin(kind) is dict
        if sub is not None:
            out.update(_schema_keys(sub, prefix + f.name + "."))
    return out


def known_keys() -> Dict[str, bool]:
    return _schema_keys(RunConfig)


def check_override_keys(overrides: List[str], groups: Dict[str, List[str]], chosen: Dict[str, Dict[str, Any]]) -> None:
    """Each ``key=value`` (not ``+key``, ``hydra.*`` or a ``group=option``) must name a schema key, or an argument of the
    chosen loss / temperature schedule (``chosen``: section -> its composed node); the error names the nearest key."""
    keys = known_keys()
    for section, node in chosen.items():
        cls = component_class({section: node}, section)
        keys.update({f"{section}.{a}": False for a in (component_arguments(cls) or [k for k in node if not str(k).startswith("_")])})
    for ov in _parse(overrides):
        key = ov.key_or_group
        if ov.is_add() or ov.is_delete() or key.startswith("hydra") or key in groups or key in keys or ov.package is not None:
            continue
        if key in MOVED:
            raise UnknownKeyError(key, (ov.input_line or "").partition("=")[2], f"it moved: use {MOVED[key]}")
        if any(key.startswith(k + ".") and not section for k, section in keys.items()):
            continue  # inside a free-form value (a dict-valued key)
        section, _, name = key.rpartition(".")
        leaves = [k for k, is_section in keys.items() if not is_section]
        siblings = {k.rpartition(".")[2]: k for k in leaves if k.rpartition(".")[0] == section}
        near = [siblings[n] for n in difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.6)]
        if not siblings:  # a misspelt section: the nearest key anywhere
            near = difflib.get_close_matches(key, leaves, n=1, cutoff=0.75)
        if near:
            hint = f"did you mean {near[0]}?"
        elif section in keys:
            hint = f"the keys of {section}: " + ", ".join(k[len(section) + 1:] for k in keys if k.rpartition('.')[0] == section)
        else:
            hint = "the top-level keys: " + ", ".join(k for k in keys if "." not in k)
        value = (ov.input_line or "").partition("=")[2] or str(ov.value())
        raise UnknownKeyError(key, value, f"{hint} (`clipexp train --help-all` lists every key)")


class UnknownKeyError(ConfigError):
    """A command-line key the run config does not have: ``<key>=<value>: no such config key; did you mean ...``."""

    def __init__(self, key: str, value: str, hint: str):
        self.key, self.value, self.allowed = key, value, hint
        Exception.__init__(self, f"{key}={value}: no such config key; {hint}")


def first_lines(err: Optional[BaseException]) -> str:
    """The first line of an error and of each cause, joined (Hydra nests the useful one)."""
    parts: List[str] = []
    while err is not None:
        line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if line and "$" not in line and line not in parts:
            parts.append(line)
        err = err.__cause__ or err.__context__
    return ": ".join(parts)
