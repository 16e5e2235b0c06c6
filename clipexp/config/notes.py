"""The original design notes' flat configuration, ``CLIPFinetuningConfig``: a view of the same run config.

Its field names are the notes' (``model_name``, ``learning_rate``, ``loss_type``, ``temperature_schedule_type``...);
:meth:`CLIPFinetuningConfig.to_run_dict` turns it into the nested run config ``clipexp train`` composes: the schema's
defaults as ``clipexp train`` composes them for the flat config's domain, loss and schedule, the fields on top, checked by
the same :func:`~clipexp.config.validate.validate`. So
``Trainer(OmegaConf.create(config.to_run_dict()), ...)`` trains what the flat config says.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from clipexp.config.validate import validate
from clipexp.errors import ConfigError
from clipexp.models.clip import ArchitectureConfig
from clipexp.paths import CONF_DIR


@functools.lru_cache(maxsize=32)
def _composed(domain: str, loss: str, schedule: str) -> Dict[str, Any]:
    """The unresolved run config of ``domain=... loss=... temperature_schedule=...`` (composed once per choice)."""
    from omegaconf import OmegaConf

    from clipexp.config.compose import compose_unchecked

    for group, option in (("domain", domain), ("loss", loss), ("temperature_schedule", schedule)):
        _group_file(group, option)  # an unknown option: one line naming the flat field and the options
    cfg = compose_unchecked([f"domain={domain}", f"loss={loss}", f"temperature_schedule={schedule}"])
    return OmegaConf.to_container(cfg, resolve=False)


def _group_file(group: str, option: str) -> Dict[str, Any]:
    """The content of ``conf/<group>/<option>.yaml`` (unresolved), or a ConfigError naming the options."""
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError({"loss": "loss_type", "temperature_schedule": "temperature_schedule_type"}.get(group, group), option,
                          "one of " + ", ".join(options))
    return OmegaConf.to_container(OmegaConf.load(path))


# flat field -> dotted key in the run config (loss_type, temperature and the schedule: see to_run_dict)
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
    "learnable_temp": "loss.learnable_temp",
    "hard_negative_ratio": "loss.hard_negative_ratio",
    "hard_negative_mining_strategy": "loss.mining_strategy",
    "hard_negative_weight": "loss.hard_negative_weight",
    "domain_weight": "loss.domain_weight",
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
        validate(nested, check_files=False)

    def to_run_dict(self) -> Dict[str, Any]:
        """The nested run config this view stands for (resolved): what ``clipexp train domain=<domain> loss=<loss_type>
        temperature_schedule=<temperature_schedule_type>`` composes, with the fields on top."""
        from omegaconf import OmegaConf

        nested = copy.deepcopy(_composed(self.domain, self.loss_type, self.temperature_schedule_type))
        for flat, dotted in FLAT_TO_NESTED.items():
            key = dotted.split(".", 1)[1] if dotted.startswith("loss.") else None
            if key is None or key in nested["loss"]:  # a loss field only where this loss has the argument
                _set(nested, dotted, getattr(self, flat))
        nested["loss"]["base_temperature" if "base_temperature" in nested["loss"] else "temperature"] = self.temperature
        if self.device == "auto" and not self.use_mps:
            nested["device"]["type"] = "auto"  # auto never picks MPS when use_mps is False (see DeviceManager)
        if not self.mixed_precision:
            nested["device"]["precision"] = "fp32"
        if self.data_path:  # a CSV, a JSON or a folder of images (no path: the bundled textile images)
            suffix = str(self.data_path).lower().rsplit(".", 1)[-1]
            nested["data"]["source"] = {"csv": "csv", "json": "json"}.get(suffix, "folder")
        if self.model_name is None:
            nested["model"]["architecture"] = dataclasses.asdict(ArchitectureConfig())
        return OmegaConf.to_container(OmegaConf.create(nested), resolve=True)  # (domain_specific reads ${domain.name})

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
            loss = data.get("loss") or {}
            if "temperature" in loss or "base_temperature" in loss:
                flat["temperature"] = loss.get("temperature", loss.get("base_temperature"))
            if loss.get("_target_"):
                flat["loss_type"] = _option_of("loss", loss["_target_"])
            schedule = (data.get("temperature_schedule") or {}).get("schedule_type")
            if schedule:
                flat["temperature_schedule_type"] = schedule
            data = flat
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], "a field of CLIPFinetuningConfig: " + ", ".join(sorted(names)))
        return cls(**data)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part] if isinstance(d, dict) else getattr(d, part)
    return d


def _option_of(group: str, target: str) -> str:
    """The ``conf/<group>/`` option whose ``_target_`` is ``target``."""
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        if _group_file(group, path.stem).get("_target_") == target:
            return path.stem
    raise ConfigError(f"{group}._target_", target, f"a class one of conf/{group}/*.yaml names")


def _set(d: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d[part]
    d[parts[-1]] = value


def to_typed(cfg: Any) -> "CLIPFinetuningConfig":
    """Typed view of a composed Hydra config."""
    from omegaconf import OmegaConf

    return CLIPFinetuningConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
