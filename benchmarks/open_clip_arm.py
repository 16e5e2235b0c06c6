"""(d) of ``throughput.py``: open_clip's own trainer (``open_clip_train.main``) on the model and data of (a).

The model is written as an open_clip model config and registered (``open_clip.add_model_config``) in the
measuring process: the ``tiny_open_clip`` family's ModifiedResNet config is the one clipexp builds
(:func:`clipexp.models.open_clip_family.tiny_open_clip_config`); a ViT is open_clip's ``VisionTransformer``
+ text transformer at the benchmark model's widths, layers, heads and MLP sizes (``vit-b32-arch``: open_clip's
``ViT-B-32`` with quick-GELU, as HF CLIP). The training pairs are (a)'s train split, written as open_clip's
tab-separated CSV (``filepath``, ``title``). open_clip then runs as its users run it: its CSV dataset (PIL
open, its train transform, its tokenizer per item), its loader, AdamW with decay off gains and biases, the
logit-scale clamp, no evaluation and no checkpoint before the last timed step.

Timing is (a)'s: a stamp after every optimizer step (after ``scaler.update`` when a GradScaler runs), from
the end of step ``--warmup`` to the end of the last step; then the run is stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

# --precision of throughput.py -> open_clip_train's --precision (autocast + fp32 weights, as clipexp)
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}
CONFIG_PREFIX = "clipexp_bench_"


def vit_config(arch: Dict[str, int], resolution: int, seq_len: int) -> Dict[str, Any]:
    """An open_clip ViT CLIP config with the widths, depths, heads and MLP sizes of a throughput.py model."""
    dv, dt = int(arch["vision_hidden_size"]), int(arch["text_hidden_size"])
    if dv % int(arch["vision_heads"]):
        raise ValueError(f"vision width {dv} is not a multiple of its {arch['vision_heads']} heads")
    return {
        "embed_dim": int(arch["projection_dim"]),
        "quick_gelu": True,  # HF CLIP's activation (CLIPConfig hidden_act="quick_gelu")
        "vision_cfg": {"image_size": int(resolution), "layers": int(arch["vision_layers"]), "width": dv,
                       "head_width": dv // int(arch["vision_heads"]), "mlp_ratio": arch["vision_intermediate_size"] / dv,
                       "patch_size": int(arch["patch_size"])},
        "text_cfg": {"context_length": int(seq_len), "vocab_size": 49408, "width": dt, "heads": int(arch["text_heads"]),
                     "layers": int(arch["text_layers"]), "mlp_ratio": arch["text_intermediate_size"] / dt},
    }


def model_config(family: str, arch: Dict[str, int], resolution: int, seq_len: int) -> Dict[str, Any]:
    """The open_clip config of a benchmark model: ``open_clip_conv`` (clipexp's tiny_open_clip ModifiedResNet)
    or a ViT (``hf`` / ``open_clip``: the same widths in open_clip's modules)."""
    if family == "open_clip_conv":
        from clipexp.models.open_clip_family import tiny_open_clip_config

        return tiny_open_clip_config(arch, resolution, seq_len)
    return vit_config(arch, resolution, seq_len)


def register(name: str, config: Dict[str, Any], directory: Path) -> str:
    """Write ``config`` as ``<directory>/<CONFIG_PREFIX><name>.json`` and register it with open_clip (this
    process only); returns the model name ``open_clip.create_model`` and ``open_clip_train --model`` take."""
    import open_clip

    model_name = CONFIG_PREFIX + name.replace("-", "_")
    path = Path(directory) / f"{model_name}.json"
    path.write_text(json.dumps(config, indent=2))
    open_clip.add_model_config(path)
    return model_name


def write_train_csv(path: Path, image_paths: Sequence[str], captions: Sequence[str]) -> Path:
    """open_clip's CSV dataset input: tab-separated, columns ``filepath`` and ``title``."""
    if len(image_paths) != len(captions):
        raise ValueError(f"{len(image_paths)} images but {len(captions)} captions")
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        out.writerow(["filepath", "title"])
        for image, caption in zip(image_paths, captions):
            if "\t" in caption or "\n" in caption:
                raise ValueError(f"caption of {image} holds a tab or newline: open_clip's CSV reader would split it")
            out.writerow([str(image), caption])
    return path


def train_argv(*, model: str, train_csv: Path, logs: Path, batch_size: int, workers: int, precision: str, device: str,
               epochs: int, lr: float, weight_decay: float, betas: Sequence[float], eps: float, grad_clip: Optional[float],
               seed: int) -> List[str]:
    """``open_clip_train.main`` arguments for one timed run (no evaluation, no checkpoint, no reporting)."""
    argv = [
        "--model", model, "--train-data", str(train_csv), "--dataset-type", "csv", "--csv-separator", "\t",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--batch-size", str(batch_size), "--workers", str(workers), "--precision", OPEN_CLIP_PRECISION[precision],
        "--device", device, "--epochs", str(epochs), "--lr", str(lr), "--warmup", "0", "--wd", str(weight_decay),
        "--beta1", str(betas[0]), "--beta2", str(betas[1]), "--eps", str(eps),
        "--logs", str(logs), "--name", "bench", "--save-frequency", "0", "--report-to", "", "--seed", str(seed),
    ]
    if grad_clip:
        argv += ["--grad-clip-norm", str(grad_clip)]
    return argv


class _Done(Exception):
    """Raised after the last timed step: the rest of open_clip's epoch is not wanted."""


def run_timed(argv: List[str], total: int, marks: Set[int] = frozenset(), on_mark: Callable[[int], None] = lambda step: None) -> List[float]:
    """Run ``open_clip_train.main(argv)`` and stop it after ``total`` optimizer steps; returns the
    ``time.perf_counter()`` after each step. ``on_mark(step)`` runs right before the stamp of each step in
    ``marks`` (1-based: a device sync, CPU seconds)."""
    import open_clip_train.main as oc_main

    stamps: List[float] = []
    real_epoch = oc_main.train_one_epoch

    def stamp() -> None:
        if len(stamps) + 1 in marks:
            on_mark(len(stamps) + 1)
        stamps.append(time.perf_counter())
        if len(stamps) >= total:
            raise _Done

    def timed_epoch(model, data, loss, epoch, optimizer, scaler, *rest, **kw):
        # the optimizer step ends with scaler.update() under a GradScaler (fp16), with optimizer.step() otherwise
        target, name = (scaler, "update") if scaler is not None else (optimizer, "step")
        inner = getattr(target, name)

        def timed(*a, **k):
            out = inner(*a, **k)
            stamp()
            return out

        setattr(target, name, timed)
        try:
            return real_epoch(model, data, loss, epoch, optimizer, scaler, *rest, **kw)
        finally:
            delattr(target, name)  # the instance attribute goes; the class's method shows again

    oc_main.train_one_epoch = timed_epoch
    # open_clip's setup_logging adds handlers to the root logger and sets every logger's level: put them back after
    root = logging.getLogger()
    handlers, levels = list(root.handlers), {name: lg.level for name, lg in _loggers()}
    try:
        oc_main.main(argv)
    except _Done:
        pass
    finally:
        oc_main.train_one_epoch = real_epoch
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        for name, lg in _loggers():
            lg.setLevel(levels.get(name, logging.NOTSET))
    if len(stamps) < total:
        raise RuntimeError(f"open_clip's trainer stopped after {len(stamps)} of {total} steps")
    return stamps


def _loggers():
    yield "", logging.getLogger()
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            yield name, lg


def epochs_for(total_steps: int, train_pairs: int, batch_size: int) -> int:
    """Epochs open_clip must be given to reach ``total_steps`` (its loader drops the last partial batch)."""
    per_epoch = train_pairs // batch_size
    if per_epoch < 1:
        raise ValueError(f"{train_pairs} training pairs make no batch of {batch_size}")
    return -(-total_steps // per_epoch)

