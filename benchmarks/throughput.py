"""Training throughput of clipexp against its compute limit and against a Hugging Face Trainer.

    python benchmarks/throughput.py                          # small CLIP, textile JPEGs, batch 64, CPU
    python benchmarks/throughput.py --steps 20 --repeats 3
    python benchmarks/throughput.py --model vit-b32-arch --device cuda --precision bf16 --batch-size 256

Four measurements of the same model, data and batch, each in its own process (so thread settings,
memory peaks and caches of one never leak into another), ``--repeats`` times, interleaved:

(a) clipexp   the clipexp ``Trainer`` end to end on the real textile JPEGs (decode + cache, augmentation,
              loader workers, forward/backward, clipping, AdamW, logging), tracking off, no evaluation
              or checkpoint before the last step. Timed from the end of optimizer step ``--warmup`` to
              the end of the last step.
(a0)          (a) with ``trainer.pack_captions=false`` (every caption encoded, padded to 77 tokens).
(b) bare      the same model's training step on tensors already on the device: one real training batch
              moved there once by the trainer's ``DeviceBatches`` (normalised, captions packed); forward of both
              towers in the run's precision, the clipexp loss, backward, gradient clipping, AdamW. No
              data, no bookkeeping: the compute limit of what (a) computes.
(c) hf        ``transformers.Trainer`` on the same model (same architecture and seed), the same training
              images and batch, fed by the dataset most people start from: open each JPEG with PIL, run
              the ``CLIPProcessor`` on it and tokenize its caption per item; ``CLIPModel(return_loss=True)``
              gives the CLIP loss. Its defaults otherwise (0 loader workers, fused AdamW).

(a), (b) and (c) build their config, model, processor and data with the package's own builders
(:func:`clipexp_setup`), so they train the same weights on the same split.

Printed: samples/s of each (median and range over the repeats), the ratios a/b and a/c, peak memory
(CPU: peak RSS of the process, and of the process plus its loader workers sampled every 50 ms; CUDA:
``torch.cuda.max_memory_allocated``), and the model FLOPs per sample with the achieved TFLOP/s and the
model FLOPs utilisation (MFU) where the device's peak is known. FLOPs are counted per layer, forward
``2 x MACs`` of every matmul (QKV/output projections, MLP, attention scores and values, patch embedding,
projections), training = 3 x forward (backward ~ 2 x forward); embeddings, norms, softmax and the loss
are left out; the count is the unpacked model's, so with caption packing it credits the packing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "benchmarks"):  # clipexp, and this script's sibling modules when imported from elsewhere
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

RESULT_MARK = "THROUGHPUT_RESULT "

# Model sizes per --model. "small": the CPU target of the issue (4+4 layers, width 256). ``family``: how clipexp
# builds it: "hf" (HF CLIPModel, byte-level tokenizer; --family open_clip builds the same ViT in open_clip's
# modules) or "open_clip_conv" (conf/model/tiny_open_clip.yaml: open_clip's ModifiedResNet + its BPE tokenizer).
MODELS: Dict[str, Dict[str, Any]] = {
    "tiny_open_clip": dict(resolution=64, family="open_clip_conv",
                           arch=dict(projection_dim=64, patch_size=8, vision_hidden_size=64, vision_layers=2, vision_heads=2,
                                     vision_intermediate_size=128, text_hidden_size=64, text_layers=2, text_heads=2,
                                     text_intermediate_size=128)),
    "tiny": dict(resolution=64, arch=dict(projection_dim=64, patch_size=8, vision_hidden_size=64, vision_layers=2, vision_heads=2,
                                          vision_intermediate_size=128, text_hidden_size=64, text_layers=2, text_heads=2,
                                          text_intermediate_size=128)),
    "small": dict(resolution=224, arch=dict(projection_dim=256, patch_size=32, vision_hidden_size=256, vision_layers=4, vision_heads=4,
                                            vision_intermediate_size=1024, text_hidden_size=256, text_layers=4, text_heads=4,
                                            text_intermediate_size=1024)),
    # OpenAI CLIP ViT-B/32's architecture with random weights (vocabulary: clipexp's 514 byte-level tokens,
    # not 49,408 BPE tokens: 25M fewer embedding parameters, no difference in matmul FLOPs)
    "vit-b32-arch": dict(resolution=224, arch=dict(projection_dim=512, patch_size=32, vision_hidden_size=768, vision_layers=12,
                                                   vision_heads=12, vision_intermediate_size=3072, text_hidden_size=512, text_layers=12,
                                                   text_heads=8, text_intermediate_size=2048)),
}

# Dense (no sparsity) peak TFLOP/s of tensor cores by device name: (bf16/fp16, tf32). Datasheet figures.
PEAK_TFLOPS = [
    ("H200", (989.0, 494.0)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.0, 418.0)),
    ("H100", (989.0, 494.0)),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("GH200", (989.0, 494.0)),
    ("B200", (2250.0, 1100.0)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("L4", (121.0, 60.0)),
    ("A10G", (70.0, 35.0)),
    ("A10", (125.0, 62.5)),
    ("RTX 4090", (165.0, 82.6)),
    ("RTX 3090", (71.0, 35.6)),
]


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def model_spec(args) -> Dict[str, Any]:
    spec = MODELS[args.model]
    arch = dict(spec["arch"])
    if args.patch is not None:
        arch["patch_size"] = args.patch
    own = spec.get("family", "hf")
    family = own if own == "open_clip_conv" else (args.family or own)  # --family picks how a ViT is built
    return {"arch": arch, "resolution": args.resolution or spec["resolution"], "seq_len": 77, "family": family}


def open_clip_config(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The model as an open_clip model config (what (d) trains, and clipexp with ``--family open_clip``)."""
    from open_clip_arm import model_config

    return model_config(spec["family"], spec["arch"], spec["resolution"], spec["seq_len"])


def counted_flops_per_sample(config: Dict[str, Any], resolution: int, seq_len: int) -> Dict[str, float]:
    """Matmul, convolution and attention FLOPs of one sample's forward through an open_clip model built from
    ``config``, counted by ``torch.utils.flop_counter`` (2 x MACs, as :func:`flops_per_sample`); training =
    3 x forward. In train mode with autograd on: ``nn.MultiheadAttention``'s inference fast path is one op the
    counter does not see; CPU's attention kernel is counted with the counter's own SDPA formula (a ViT's
    count then equals :func:`flops_per_sample` exactly, tested)."""
    import torch
    from open_clip.model import CLIP
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query_shape, key_shape, value_shape, *_, out_shape=None, **__):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    model = CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"], text_cfg=config["text_cfg"]).train()
    counter = FlopCounterMode(display=False, custom_mapping={cpu_sdpa: sdpa} if cpu_sdpa is not None else None)
    with counter:
        model.encode_image(torch.zeros(1, 3, resolution, resolution))
        model.encode_text(torch.ones(1, seq_len, dtype=torch.long))
    forward = float(counter.get_total_flops())
    return {"forward": forward, "train": 3 * forward, "vision_tokens": None, "text_tokens": seq_len}


def spec_flops(spec: Dict[str, Any]) -> Dict[str, float]:
    """FLOPs per sample of the benchmark model: by formula for a ViT, counted for the conv tower."""
    if spec["family"] == "open_clip_conv":
        return counted_flops_per_sample(open_clip_config(spec), spec["resolution"], spec["seq_len"])
    return flops_per_sample(spec["arch"], spec["resolution"], spec["seq_len"])


def flops_per_sample(arch: Dict[str, int], resolution: int, seq_len: int) -> Dict[str, float]:
    """Matmul FLOPs of one sample (see the module doc): forward, and training (3 x forward)."""

    def layer(n: int, d: int, f: int) -> float:
        return 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d  # QKV+out, MLP, QK^T and attention x V

    p = arch["patch_size"]
    patches = (resolution // p) ** 2
    n_v, d_v, d_t = patches + 1, arch["vision_hidden_size"], arch["text_hidden_size"]
    vision = arch["vision_layers"] * layer(n_v, d_v, arch["vision_intermediate_size"]) + 2 * patches * 3 * p * p * d_v
    text = arch["text_layers"] * layer(seq_len, d_t, arch["text_intermediate_size"])
    heads = 2 * (d_v + d_t) * arch["projection_dim"]
    forward = vision + text + heads
    return {"forward": forward, "train": 3 * forward, "vision_tokens": n_v, "text_tokens": seq_len}


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    for key, (half, tf32) in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return half if precision in ("bf16", "fp16") else tf32
    return None


class MemoryWatch:
    """Peak RSS of this process and of this process + its children (loader workers), sampled every 50 ms."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                total = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            except Exception:  # a worker exiting between listing and reading
                total = 0
            self.peak_tree = max(self.peak_tree, total)
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> Dict[str, float]:
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_tree_rss_mb": self.peak_tree / 2**20}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (loader workers) so far."""
    import psutil

    proc = psutil.Process()
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except Exception:  # exited meanwhile
            pass
    return total


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _quiet() -> None:
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.WARNING)


def _device_info(device: str) -> Dict[str, Any]:
    import torch

    if device == "cuda":
        return {"device_name": torch.cuda.get_device_name(0)}
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device_name": f"{name} ({os.cpu_count()} cores)"}


def _model_overrides(args, spec) -> List[str]:
    """clipexp's model section for the benchmark model: HF CLIP (``model=tiny`` at these sizes), the
    tiny_open_clip conv model at these sizes, or (``--family open_clip``) the ViT that
    :func:`prepare_process` registered with open_clip in this process."""
    arch = [f"model.architecture.{k}={v}" for k, v in spec["arch"].items()]
    common = [f"model.name=bench_{args.model}", f"model.image_resolution={spec['resolution']}",
              f"model.max_sequence_length={spec['seq_len']}"]
    if spec["family"] == "open_clip_conv":
        return ["model=tiny_open_clip", *common, *arch]
    if spec["family"] == "open_clip":
        return ["model=open_clip", *common, f"model.arch={args.open_clip_model}", "model.pretrained=null"]
    return ["model=tiny", *common, *arch]


def _data_overrides(args) -> List[str]:
    """The textile set (its 3 templated captions), or with ``--captions unique`` the same images from the CSV
    :func:`prepare_process` wrote for this process (one caption per image)."""
    if args.captions == "unique":
        return ["data=csv", f"data.path={args.unique_csv}", "data.allow_outside_root=true"]
    return ["data=textile"]


def _clipexp_overrides(args, spec) -> List[str]:
    steps = args.warmup + args.steps
    out = [
        *_model_overrides(args, spec), *_data_overrides(args), f"domain={args.domain}", "tracking.enabled=false",
        f"device.type={args.device}", f"device.precision={args.precision}",
        f"trainer.batch_size={args.batch_size}", f"trainer.max_steps={steps}", "trainer.warmup_steps=0",
        "trainer.learning_rate=1e-4", "trainer.eval_at_start=false",
        f"trainer.eval_steps={10 ** 9}", f"trainer.save_steps={10 ** 9}", "trainer.logging_steps=1", "trainer.progress=false",
        f"seed={args.seed}",
    ]
    if args.workers is not None:
        out.append(f"data.num_workers={args.workers}")
    return out + list(args.set)


def clipexp_setup(args, images_on_disk: bool = False) -> SimpleNamespace:
    """(a)'s run config, device, model, processor and datasets, made by the trainer's own builders (the
    same seed: the same weights and the same train split). ``images_on_disk``: no image cache and no
    decoding up front (for (b) and (c), which read a few images or decode their own)."""
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.data.dataloader import collate_fn
    from clipexp.device import build_device
    from clipexp.models.levers import build_training_model
    from clipexp.training.checkpoint import seed_everything
    from clipexp.training.data import build_data

    extra = ["data.cache_images=none", "data.check_images=false"] if images_on_disk else []
    cfg = compose_and_validate(_clipexp_overrides(args, model_spec(args)) + extra)
    devices = build_device(cfg.device)
    seed_everything(cfg.seed)
    model, processor = build_training_model(cfg.model, cfg.device, devices.device)
    return SimpleNamespace(cfg=cfg, dev=devices.info, device=devices.device, model=model, processor=processor,
                           data=build_data(cfg, processor), collate=collate_fn)


# --------------------------------------------------------------------------------------------------
# (a) the clipexp Trainer
# --------------------------------------------------------------------------------------------------


def measure_clipexp(args, extra: tuple = ()) -> Dict[str, Any]:
    import torch

    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    spec = model_spec(args)
    cfg = compose_and_validate(_clipexp_overrides(args, spec) + list(extra))
    stamps: List[float] = []
    cpu: List[float] = []
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out, MemoryWatch() as mem:
        trainer = Trainer(cfg, Path(out))
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        update = trainer.scaler.update

        def timed_update(*a, **k):  # once per optimizer step, right after it (also when fp16 skips a step)
            result = update(*a, **k)
            if len(stamps) + 1 in (args.warmup, total):
                _sync(args.device)
                cpu.append(cpu_seconds())
            stamps.append(time.perf_counter())
            return result

        trainer.scaler.update = timed_update
        if args.trainer_threads:  # experiment: override the trainer's CPU thread choice (cores - loader workers)
            torch.set_num_threads(args.trainer_threads)
        threads = torch.get_num_threads()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer.train()
        finally:
            trainer.cleanup()
    elapsed = stamps[total - 1] - stamps[args.warmup - 1]
    samples = args.steps * trainer.global_batch if hasattr(trainer, "global_batch") else args.steps * trainer.logical_batch
    hist = [v for s, v in trainer.history.get("train/samples_per_s", []) if s > args.warmup]
    result = {
        "samples_per_s": samples / elapsed, "step_s": elapsed / args.steps, "setup_s": setup_s,
        "cpu_ms_per_sample": 1e3 * (cpu[-1] - cpu[0]) / samples,
        "history_samples_per_s": (len(hist) / sum(1 / v for v in hist)) if hist else None,
        "threads": threads, "workers": trainer.train_loader.num_workers,
        "cache": getattr(trainer.data.cache, "mode", "none") if trainer.data.cache is not None else "none",
        "train_pairs": len(trainer.data.train), "precision": trainer.device_info.precision, **mem.result(),
    }
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# --------------------------------------------------------------------------------------------------
# (b) the bare model step
# --------------------------------------------------------------------------------------------------


def measure_bare(args) -> Dict[str, Any]:
    import torch
    from hydra.utils import instantiate
    from clipexp.models.clip import image_features, text_features
    from clipexp.training.data import DeviceBatches, text_has_dropout
    from clipexp.training.optim import build_optimizer, trainable_parameters

    if args.measure == "b1" and args.device == "cpu":  # the compute threads the trainer keeps for itself on CPU
        from clipexp.data.dataloader import default_num_workers as default_train_workers
        from clipexp.training.data import default_train_threads

        cores = os.cpu_count() or 1
        workers = args.workers if args.workers is not None else default_train_workers(cores, "cpu")
        torch.set_num_threads(default_train_threads(cores, workers))
    elif args.bare_threads:
        torch.set_num_threads(args.bare_threads)
    with MemoryWatch() as mem:
        run = clipexp_setup(args, images_on_disk=True)
        cfg, dev, model, train = run.cfg, run.dev, run.model.train(), run.data.train
        loss_fn = instantiate(cfg.loss, _convert_="all").to(run.device)  # as the trainer builds it
        t = cfg.trainer
        optimizer, scaler = build_optimizer(t, model, loss_fn, dev.type, dev.use_grad_scaler)
        # one real training batch (augmented items, packed captions), moved to the device once, as the trainer moves it
        b = args.batch_size
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:b].tolist()
        to_device = DeviceBatches(run.device, train.image_transform, t.pack_captions, t.pack_captions and not text_has_dropout(model))
        batch = to_device(run.collate([train[i % len(train)] for i in order]))
        params = trainable_parameters(optimizer)

        def step():
            with dev.autocast():
                img = image_features(model, batch["pixel_values"])
                txt = text_features(model, batch["input_ids"], batch["attention_mask"], text_index=batch["text_index"])
            out = loss_fn(img, txt, group_ids=batch["group_ids"], labels=batch["labels"], logit_scale=model.logit_scale)
            scaler.scale(out["loss"]).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step()
        _sync(args.device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(args.steps):
            step()
        _sync(args.device)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    result = {"samples_per_s": args.steps * b / elapsed, "step_s": elapsed / args.steps, "threads": torch.get_num_threads(),
              "cpu_ms_per_sample": 1e3 * cpu / (args.steps * b),
              "params": sum(p.numel() for p in model.parameters()), "precision": dev.precision, **mem.result()}
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# --------------------------------------------------------------------------------------------------
# (c) a Hugging Face transformers.Trainer with a plain PIL dataset
# --------------------------------------------------------------------------------------------------


class PILCaptionDataset:
    """What most people write first: open the image, run the CLIPProcessor, tokenize, per item."""

    def __init__(self, paths: List[str], captions: List[str], processor, max_length: int):
        self.paths, self.captions, self.processor, self.max_length = paths, captions, processor, max_length

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        from PIL import Image

        image = Image.open(self.paths[i]).convert("RGB")
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        tok = self.processor.tokenizer(self.captions[i], padding="max_length", truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": tok["input_ids"][0], "attention_mask": tok["attention_mask"][0]}


def clip_collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    import torch

    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batch["return_loss"] = True
    return batch


def measure_hf(args) -> Dict[str, Any]:
    import torch
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    run = clipexp_setup(args, images_on_disk=True)  # the same model, processor and training pairs as (a)
    train, model = run.data.train, run.model
    dataset = PILCaptionDataset(train.image_paths, train.captions, run.processor, model_spec(args)["seq_len"])
    stamps: List[float] = []
    cpu: List[float] = []
    total = args.warmup + args.steps

    class Stamp(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if len(stamps) + 1 in (args.warmup, total):
                _sync(args.device)
                cpu.append(cpu_seconds())
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out, MemoryWatch() as mem:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=total, learning_rate=1e-4,
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=args.workers if args.workers is not None else 0, remove_unused_columns=False,
            bf16=args.precision == "bf16", fp16=args.precision == "fp16", use_cpu=args.device == "cpu", seed=args.seed,
        )
        trainer = HFTrainer(model=model, args=targs, train_dataset=dataset, data_collator=clip_collate, callbacks=[Stamp()])
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    elapsed = stamps[total - 1] - stamps[args.warmup - 1]
    result = {"samples_per_s": args.steps * args.batch_size / elapsed, "step_s": elapsed / args.steps, "threads": torch.get_num_threads(),
              "cpu_ms_per_sample": 1e3 * (cpu[-1] - cpu[0]) / (args.steps * args.batch_size), "workers": targs.dataloader_num_workers, "optim": getattr(targs.optim, "value", str(targs.optim)), "train_pairs": len(dataset), **mem.result()}
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_clipexp_unpacked(args) -> Dict[str, Any]:
    return measure_clipexp(args, ("trainer.pack_captions=false",))


# --------------------------------------------------------------------------------------------------
# (d) open_clip's own trainer
# --------------------------------------------------------------------------------------------------


def measure_open_clip(args) -> Dict[str, Any]:
    """open_clip_train.main on (a)'s model, train split, batch, loader workers, CPU threads and precision
    (see open_clip_arm.py); timed as (a)."""
    import torch

    from clipexp.data.dataloader import default_num_workers as default_train_workers
    from clipexp.training.data import train_threads
    from open_clip_arm import epochs_for, register, run_timed, train_argv, write_train_csv

    spec = model_spec(args)
    run = clipexp_setup(args, images_on_disk=True)  # the same training pairs as (a) (same source, seed and split)
    train, t = run.data.train, run.cfg.trainer
    cores = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else default_train_workers(cores, args.device)
    if args.device == "cpu":  # (a)'s rule (clipexp.training.data.train_threads), or --trainer-threads as (a)
        torch.set_num_threads(args.trainer_threads or train_threads(cores, workers))
    total = args.warmup + args.steps
    cpu: List[float] = []

    def mark(step: int) -> None:
        _sync(args.device)
        cpu.append(cpu_seconds())

    with tempfile.TemporaryDirectory(prefix="clipexp_open_clip_") as tmp, MemoryWatch() as mem:
        work = Path(tmp)
        name = register(args.model, open_clip_config(spec), work)
        csv_path = write_train_csv(work / "train.tsv", train.image_paths, train.captions)
        argv = train_argv(model=name, train_csv=csv_path, logs=work / "logs", batch_size=args.batch_size, workers=workers,
                          precision=args.precision, device=args.device, epochs=epochs_for(total, len(train), args.batch_size),
                          lr=1e-4, weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                          grad_clip=t.max_grad_norm if t.max_grad_norm > 0 else None, seed=args.seed)
        del run  # clipexp's copy of the model and data: not part of open_clip's memory
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stamps = run_timed(argv, total, {args.warmup, total}, mark)
    elapsed = stamps[total - 1] - stamps[args.warmup - 1]
    samples = args.steps * args.batch_size
    result = {"samples_per_s": samples / elapsed, "step_s": elapsed / args.steps, "cpu_ms_per_sample": 1e3 * (cpu[-1] - cpu[0]) / samples,
              "threads": torch.get_num_threads(), "workers": workers, "train_pairs": len(train), "precision": args.precision,
              "open_clip_precision": argv[argv.index("--precision") + 1], **mem.result()}
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


MEASURES = {"a": measure_clipexp, "a0": measure_clipexp_unpacked, "b": measure_bare, "b1": measure_bare, "c": measure_hf,
            "d": measure_open_clip}
LABELS = {"a": "(a) clipexp Trainer, end to end", "a0": "(a0) clipexp, pack_captions=false",
          "b": "(b) bare model step (tensors)", "b1": "(b') bare step, trainer's threads",
          "c": "(c) HF transformers.Trainer + PIL", "d": "(d) open_clip_train (its CSV data)"}


def prepare_process(args, workdir: Path) -> None:
    """What a measuring process needs before it composes a config: with ``--captions unique`` the CSV of the
    textile images with distinct captions (``args.unique_csv``); with ``--family open_clip`` the benchmark ViT
    registered with open_clip (``args.open_clip_model``). Files go to ``workdir``."""
    from bench_data import write_unique_caption_csv

    args.unique_csv = args.open_clip_model = None
    if args.captions == "unique":
        args.unique_csv = write_unique_caption_csv(workdir / "unique_captions.csv")
    spec = model_spec(args)
    if spec["family"] == "open_clip":
        from open_clip_arm import register

        args.open_clip_model = register(args.model, open_clip_config(spec), workdir)


# --------------------------------------------------------------------------------------------------
# Orchestration and report
# --------------------------------------------------------------------------------------------------


def _child(args, which: str) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", which, *args.argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            result["wall_s"] = time.perf_counter() - t0
            return result
    raise RuntimeError(f"measurement {which} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _spread(values: List[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:8.2f}"
    return f"{med:8.2f}  [{min(values):.2f}-{max(values):.2f}]"


# (numerator, denominator, target or None, what the ratio says)
RATIOS = [("a", "b", 0.90, ""), ("a", "b1", None, "same compute threads: the trainer's own overhead"),
          ("a", "c", 1.30, ""), ("a0", "c", None, "without caption packing"), ("a", "a0", None, "what caption packing gives"),
          ("a", "d", 1.00, "")]
DEN_NAMES = {"b1": "b'"}


def ratios(results: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Each ratio of :data:`RATIOS` whose two measurements ran: median / median, the per-repeat range (the
    repeats paired in the order they ran: interleaved, so each pair shared the machine's state), best / best,
    and whether it meets its target."""
    out = []
    for num, den, target, why in RATIOS:
        if not results.get(num) or not results.get(den):
            continue
        a = [r["samples_per_s"] for r in results[num]]
        b = [r["samples_per_s"] for r in results[den]]
        per = [x / y for x, y in zip(a, b)]
        value = statistics.median(a) / statistics.median(b)
        # the same ratio in CPU time (CPU ms per sample of den / of num): what a busy machine's contention leaves alone
        cpu = [statistics.median(r["cpu_ms_per_sample"] for r in results[k]) for k in (num, den)]
        out.append({"name": f"{num}/{DEN_NAMES.get(den, den)}", "value": value, "per_repeat": per, "cpu": cpu[1] / cpu[0],
                    "best": max(a) / max(b), "target": target, "ok": None if target is None else value >= target, "why": why})
    return out


def _model_line(args, spec: Dict[str, Any], fl: Dict[str, float], params: Optional[float]) -> str:
    a = spec["arch"]
    text = f"text {a['text_layers']} layers x {a['text_hidden_size']} ({spec['seq_len']} tokens), projection {a['projection_dim']}"
    if spec["family"] == "open_clip_conv":
        vc = open_clip_config(spec)["vision_cfg"]
        vision = f"open_clip ModifiedResNet (blocks {vc['layers']}, stem width {vc['width']}, {spec['resolution']} px)"
    else:
        built = {"hf": "HF CLIPModel", "open_clip": "open_clip VisionTransformer"}[spec["family"]]
        vision = (f"{built}: vision {a['vision_layers']} layers x {a['vision_hidden_size']} (patch {a['patch_size']}, "
                  f"{spec['resolution']} px, {fl['vision_tokens']} tokens)")
    return f"model   {args.model}: {vision}, {text}" + (f"; {params / 1e6:.2f}M parameters" if params else "")


def report(args, results: Dict[str, List[Dict[str, Any]]], device_name: str) -> Dict[str, Any]:
    """Print the table and the ratios; returns them (``--json``)."""
    spec = model_spec(args)
    fl = spec_flops(spec)
    params = next((r["params"] for k in ("b", "b1") for r in results.get(k, [])), None)
    precision = next((r["precision"] for k in ("a", "b") for r in results.get(k, [])), args.precision)
    how = "matmuls and convolutions counted by torch.utils.flop_counter" if spec["family"] == "open_clip_conv" else "matmuls"
    print()
    print(_model_line(args, spec, fl, params))
    print(f"        {fl['train'] / 1e9:.3f} GFLOP per sample per training step ({how}, 3 x forward {fl['forward'] / 1e9:.3f})")
    print(f"run     batch {args.batch_size}, {precision}, {args.device}: {device_name}; {args.steps} timed steps after "
          f"{args.warmup} warm-up; {args.repeats} repeat(s), interleaved, each measurement in its own process")
    first = {k: next(iter(results.get(k, [])), None) for k in MEASURES}
    captions = "one distinct caption per image (--captions unique)" if args.captions == "unique" else "the set's 3 class captions"
    pairs = next((r["train_pairs"] for r in first.values() if r and "train_pairs" in r), "?")
    data = f"data    textile JPEGs ({pairs} train pairs), {captions}, domain={args.domain} augmentation in (a)"
    if first["a"]:
        data += f"; (a): {first['a']['workers']} loader worker(s), {first['a']['threads']} torch thread(s), image cache {first['a']['cache']}"
    for k, name in (("b", "(b)"), ("b1", "(b')")):
        if first[k]:
            data += f"; {name}: {first[k]['threads']} thread(s)"
    if first["c"]:
        data += f"; (c): {first['c']['workers']} loader worker(s), {first['c']['threads']} thread(s), optim {first['c']['optim']}"
    if first["d"]:
        data += (f"; (d): {first['d']['workers']} loader worker(s), {first['d']['threads']} thread(s), "
                 f"--precision {first['d']['open_clip_precision']}")
    print(data)
    print()
    mem_key = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    mem_label = "peak CUDA MB" if args.device == "cuda" else "peak RSS MB (+workers)"
    print(f"{'':36}{'samples/s median [min-max]':>30}{'s/step':>9}{'CPU ms/sample':>15}{mem_label:>26}{'TFLOP/s':>9}{'MFU':>8}")
    peak = args.peak_tflops or (peak_tflops(device_name, precision) if args.device == "cuda" else None)
    rows = {}
    for k in ("a", "a0", "b", "b1", "c", "d"):
        rs = results.get(k)
        if not rs:
            continue
        sps = [r["samples_per_s"] for r in rs]
        median = statistics.median(sps)
        tflops = median * fl["train"] / 1e12
        mfu = 100 * tflops / peak if peak else None
        mem = max(r[mem_key] for r in rs)
        mem_s = f"{mem:.0f}" + (f" ({max(r['peak_tree_rss_mb'] for r in rs):.0f})" if args.device != "cuda" else "")
        cpu_ms = statistics.median(r["cpu_ms_per_sample"] for r in rs)
        step_s = statistics.median(r["step_s"] for r in rs)
        rows[k] = {"samples_per_s": sps, "median": median, "step_s": step_s, "cpu_ms_per_sample": cpu_ms, "peak_mb": mem,
                   "tflops": tflops, "mfu_percent": mfu}
        print(f"{LABELS[k]:36}{_spread(sps):>30}{step_s:>9.3f}{cpu_ms:>15.1f}{mem_s:>26}"
              f"{tflops:>9.3f}{f'{mfu:.1f}%' if mfu is not None else 'n/a':>8}")
    print()
    found = ratios(results)
    for r in found:
        per = r["per_repeat"]
        rng = f" (per repeat {min(per):.2f}-{max(per):.2f})" if len(per) > 1 else ""
        tail = (f"target >= {r['target']:.2f}: {'ok' if r['ok'] else 'BELOW TARGET'}" if r["target"] is not None else f"({r['why']})")
        print(f"{r['name']} = {r['value']:.2f}{rng}, best/best {r['best']:.2f}, in CPU time {r['cpu']:.2f}   {tail}")
    if first["a"] and first["a"].get("history_samples_per_s"):
        hist = [r["history_samples_per_s"] for r in results["a"]]
        print(f"(a) cross-check: the trainer's own train/samples_per_s over the same steps: {_spread(hist).strip()}")
    if peak:
        kind = "given with --peak-tflops" if args.peak_tflops else \
            f"{'dense bf16/fp16' if precision in ('bf16', 'fp16') else 'dense tf32'} peak of '{device_name}', datasheet"
        print(f"MFU = achieved model TFLOP/s / {peak:g} TFLOP/s ({kind})")
    else:
        print("MFU: n/a (peak of this device unknown; pass --peak-tflops)")
    return {"model": args.model, "family": spec["family"], "captions": args.captions, "device": device_name, "precision": precision,
            "batch_size": args.batch_size, "gflop_per_sample_train": fl["train"] / 1e9, "rows": rows, "ratios": found,
            "peak_tflops": peak, "runs": results}


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--family", choices=["hf", "open_clip"], default=None,
                   help="how clipexp builds a ViT model for (a)/(a0)/(b): hf = HF CLIPModel (default), open_clip = open_clip's "
                        "modules at the same sizes, as (d) trains them (tiny_open_clip is always open_clip's)")
    p.add_argument("--captions", choices=["template", "unique"], default="template",
                   help="template: the textile set's 3 class captions; unique: one distinct caption per image")
    p.add_argument("--patch", type=int, default=None, help="override the model's patch size (small: 32)")
    p.add_argument("--resolution", type=int, default=None, help="image resolution (default: small/vit-b32-arch 224, tiny 64)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers for (a), (c) and (d); default: clipexp's rule for (a) and (d), HF's 0 for (c)")
    p.add_argument("--domain", default="industrial", help="clipexp domain whose augmentation (a) applies (textile's: industrial)")
    p.add_argument("--repeats", type=int, default=2, help="run each measurement this many times (interleaved)")
    p.add_argument("--only", default="a,a0,b,c,d",
                   help="which measurements, e.g. a,b (a0 = (a) with trainer.pack_captions=false; "
                        "b1 = (b') the bare step with the trainer's CPU thread count; d = open_clip's trainer)")
    p.add_argument("--bare-threads", type=int, default=None, help="torch threads for (b) (default: torch's, all cores)")
    p.add_argument("--trainer-threads", type=int, default=None,
                   help="experiment: torch threads for (a) after setup (default: the trainer's choice, clipexp.training.trainer.default_train_threads)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for MFU (default: looked up by name on CUDA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra clipexp config override for (a) and (b) (and the model of (c))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per measurement process")
    p.add_argument("--json", type=Path, default=None, help="also write the table and ratios to this JSON file")
    p.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if args.family and MODELS[args.model].get("family") == "open_clip_conv":
        p.error(f"--family does not apply to --model {args.model} (open_clip's conv tower: clipexp builds it with open_clip)")
    unknown = [w for w in args.only.split(",") if w.strip() and w.strip() not in MEASURES]
    if unknown:
        p.error(f"--only {args.only}: unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    raw = list(sys.argv[1:] if argv is None else argv)
    args.argv = [x for i, x in enumerate(raw) if x != "--measure" and (i == 0 or raw[i - 1] != "--measure")]
    args.argv += ["--precision", args.precision]
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.measure:
        _quiet()
        with tempfile.TemporaryDirectory(prefix="clipexp_bench_") as workdir:
            prepare_process(args, Path(workdir))
            result = MEASURES[args.measure](args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    _quiet()
    device_name = _device_info(args.device)["device_name"]
    which = [w.strip() for w in args.only.split(",") if w.strip()]
    if args.device != "cpu" and "b1" in which:
        which.remove("b1")  # threads only matter on CPU
    if model_spec(args)["family"] != "hf" and "c" in which:
        which.remove("c")
        print(f"(c) skipped: the HF Trainer arm trains an HF CLIPModel, and clipexp builds --model {args.model} "
              f"{'with --family open_clip ' if args.family else ''}in open_clip's modules")
    results: Dict[str, List[Dict[str, Any]]] = {}
    failed: Dict[str, str] = {}
    for r in range(args.repeats):
        for w in which:
            if w in failed:
                continue
            try:
                res = _child(args, w)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                failed[w] = lines[-1] if lines else repr(err)
                print(f"repeat {r + 1}/{args.repeats} {LABELS[w]:36} FAILED: {failed[w]}", flush=True)
                continue
            results.setdefault(w, []).append(res)
            print(f"repeat {r + 1}/{args.repeats} {LABELS[w]:36} {res['samples_per_s']:8.2f} samples/s "
                  f"({res['step_s']:.3f} s/step, process {res['wall_s']:.0f} s)", flush=True)
    summary = report(args, results, device_name)
    if args.json:
        summary["failed"] = failed
        args.json.write_text(json.dumps(summary, indent=1))
    for w, why in failed.items():
        hint = " (the HF Trainer needs accelerate: pip install accelerate)" if w == "c" and "accelerate" in why.lower() else ""
        print(f"{LABELS[w]} failed: {why}{hint}")


if __name__ == "__main__":
    main()
