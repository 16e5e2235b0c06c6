"""Run-config schemas, validation, and the typed view of a run config.

The Hydra tree in ``conf/`` composes into one ``RunConfig``, whose dataclasses (:mod:`clipexp.config.schema`)
Hydra's ConfigStore holds as the schema of ``conf/config.yaml``, so OmegaConf rejects
unknown keys and values of the wrong type while composing. ``validate`` then checks every value's
*range* once, up front, and raises :class:`ConfigError` naming the key, the bad value and what is allowed.

``CLIPFinetuningConfig`` is the flat, typed view of a run config with the field names of the original
design notes (``model_name``, ``learning_rate``, ``batch_size``...). Library code that wants plain
arguments takes it; ``from_dict`` accepts either that flat form or a nested run config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from clipexp.config.checks import check_monitor
from clipexp.config.schema import RunConfig
from clipexp.errors import ConfigError
from clipexp.heads import check_options as check_eval_options
from clipexp.models.clip import ArchitectureConfig
from clipexp.names import (
    ACCUMULATION,
    CACHE_MODES,
    DEVICES,
    DOMAINS,
    INTERPOLATION_NAMES,
    LOSSES,
    MINING_STRATEGIES,
    MONITOR_MODES,
    ON_ERROR,
    PRECISIONS,
    SCHEDULES,
    SOURCES,
)

# --------------------------------------------------------------------------------------------------
# Validation: one table of rules, checked once, up front
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
    "loss.name": _one_of(LOSSES),
    "loss.temperature": _pos,
    "loss.hard_negative_ratio": _ratio,
    "loss.mining_strategy": _one_of(MINING_STRATEGIES),
    "loss.hard_negative_weight": _pos,
    "loss.domain": _one_of(DOMAINS),
    "loss.domain_weight": _ge0,
    "loss.temperature_schedule": _one_of(SCHEDULES),
    "loss.min_temp": _pos,
    "loss.max_temp": _pos,
    "loss.temp_warmup_steps": _ge0,
    "loss.temp_decay_rate": ((lambda v: 0 < v <= 1), "a number in (0, 1]"),
    "loss.temp_patience": _int_ge1,
    "loss.temp_factor": ((lambda v: 0 < v <= 1), "a number in (0, 1]"),
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

EVAL_SPLITS = ("val", "test", "all")


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
    """The robust fine-tuning keys that depend on each other (README "Robust fine-tuning")."""
    _check_wise_ft(list(_get(cfg, "trainer.wise_ft.alphas")), _get(cfg, "trainer.wise_ft.select"))
    if list(_get(cfg, "trainer.wise_ft.alphas")) and not _get(cfg, "data.val_split") > 0:
        raise ConfigError("data.val_split", _get(cfg, "data.val_split"), "> 0 with trainer.wise_ft.alphas set (each alpha is evaluated on val)")
    if _get(cfg, "model.lora.r") > 0 and not list(_get(cfg, "model.lora.target_modules")):
        raise ConfigError("model.lora.target_modules", [], "a list of module names, e.g. [q_proj,k_proj,v_proj,out_proj]")
    monitor = _get(cfg, "trainer.monitor")
    if str(monitor).startswith("ema/") and not _get(cfg, "trainer.ema.decay"):
        raise ConfigError("trainer.monitor", monitor, "a metric of the trained weights (ema/... needs trainer.ema.decay, e.g. 0.999)")
    check_monitor(cfg)
    ev = _get(cfg, "eval_data")
    if ev is None:
        return
    for key, (check, allowed) in (("source", _one_of(SOURCES)), ("split", _one_of(EVAL_SPLITS)), ("on_error", _one_of(ON_ERROR)),
                                  ("max_samples", _pos_int_or_null)):
        if not check(_get(ev, key)):
            raise ConfigError(f"eval_data.{key}", _get(ev, key), allowed)
    if _get(ev, "source") in ("csv", "json", "folder", "hf") and not _get(ev, "path"):
        raise ConfigError("eval_data.path", None, f"a file or folder path is required for eval_data.source={_get(ev, 'source')}")
    splits = [_get(ev, f"{s}_split") for s in ("train", "val", "test")]
    if _get(ev, "split") != "all" and (not math.isclose(sum(splits), 1.0, abs_tol=1e-6) or _get(ev, f"{_get(ev, 'split')}_split") <= 0):
        raise ConfigError(f"eval_data.{_get(ev, 'split')}_split", _get(ev, f"{_get(ev, 'split')}_split"),
                          "> 0 with the three eval_data splits summing to 1 (or eval_data.split=all to evaluate every pair)")
    if not str(_get(ev, "name")) or "/" in str(_get(ev, "name")) or _get(ev, "name") in ("val", "test", "train", "ema", "wise_ft", "best"):
        raise ConfigError("eval_data.name", _get(ev, "name"), "a metric prefix without '/', other than train, val, test, ema, wise_ft, best")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def validate(cfg: Any) -> None:
    """Check every value's range once. ``cfg`` is a composed DictConfig or a nested dict.

    Raises ConfigError (one line: key, value, what is allowed) on the first problem found.
    """
    for key, (check, allowed) in RULES.items():
        value = _get(cfg, key)
        try:
            ok = bool(check(value))
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(key, value, allowed)
    splits = [_get(cfg, f"data.{s}_split") for s in ("train", "val", "test")]
    if not math.isclose(sum(splits), 1.0, abs_tol=1e-6):
        raise ConfigError(
            "data.train_split+val_split+test_split", round(sum(splits), 6), "the three splits must sum to 1"
        )
    if _get(cfg, "loss.min_temp") > _get(cfg, "loss.max_temp"):
        raise ConfigError("loss.min_temp", _get(cfg, "loss.min_temp"), "must be <= loss.max_temp")
    if _get(cfg, "loss.temperature_schedule") != "constant" and _get(cfg, "loss.learnable_temp"):
        raise ConfigError("loss.temperature_schedule", _get(cfg, "loss.temperature_schedule"),
                          "constant when loss.learnable_temp=true (a schedule would overwrite the learnt temperature)")
    if len(_get(cfg, "loss.scales")) != len(_get(cfg, "loss.scale_weights")):
        raise ConfigError("loss.scale_weights", list(_get(cfg, "loss.scale_weights")), "one weight per entry of loss.scales")
    if _get(cfg, "model.family") not in (None, "clip", "siglip", "open_clip"):
        raise ConfigError("model.family", _get(cfg, "model.family"), "clip, siglip or open_clip (or null: from the folder or hub id)")
    if _get(cfg, "model.name_or_path") is None and _get(cfg, "model.architecture") is None and _get(cfg, "model.arch") is None:
        raise ConfigError("model.name_or_path", None, "a hub id or local directory (or set model.architecture to build one)")
    if _get(cfg, "data.source") in ("csv", "json", "folder") and not _get(cfg, "data.path"):
        raise ConfigError("data.path", None, f"a file or folder path is required for data.source={_get(cfg, 'data.source')}")
    if _get(cfg, "data.source") == "webdataset" and not _get(cfg, "data.urls"):
        raise ConfigError("data.urls", None, "shard paths or a brace pattern are required for data=webdataset, e.g. /data/shards/train-{000000..000009}.tar")
    root = _get(cfg, "tracking.serve_file_root") if "tracking" in cfg else None
    if root is not None and not os.path.isdir(os.path.expanduser(str(root))):
        raise ConfigError("tracking.serve_file_root", root, "null (the served model reads no server files) or an existing folder "
                                                            "it may read images from")
    _check_robust(cfg)
    if "eval" in cfg:  # the heads' options (clipexp.heads.check_options): eval.heads, shots, draws, conformal.*
        check_eval_options(list(_get(cfg, "eval.heads")), list(_get(cfg, "eval.shots")), _get(cfg, "eval.draws"),
                           _get(cfg, "eval.conformal.alpha"), _get(cfg, "eval.conformal.score"))


# --------------------------------------------------------------------------------------------------
# The flat, typed view (the original notes' CLIPFinetuningConfig)
# --------------------------------------------------------------------------------------------------

# flat field -> dotted key in the run config
FLAT_TO_NESTED: Dict[str, str] = {
    "model_name": "model.name_or_path",
    "image_resolution": "model.image_resolution",
    "image_interpolation": "model.image_interpolation",
    "max_sequence_length": "model.max_sequence_length",
    "domain": "domain.name",
    "learning_rate": "trainer.learning_rate",
    "batch_size": "trainer.batch_size",
    "num_epochs": "trainer.num_epochs",
    "max_steps": "trainer.max_steps",
    "warmup_steps": "trainer.warmup_steps",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "max_grad_norm": "trainer.max_grad_norm",
    "weight_decay": "trainer.weight_decay",
    "save_steps": "trainer.save_steps",
    "eval_steps": "trainer.eval_steps",
    "logging_steps": "trainer.logging_steps",
    "seed": "seed",
    "device": "device.type",
    "precision": "device.precision",
    "data_path": "data.path",
    "train_split": "data.train_split",
    "val_split": "data.val_split",
    "test_split": "data.test_split",
    "num_workers": "data.num_workers",
    "shuffle": "data.shuffle",
    "augment_images": "data.augment_images",
    "augment_text": "data.augment_text",
    "loss_type": "loss.name",
    "temperature": "loss.temperature",
    "learnable_temp": "loss.learnable_temp",
    "hard_negative_ratio": "loss.hard_negative_ratio",
    "hard_negative_mining_strategy": "loss.mining_strategy",
    "hard_negative_weight": "loss.hard_negative_weight",
    "domain_weight": "loss.domain_weight",
    "temperature_schedule_type": "loss.temperature_schedule",
    "multi_scale_scales": "loss.scales",
    "multi_scale_weights": "loss.scale_weights",
}


@dataclass
class CLIPFinetuningConfig:
    """Flat, typed view of a run config (field names of the original design notes).

    ``use_mps`` and ``mixed_precision`` are the notes' switches; they map onto ``device.type`` and
    ``device.precision`` (``mixed_precision=False`` means fp32). Values are validated on creation by
    the same rules as the Hydra config.
    """

    model_name: Optional[str] = "openai/clip-vit-base-patch32"
    domain: str = "general"
    learning_rate: float = 5e-5
    batch_size: Optional[int] = None
    num_epochs: int = 10
    max_steps: Optional[int] = None
    max_sequence_length: int = 77
    image_resolution: int = 224
    image_interpolation: str = "bicubic"
    device: str = "auto"
    precision: str = "auto"
    use_mps: bool = True
    mixed_precision: bool = True
    gradient_accumulation_steps: int = 1
    data_path: Optional[str] = None
    train_split: float = 0.8
    val_split: float = 0.1
    test_split: float = 0.1
    num_workers: Optional[int] = None
    shuffle: bool = True
    augment_images: bool = True
    augment_text: bool = False
    loss_type: str = "contrastive"
    temperature: float = 0.07
    learnable_temp: bool = False
    hard_negative_ratio: float = 0.5
    hard_negative_mining_strategy: str = "semi-hard"
    hard_negative_weight: float = 2.0
    domain_weight: float = 1.0
    temperature_scheduling: bool = False
    temperature_schedule_type: str = "constant"
    multi_scale_scales: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    multi_scale_weights: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    warmup_steps: int = 500
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    save_steps: int = 1000
    eval_steps: int = 500
    logging_steps: int = 100
    seed: int = 42

    def __post_init__(self) -> None:
        if self.temperature_scheduling and self.temperature_schedule_type == "constant":
            self.temperature_schedule_type = "cosine"
        nested = self.to_run_dict()
        validate(nested)

    def to_run_dict(self) -> Dict[str, Any]:
        """The nested run-config dict this view stands for (defaults filled from the schema)."""
        nested: Dict[str, Any] = dataclasses.asdict(RunConfig())
        for flat, dotted in FLAT_TO_NESTED.items():
            _set(nested, dotted, getattr(self, flat))
        nested["loss"]["domain"] = self.domain
        if self.device == "auto" and not self.use_mps:
            nested["device"]["type"] = "auto"  # auto never picks MPS when use_mps is False (see DeviceManager)
        if not self.mixed_precision:
            nested["device"]["precision"] = "fp32"
        if self.model_name is None:
            nested["model"]["architecture"] = dataclasses.asdict(ArchitectureConfig())
        return nested

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CLIPFinetuningConfig":
        """Accept the flat form (``{"learning_rate": ...}``) or a nested run config (``{"trainer": {...}}``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if any(isinstance(v, dict) for v in data.values()):
            flat = {}
            for name, dotted in FLAT_TO_NESTED.items():
                try:
                    flat[name] = _get(data, dotted)
                except (KeyError, AttributeError):
                    continue
            if "device" in data and isinstance(data["device"], dict) and data["device"].get("precision") == "fp32":
                flat["mixed_precision"] = False
            data = flat
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], "a field of CLIPFinetuningConfig: " + ", ".join(sorted(names)))
        return cls(**data)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _set(d: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d[part]
    d[parts[-1]] = value


def to_typed(cfg: Any) -> CLIPFinetuningConfig:
    """Typed view of a composed Hydra config."""
    from omegaconf import OmegaConf

    return CLIPFinetuningConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
