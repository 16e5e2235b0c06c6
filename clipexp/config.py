"""Run-config schemas, validation, and the typed view of a run config.

The Hydra tree in ``conf/`` composes into one ``RunConfig``. The dataclasses below are registered in
Hydra's ConfigStore as the schema of ``conf/config.yaml``, so OmegaConf rejects unknown keys and
values of the wrong type while composing. ``validate`` then checks every value's *range* once, up
front, and raises :class:`ConfigError` naming the key, the bad value and what is allowed.

``CLIPFinetuningConfig`` is the flat, typed view of a run config with the field names of the original
design notes (``model_name``, ``learning_rate``, ``batch_size``...). Library code that wants plain
arguments takes it; ``from_dict`` accepts either that flat form or a nested run config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

DOMAINS = ("general", "medical", "industrial", "scientific")
LOSSES = ("contrastive", "hard_negative", "domain_specific", "multi_scale", "siglip")
MINING_STRATEGIES = ("semi-hard", "hard", "weighted")
SCHEDULES = ("constant", "warmup", "cosine", "exponential", "adaptive")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SOURCES = ("csv", "json", "folder", "hf", "textile")
ON_ERROR = ("raise", "skip")
CACHE_MODES = ("auto", "memory", "disk", "none")
ACCUMULATION = ("plain", "exact")
MONITOR_MODES = ("max", "min")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


class ConfigError(ValueError):
    """A config value a user set is wrong. The message is one line: key, value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


# --------------------------------------------------------------------------------------------------
# Schemas (registered in Hydra's ConfigStore by ``register_configs``)
# --------------------------------------------------------------------------------------------------


@dataclass
class ArchitectureConfig:
    """Sizes of a CLIP built from a ``CLIPConfig`` with random weights (``model=tiny``)."""

    projection_dim: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate_size: int = 128


@dataclass
class ModelConfig:
    name: str = "clip_vit_b32"
    # Hub id or local directory; null together with ``architecture`` builds a random-weight CLIP.
    name_or_path: Optional[str] = "openai/clip-vit-base-patch32"
    image_resolution: int = 224
    max_sequence_length: int = 77
    architecture: Optional[ArchitectureConfig] = None
    gradient_checkpointing: Any = False  # true (both towers) | image | text | false
    lock_image: bool = False
    lock_text: bool = False


@dataclass
class AugmentationConfig:
    """Training-time image augmentation of a domain (torchvision v2, applied to uint8 tensors)."""

    crop_scale_min: float = 0.9  # RandomResizedCrop lower scale bound; 1.0 = resize + centre crop only
    hflip: bool = False
    vflip: bool = False
    rotation_degrees: float = 0.0
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off


@dataclass
class DomainConfig:
    name: str = "general"
    learning_rate: float = 5e-5
    num_epochs: int = 10
    prompt_templates: List[str] = field(default_factory=lambda: ["a photo of {}."])
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    # Strength of the domain's loss adjustment (``loss=domain_specific``); see README "Losses".
    loss_weight: float = 1.0


@dataclass
class LossConfig:
    name: str = "contrastive"
    temperature: float = 0.07
    learnable_temp: bool = False
    use_model_logit_scale: bool = False
    multi_positive: bool = True
    hard_negative_ratio: float = 0.5
    mining_strategy: str = "semi-hard"
    hard_negative_weight: float = 2.0
    domain: str = "general"
    domain_weight: float = 1.0
    scales: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    scale_weights: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    normalize_weights: bool = True
    siglip_init_bias: float = -10.0
    # Temperature schedule: one string key so sweeps can write loss.temperature_schedule=cosine,exponential
    temperature_schedule: str = "constant"
    min_temp: float = 0.01
    max_temp: float = 0.1
    temp_warmup_steps: int = 0
    temp_decay_rate: float = 0.999
    temp_patience: int = 100
    temp_factor: float = 0.9


@dataclass
class DataConfig:
    source: str = "textile"
    path: Optional[str] = None
    image_column: str = "image_path"
    caption_column: str = "caption"
    label_column: Optional[str] = "label"
    hf_split: str = "train"
    train_split: float = 0.8
    val_split: float = 0.1
    test_split: float = 0.1
    max_samples: Optional[int] = None
    num_workers: Optional[int] = None  # null = chosen from the machine's cores
    shuffle: bool = True
    augment_images: bool = True
    augment_text: bool = False
    on_error: str = "raise"
    allow_outside_root: bool = False  # images outside the CSV/JSON's folder are an error unless true
    check_images: bool = True  # decode every image before training (catches truncated files)
    cache_images: str = "auto"
    cache_memory_mb: int = 2048
    cache_dir: Optional[str] = None


@dataclass
class DeviceConfig:
    type: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False


@dataclass
class TrainerConfig:
    learning_rate: float = 5e-5
    batch_size: Optional[int] = None  # null = automatic
    eval_batch_size: Optional[int] = None  # null = batch_size
    num_epochs: int = 10
    max_steps: Optional[int] = None  # set: overrides num_epochs
    warmup_steps: int = 500
    gradient_accumulation_steps: int = 1
    accumulation: str = "plain"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    fused_adamw: bool = True
    pack_captions: bool = True  # each distinct caption of a batch encoded once, padding cut to the longest
    save_steps: int = 1000
    eval_steps: int = 500
    logging_steps: int = 100
    eval_at_start: bool = True
    monitor: str = "val/t2i_R1"
    monitor_mode: str = "max"
    keep_last: int = 2
    early_stopping_patience: Optional[int] = None
    resume: Optional[str] = None  # latest | <checkpoint path>
    progress: bool = True
    dist_timeout_s: int = 1800  # torchrun: a collective waiting longer than this fails the job


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # null = sqlite:///<project root>/mlflow.db
    experiment: str = "clipexp"
    run_name: Optional[str] = None  # null = made from the command-line overrides
    log_model: bool = True
    pyfunc_model: bool = True  # the MLflow pyfunc model runs:/<id>/clip (clipexp.serving); ~5 s of CPU per run
    register_model: Optional[str] = None  # a Model Registry name: register the run's "clip" model under it
    system_metrics: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42
    optimized_metric: Optional[str] = None  # set by hparams_search presets (documentation only)


def run_stamp() -> str:
    """``<date>/<time with microseconds>`` fixed once per command: the main process sets it and every
    job process it starts (joblib, submitit) inherits it, so a sweep's jobs agree on one folder while
    two commands started in the same second never share one."""
    import datetime
    import os

    pid, _, stamp = os.environ.get("CLIPEXP_RUN_STAMP", "").partition("|")
    if stamp and pid in (str(os.getpid()), str(os.getppid())):
        return stamp
    stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    os.environ["CLIPEXP_RUN_STAMP"] = f"{os.getpid()}|{stamp}"
    return stamp


def register_configs() -> None:
    """Register the run schema (``conf/config.yaml``'s defaults list starts with it) and the
    ``clipexp_stamp`` resolver used in the output folder names."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("clipexp_stamp"):
        OmegaConf.register_new_resolver("clipexp_stamp", run_stamp, use_cache=True)


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
    "trainer.weight_decay": _ge0,
    "trainer.save_steps": _int_ge1,
    "trainer.eval_steps": _int_ge1,
    "trainer.logging_steps": _int_ge1,
    "trainer.monitor_mode": _one_of(MONITOR_MODES),
    "trainer.keep_last": _int_ge1,
    "trainer.early_stopping_patience": _pos_int_or_null,
    "trainer.dist_timeout_s": _int_ge1,
    "seed": _ge0,
}


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
    if _get(cfg, "model.name_or_path") is None and _get(cfg, "model.architecture") is None:
        raise ConfigError("model.name_or_path", None, "a hub id or local directory (or set model.architecture to build one)")
    if _get(cfg, "data.source") in ("csv", "json", "folder") and not _get(cfg, "data.path"):
        raise ConfigError("data.path", None, f"a file or folder path is required for data.source={_get(cfg, 'data.source')}")


# --------------------------------------------------------------------------------------------------
# The flat, typed view (the original notes' CLIPFinetuningConfig)
# --------------------------------------------------------------------------------------------------

# flat field -> dotted key in the run config
FLAT_TO_NESTED: Dict[str, str] = {
    "model_name": "model.name_or_path",
    "image_resolution": "model.image_resolution",
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
