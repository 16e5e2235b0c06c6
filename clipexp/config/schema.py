"""Run-config schemas: the dataclasses registered in Hydra's ConfigStore, and the allowed names.

The Hydra tree in ``conf/`` composes into one ``RunConfig``. The dataclasses below are registered in
Hydra's ConfigStore as the schema of ``conf/config.yaml``, so OmegaConf rejects unknown keys and
values of the wrong type while composing; :func:`clipexp.config.validate.validate` then checks the ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from clipexp.models.clip import ArchitectureConfig
from clipexp.names import HEADS

# --------------------------------------------------------------------------------------------------
# Schemas (registered in Hydra's ConfigStore by ``register_configs``)
# --------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA adapters through peft (``r: 0`` = off): only the adapters train; the saved model is merged."""

    r: int = 0  # adapter rank; 0 = off
    alpha: float = 16.0  # LoRA scaling numerator (the update is scaled by alpha / r)
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])  # module names that get adapters (per family: see docs/models.md)
    dropout: float = 0.0  # dropout on the adapter input


@dataclass
class ModelConfig:
    name: str = "clip_vit_b32"  # the option's name (logged as the model tag)
    # Hub id or local directory; null together with ``architecture`` builds a random-weight CLIP.
    name_or_path: Optional[str] = "openai/clip-vit-base-patch32"
    # clip | siglip | open_clip (clipexp.models.families); null: from the folder or hub id
    family: Optional[str] = None
    arch: Optional[str] = None        # open_clip: architecture (ViT-B-32, RN50, convnext_base_w) or a saved folder
    pretrained: Optional[str] = None  # open_clip: a pretrained tag, a checkpoint file, or hf-hub:<id>
    image_resolution: int = 224  # input size in pixels; pretrained models take theirs from the checkpoint
    # the resize to image_resolution and the augmentation's warp: bicubic (antialiased, as CLIP's own
    # processor) | bilinear | nearest (keeps source pixels: fine texture survives a downscale)
    image_interpolation: str = "bicubic"
    max_sequence_length: int = 77  # text context in tokens (capped at the model's)
    architecture: Optional[ArchitectureConfig] = None
    gradient_checkpointing: Any = False  # true (both towers) | image | text | false
    lock_image: bool = False  # freeze the image tower (LiT-style)
    lock_text: bool = False  # freeze the text tower
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class AugmentationConfig:
    """Training-time image augmentation of a domain (torchvision v2, applied to uint8 tensors)."""

    crop_scale_min: float = 0.9  # RandomResizedCrop lower scale bound; 1.0 = resize + centre crop only
    hflip: bool = False  # random horizontal flips
    vflip: bool = False  # random vertical flips
    rotation_degrees: float = 0.0  # random rotation within +-this many degrees; 0 = off
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off


@dataclass
class DomainConfig:
    name: str = "general"  # general | medical | industrial | scientific
    learning_rate: float = 5e-5  # the domain's default trainer.learning_rate
    num_epochs: int = 10  # the domain's default trainer.num_epochs
    prompt_templates: List[str] = field(default_factory=lambda: ["a photo of {}."])  # zero-shot prompts, {} = the class name (also text augmentation)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    # Strength of the domain's loss adjustment (``loss=domain_specific``); see docs/losses.md.
    loss_weight: float = 1.0


@dataclass
class DataConfig:
    source: str = "textile"  # textile | csv | json | folder | hf | webdataset
    path: Optional[str] = None  # the CSV / JSON file, image folder or saved HF dataset
    image_column: str = "image_path"  # CSV / HF column holding the image path
    caption_column: str = "caption"  # CSV / HF column holding the caption
    label_column: Optional[str] = "label"  # CSV / HF column holding the class (optional; null = unlabelled)
    hf_split: str = "train"  # the split of a DatasetDict
    train_split: float = 0.8  # share of the pairs for training
    val_split: float = 0.1  # share for validation (evaluations, best checkpoint)
    test_split: float = 0.1  # share for the final test evaluation
    max_samples: Optional[int] = None  # use at most this many pairs (a quick look); null = all
    num_workers: Optional[int] = None  # null = chosen from the machine's cores
    shuffle: bool = True  # reshuffle the training pairs every epoch
    augment_images: bool = True  # apply the domain's augmentation to training images
    augment_text: bool = False  # draw each labelled sample's caption among its captions and the domain's filled prompts
    on_error: str = "raise"  # raise: stop on bad rows (all listed) | skip: drop them and go on
    allow_outside_root: bool = True  # read images outside the CSV/JSON's folder (/data/images/...); false refuses them
    check_images: bool = True  # decode every image before training (catches truncated files)
    cache_images: str = "auto"  # auto | memory | disk | none: cache decoded, resized images
    cache_memory_mb: int = 2048  # auto: the memory cache's limit
    cache_dir: Optional[str] = None  # disk cache folder; null = ./.clipexp_cache
    # data=webdataset (clipexp.data.webdataset, docs/shards.md): shards streamed into the trainer
    urls: Optional[str] = None  # train shards: a brace pattern, paths or pipe: URLs ('::' joins several)
    val_urls: Optional[str] = None  # validation shards (same forms as urls)
    test_urls: Optional[str] = None  # test shards
    manifest: Optional[str] = None  # null = manifest.json beside the first shard (else img2dataset's _stats.json)
    image_key: str = "jpg;jpeg;png;webp"  # extensions tried for a sample's image, in order
    caption_key: str = "txt"  # an extension or json.<field>
    label_key: Optional[str] = "json.label"  # json.<field>, an extension (cls), or null (unlabelled)
    shuffle_buffer: int = 1000  # samples held for shuffling the stream
    max_bad_fraction: float = 0.01  # stop when more than this share of streamed samples is bad


@dataclass
class EvalDataConfig(DataConfig):
    """A second, evaluation-only data source (``eval_data=<option>``): e.g. a "retention" set that measures
    what fine-tuning forgot. Its metrics are ``<name>/...`` next to ``val/...`` at every evaluation."""

    name: str = "retention"  # its metrics are logged as <name>/...
    split: str = "val"  # which of its splits to evaluate (its own *_split keys and the run's seed), or all
    prompt_templates: Optional[List[str]] = None  # zero-shot prompts; null = the run's domain prompts


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto | cuda | mps | cpu
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 never on CPU)
    channels_last: bool = False  # images in channels-last memory layout (helps convolutional towers)
    compile: bool = False  # torch.compile the model


@dataclass
class EMAConfig:
    decay: Optional[float] = None  # EMA of the weights, updated every optimizer step; null or 0 = off


@dataclass
class WiseFTConfig:
    alphas: List[float] = field(default_factory=list)  # e.g. [0, 0.25, 0.5, 0.75, 1]; empty = off
    select: str = "best_val"  # best_val (by trainer.monitor) or one of the alphas: the weights saved as the model


@dataclass
class TrainerConfig:
    # --- Optimisation (learning_rate and num_epochs come from the domain unless set here or on the command line)
    learning_rate: float = 5e-5  # peak learning rate, after warm-up (default: the domain's)
    batch_size: Optional[int] = None  # micro-batch per process; null = automatic (the largest that fits; an estimate on CPU/MPS)
    num_epochs: int = 10  # run length when max_steps is null (default: the domain's)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (wins over num_epochs)
    warmup_steps: int = 500  # linear warm-up, then cosine decay to 0 (scaled to 10% of a shorter run)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    accumulation: str = "plain"  # plain: micro-batch losses averaged | exact: GradCache, the whole logical batch as negatives
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    weight_decay: float = 0.01  # AdamW decay, never on norms, biases or the temperature; on embeddings only with decay_embeddings
    decay_embeddings: bool = False  # weight decay on token / position embeddings too (as open_clip's trainer); norms, biases, temperatures never
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.98  # AdamW beta2
    adam_eps: float = 1e-6  # AdamW epsilon
    fused_adamw: bool = True  # fused AdamW (used on CUDA only)
    pack_captions: bool = True  # each distinct caption of a batch encoded once, padding cut to the longest
    # --- Evaluation, checkpoints and logging (in optimizer steps; intervals longer than the run are scaled to it)
    eval_at_start: bool = True  # evaluate before the first step: the pre-fine-tuning baseline, logged at step 0
    eval_steps: int = 500  # evaluate on val every N optimizer steps (and at the last step)
    eval_batch_size: Optional[int] = None  # null = max(batch_size, 32)
    save_steps: int = 1000  # write a step checkpoint every N optimizer steps (and at the last step)
    logging_steps: int = 100  # log train/* metrics every N optimizer steps
    monitor: str = "val/t2i_R1"  # the metric that picks the best checkpoint (best.pt, tested at the end) and stops early
    monitor_mode: str = "max"  # max | min: which direction of trainer.monitor is better
    keep_last: int = 2  # step checkpoints kept (best.pt is kept apart)
    early_stopping_patience: Optional[int] = None  # evaluations without improvement before stopping; null = off
    progress: bool = True  # show the progress bar
    # --- Resume (docs/fault-tolerance.md)
    resume: Optional[str] = None  # latest | latest_or_new | <run folder> | <checkpoint file>: this run's folder or the one named
    resume_allow_changes: Any = False  # true, or keys / group prefixes the resumed run may change
    # --- torchrun (docs/distributed.md): global batch = batch_size x processes x gradient_accumulation_steps
    dist_timeout_s: int = 1800  # a collective waiting longer than this fails the job (no hang)
    # --- Robust fine-tuning (docs/robust-finetuning.md)
    layer_decay: Optional[float] = None  # per tower: layer i of L gets lr x decay^(L - i); null = off
    head_lr: Optional[float] = None  # projection heads; null = learning_rate
    logit_scale_lr: Optional[float] = None  # the temperature (logit scale, a loss's own temperature/bias); null = learning_rate
    ema: EMAConfig = field(default_factory=EMAConfig)  # an exponential moving average of the weights
    wise_ft: WiseFTConfig = field(default_factory=WiseFTConfig)  # weight-space ensembles of the start and the fine-tuned model


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow; false = the run folder only
    uri: Optional[str] = None  # null = MLFLOW_TRACKING_URI, else sqlite:///<current folder>/mlflow.db (tracking.tracker.default_tracking_uri)
    experiment: str = "clipexp"  # MLflow experiment name
    run_name: Optional[str] = None  # null = "model, loss, domain, data, seed N"; a sweep's job: its swept values
    log_model: bool = True  # log model/ (the save_pretrained folder) as artifacts
    pyfunc_model: bool = True  # the MLflow pyfunc model runs:/<id>/clip (clipexp.serving.logged_model); ~5 s of CPU per run
    register_model: Optional[str] = None  # a Model Registry name: register the run's "clip" model under it
    serve_file_root: Optional[str] = None  # a folder the served model may read images from (null: it reads no server files)
    system_metrics: bool = True  # log MLflow's CPU / GPU / memory system metrics (every 10 s, ~15 ms of CPU each)
    retry_s: float = 30.0  # store unreachable mid-run: writes are held and retried this often
    end_timeout_s: float = 60.0  # at the end, wait this long for held writes before spooling them to the run folder


@dataclass
class ConformalConfig:
    alpha: float = 0.1  # miscoverage: a prediction set holds the true class with probability >= 1 - alpha
    score: str = "lac"  # lac: 1 - p (the smallest sets; can be empty) | aps: cumulative probability (adaptive; never empty)
    mondrian: bool = False  # one threshold per class: 1 - alpha within every class, not only over all


@dataclass
class EvalConfig:
    """Heads on the image embeddings (docs/heads.md): fitted on the training split, calibrated on val, measured
    on val and test at the end of a run."""

    heads: List[str] = field(default_factory=lambda: list(HEADS))  # zero_shot | prototype | knn | linear | tip; [] = none
    shots: List[int] = field(default_factory=list)  # k-shot protocol: examples per class, e.g. [1,2,4,8,16]; [] = off
    draws: int = 5  # seeded k-shot draws per number of shots (mean +- std)
    calibrate: bool = True  # temperature scaling per head, fitted on val by NLL
    conformal: ConformalConfig = field(default_factory=ConformalConfig)
    at_each_eval: bool = False  # also at every evaluation: val/<head>/... (embeds the training split each time)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)
    # conf/loss/<name>.yaml: the class in _target_ and its constructor's arguments (instantiated by the trainer)
    loss: Dict[str, Any] = field(default_factory=lambda: {"_target_": "clipexp.losses.CLIPContrastiveLoss"})
    # conf/temperature_schedule/<name>.yaml: a clipexp.losses.TemperatureScheduler applied every step unless constant
    temperature_schedule: Dict[str, Any] = field(default_factory=lambda: {"_target_": "clipexp.losses.TemperatureScheduler",
                                                                           "schedule_type": "constant"})
    data: DataConfig = field(default_factory=DataConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval_data: Optional[EvalDataConfig] = None  # eval_data=<option>: an extra evaluation-only data source
    eval: EvalConfig = field(default_factory=EvalConfig)  # heads, calibration and prediction sets at the end of a run
    seed: int = 42  # seeds weights of built models, splits, order, augmentation
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

