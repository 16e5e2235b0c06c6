"""Use a fine-tuned CLIP: load images as the evaluation does, embed, classify zero-shot (no Hydra, no MLflow).

One place for the inference maths, shared by the MLflow pyfunc model (:mod:`clipexp.serving.logged_model`), the batch
tools (:mod:`clipexp.serving.predict`) and the benchmark:

* images: ``decode -> resize the shorter side (the run's interpolation: bicubic antialiased unless
  ``model.image_interpolation`` said otherwise) -> centre crop -> normalise``, i.e.
  :func:`~clipexp.data.images.load_resized`, the eval :class:`~clipexp.data.ImageTransform` (uint8 out)
  and :class:`~clipexp.data.transforms.PixelNormalizer` with the run's mean/std: the trainer's
  validation/test pipeline, so the batch tools reproduce the run's logged zero-shot accuracy exactly;
* texts: tokenised to ``max_sequence_length`` with padding, as the trainer's prompt encoder;
* zero-shot: each class's embedding is the normalised mean over the run's prompt templates
  (:func:`~clipexp.evaluate.class_text_embeddings`), the predicted class the most similar one;
  probabilities are ``softmax(cos / T)`` with the run's final temperature ``T``;
* classify: the run's fitted heads (``heads.pt`` beside the weights, :class:`clipexp.heads.HeadSet`): a head's
  calibrated probabilities and its conformal prediction set at ``alpha`` (docs/heads.md).

What the run knew (classes, prompt templates, resolution, normalisation, temperature) is written next to
the ``save_pretrained`` weights as ``clipexp_inference.json`` (:class:`InferenceSpec`), so loading needs
no clipexp config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from clipexp.data.images import (
    ImageDecodeError,
    channels_last,
    decode_image_bytes,
    decode_image_file,
    interpolation_of_resample,
    resize_shorter,
)
from clipexp.data.normalize import PixelNormalizer
from clipexp.data.text import DEFAULT_TEMPLATES
from clipexp.data.transforms import ImageTransform
from clipexp.errors import UserError
from clipexp.evaluate import class_text_embeddings
from clipexp.heads.fitted import HEADS_FILE
from clipexp.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_features, text_features

SPEC_FILE = "clipexp_inference.json"
TASKS = ("zero_shot", "classify", "embed", "similarity")
#: CLIP clamps the logit scale at 100 (temperature 0.01)
MAX_LOGIT_SCALE = 100.0


class InferenceError(UserError, ValueError):
    """A request the model cannot answer (unknown task, missing column, no classes). One line."""


@dataclass
class InferenceSpec:
    """What inference needs from the run, saved as ``clipexp_inference.json`` beside the weights."""

    class_names: List[str] = field(default_factory=list)
    prompt_templates: List[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    image_resolution: int = 224
    image_interpolation: str = "bicubic"  # the run's model.image_interpolation (the resize to image_resolution)
    image_mean: List[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: List[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    max_sequence_length: int = 77
    temperature: float = 0.01
    batch_size: int = 32  # the run's evaluation batch
    serve_file_root: Optional[str] = None  # tracking.serve_file_root: the one folder a served model may read images from
    run: Dict[str, Any] = field(default_factory=dict)  # provenance: run id, monitor, best value, domain, ...

    def save(self, directory: Union[str, Path]) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: Union[str, Path]) -> Optional["InferenceSpec"]:
        path = Path(directory) / SPEC_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


#: the spec's keys that change an image's embedding (with the weights): what a model fingerprint covers
IMAGE_PIPELINE = ("image_resolution", "image_interpolation", "image_mean", "image_std")


def model_fingerprint(model: torch.nn.Module, spec: InferenceSpec) -> str:
    """The sha256 (hex) of what makes an image's embedding: every tensor of ``model.state_dict()`` (name,
    dtype, shape and bytes) and the spec's image pipeline (:data:`IMAGE_PIPELINE`). The same weights
    loaded from any folder, run or registry give the same fingerprint; one changed value gives another."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(t.view(torch.uint8).numpy()))
    digest.update(json.dumps({k: getattr(spec, k) for k in IMAGE_PIPELINE}, sort_keys=True).encode())
    return digest.hexdigest()


def zero_shot_temperature(loss_fn: Any, model: Any) -> float:
    """The temperature the run's loss ended with (the model's clamped ``logit_scale`` when the loss uses it)."""
    if getattr(loss_fn, "use_model_logit_scale", False) or loss_fn is None:
        return 1.0 / min(math.exp(float(model.logit_scale.detach())), MAX_LOGIT_SCALE)
    return float(loss_fn.temperature)


def decode_source(source: Any) -> Tuple[Any, str]:
    """An image given as a path, raw bytes or a base64 string -> ``(bytes or path, name for errors)``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), f"<{len(source)} bytes>"
    if isinstance(source, Path):
        return source, str(source)
    if not isinstance(source, str) or not source.strip():
        raise ImageDecodeError("<empty>", "is missing: give a file path or base64-encoded image bytes")
    text = source.strip()
    if len(text) < 4096 and os.path.exists(os.path.expanduser(text)):
        return Path(text).expanduser(), text
    if len(text) > 256:  # base64 of anything smaller than 192 bytes is no image: such a string is a path
        try:
            return base64.b64decode(text, validate=True), f"<base64 image, {len(text)} chars>"
        except (binascii.Error, ValueError):
            if len(text) >= 4096:
                raise ImageDecodeError(text[:40] + "...", "is neither a file path nor valid base64-encoded image bytes") from None
    return Path(text).expanduser(), text  # reading it names the missing file


class CLIPInference:
    """A CLIP with its run's :class:`InferenceSpec`, on one device, encoding in batches of ``batch_size``.

    ``read_source``: an image cell -> ``(bytes or Path, name)``; :func:`decode_source` (paths, bytes, base64)
    for the batch tools, :class:`clipexp.serving.policy.ServedSources` (bytes only) for a served model.
    ``max_pixels``: images larger than this are refused from their header."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, spec: InferenceSpec, device: str = "auto",
                 precision: str = "auto", batch_size: Optional[int] = None,
                 read_source: Callable[[Any], Tuple[Any, str]] = decode_source, max_pixels: Optional[int] = None):
        from clipexp.device import DeviceManager

        self.spec = spec
        self.devices = DeviceManager(device, precision)
        self.device = self.devices.device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.read_source, self.max_pixels = read_source, max_pixels
        self.batch_size = int(batch_size or spec.batch_size or 32)
        r = int(spec.image_resolution)
        self.transform = ImageTransform(augment=False, resolution=r, mean=spec.image_mean, std=spec.image_std, output="uint8",
                                        interpolation=spec.image_interpolation)
        self.normalize = PixelNormalizer(spec.image_mean, spec.image_std)
        self._class_embeds: Optional[torch.Tensor] = None
        self._fingerprint: Optional[str] = None
        self.heads_path: Optional[Path] = None  # the run's heads.pt (from_pretrained sets it)
        self._heads: Any = None

    @property
    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of this model and spec (computed once): ``embed`` writes it into its files and
        ``search`` compares it."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.spec)
        return self._fingerprint

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, Path], device: str = "auto", precision: str = "auto",
                        batch_size: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                        prompt_templates: Optional[Sequence[str]] = None, **options: Any) -> "CLIPInference":
        """A ``save_pretrained`` folder (a run's ``model/``). Without ``clipexp_inference.json`` (a hub
        model) the spec comes from the folder's processor and ``class_names``/``prompt_templates``. A folder with
        a ``SHA256SUMS`` manifest must match it (else :class:`InferenceError` naming the file)."""
        from clipexp.models.loading import load_clip
        from clipexp.files import folder_manifest_problem

        problem = folder_manifest_problem(Path(model_dir))  # SHA256SUMS, when the run wrote one
        if problem:
            raise InferenceError(f"{problem}; copy the model again (or re-export it from its run's best checkpoint: "
                                 f"clipexp export <run folder>)")
        spec = InferenceSpec.load(model_dir)
        model, processor = load_clip(str(Path(model_dir).resolve()), None, 224, None)
        if spec is None:
            ip = processor.image_processor
            crop = getattr(ip, "crop_size", None) or {}
            spec = InferenceSpec(image_resolution=int(crop.get("height", 224)),
                                 image_interpolation=interpolation_of_resample(getattr(ip, "resample", 3)),
                                 image_mean=list(ip.image_mean),
                                 image_std=list(ip.image_std),
                                 max_sequence_length=int(min(processor.tokenizer.model_max_length, 77)),
                                 temperature=zero_shot_temperature(None, model))
        if class_names:
            spec.class_names = list(class_names)
        if prompt_templates:
            spec.prompt_templates = list(prompt_templates)
        inference = cls(model, processor.tokenizer, spec, device, precision, batch_size, **options)
        inference.heads_path = Path(model_dir) / HEADS_FILE
        return inference

    # ------------------------------------------------------------------------------------- images
    def load_image(self, source: Any) -> torch.Tensor:
        """One image (path, bytes or base64; see ``read_source``) -> the eval crop, uint8 ``[3, R, R]``; raises ImageDecodeError."""
        data, name = self.read_source(source)
        decoded = decode_image_file(data, self.max_pixels) if isinstance(data, Path) else decode_image_bytes(data, name, self.max_pixels)
        return self.transform(channels_last(resize_shorter(decoded, self.transform.resolution, self.transform.interpolation)))

    def load_images(self, sources: Sequence[Any]) -> Tuple[List[Optional[torch.Tensor]], List[Optional[str]]]:
        """Each source's eval crop, or None and a one-line error naming the image."""
        images, errors = [], []
        for source in sources:
            try:
                images.append(self.load_image(source))
                errors.append(None)
            except ImageDecodeError as err:
                images.append(None)
                errors.append(str(err))
        return images, errors

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Eval crops (uint8 ``[3, R, R]``) -> L2-normalised embeddings ``[N, D]`` (float32, CPU), a batch at a time."""
        from clipexp.data.dataloader import collate_fn

        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = collate_fn([{"pixel_values": im} for im in images[start:start + self.batch_size]])["pixel_values"]
            with self.devices.info.autocast():
                out.append(image_features(self.model, self.normalize(pixels.to(self.device))).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised embeddings ``[N, D]`` (float32, CPU), tokenised as the trainer's prompts."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[start:start + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.spec.max_sequence_length, return_tensors="pt")
            with self.devices.info.autocast():
                out.append(text_features(self.model, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    # ----------------------------------------------------------------------------------- zero-shot
    def class_embeddings(self) -> torch.Tensor:
        """The prompt-ensemble class embeddings ``[K, D]`` (computed once)."""
        if not self.spec.class_names:
            raise InferenceError("this model has no class names for zero_shot: it was trained on unlabelled data; "
                                 "give --classes (CLI) or use task embed / similarity")
        if self._class_embeds is None:
            self._class_embeds = class_text_embeddings(self.encode_texts, list(self.spec.class_names), list(self.spec.prompt_templates))
        return self._class_embeds

    def zero_shot(self, image_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(probabilities [N, K], predicted class index [N])``: the argmax of the cosine similarities,
        as :func:`~clipexp.evaluate.zero_shot_classify`; probabilities ``softmax(cos / T)``."""
        sims = image_embeds.float() @ self.class_embeddings().float().T
        return torch.softmax(sims / self.spec.temperature, dim=1), sims.argmax(dim=1)

    # ------------------------------------------------------------------------------------- heads
    @property
    def heads(self) -> Any:
        """The fitted heads (:class:`clipexp.heads.HeadSet`): the run's ``heads.pt``, read once, or a set given
        here (an exemplar bank: ``inference.heads = fit_heads(...)``)."""
        if self._heads is None:
            from clipexp.heads import load_heads

            if self.heads_path is None or not self.heads_path.is_file():
                raise InferenceError(f"this model has no fitted heads ({HEADS_FILE}: its run had eval.heads=[], no labels or no "
                                     "validation split): use task zero_shot, or fit heads on labelled images (CLI: --exemplars)")
            self._heads = _as_inference_error(load_heads, self.heads_path)
        return self._heads

    @heads.setter
    def heads(self, value: Any) -> None:
        self._heads = value

    def classify(self, image_embeds: torch.Tensor, head: Optional[str] = None, alpha: Any = None):
        """A head's :class:`~clipexp.heads.Prediction` (calibrated probabilities, arg-max, prediction sets at ``alpha``,
        default the run's ``eval.conformal.alpha``) of L2-normalised image embeddings; ``head`` default: the first."""
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0):
            raise InferenceError(f"alpha={alpha!r}: give a miscoverage rate in (0, 1), e.g. 0.1 for sets that hold the class "
                                 "90% of the time")
        return _as_inference_error(self.heads.predict, image_embeds, head or None, None if alpha is None else float(alpha))

    def embed_sources(self, sources: Sequence[Any], progress: Any = None) -> Tuple[torch.Tensor, List[Optional[str]]]:
        """Embeddings of images given as paths/bytes/base64, ``[N, D]`` with NaN rows where an image failed,
        and each row's error (None when fine). Loads and encodes one batch at a time (``progress``: a tqdm bar)."""
        embeds = torch.full((len(sources), self.embed_dim), float("nan"))
        errors: List[Optional[str]] = []
        for start in range(0, len(sources), self.batch_size):
            images, errs = self.load_images(sources[start:start + self.batch_size])
            ok = [i for i, im in enumerate(images) if im is not None]
            if ok:
                embeds[[start + i for i in ok]] = self.encode_images([images[i] for i in ok])
            errors.extend(errs)
            if progress is not None:
                progress.update(len(images))
        return embeds, errors


def _as_inference_error(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` with a :class:`clipexp.heads.HeadError` (an unknown head, a changed heads file) as an :class:`InferenceError`."""
    from clipexp.heads import HeadError

    try:
        return fn(*args)
    except HeadError as err:
        raise InferenceError(str(err)) from None


def top_k(query_embeds: torch.Tensor, gallery: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scores [Q, k], indices [Q, k])`` of the most similar gallery rows (cosine; NaN rows never chosen)."""
    sims = query_embeds.float() @ torch.nan_to_num(gallery.float(), nan=0.0).T
    sims[:, torch.isnan(gallery).any(dim=1)] = float("-inf")
    return sims.topk(min(k, gallery.shape[0]), dim=1)


def _column(frame: Any, name: str) -> Optional[List[Any]]:
    """A column's cells, missing values (None/NaN) as None; None when the column is absent."""
    if name not in frame.columns:
        return None
    import pandas as pd

    return [None if v is None or (isinstance(v, (float, type(pd.NA))) and pd.isna(v)) else v for v in frame[name].tolist()]


def answer_frame(inference: CLIPInference, frame: Any, task: str = "zero_shot", head: Optional[str] = None, alpha: Any = None):
    """A request DataFrame (``image``: what ``inference.read_source`` reads; ``text``) -> one answer row per input row.

    * ``zero_shot`` (needs ``image``): ``predicted_class``, ``probability``, ``probabilities`` ({class: p});
    * ``classify`` (needs ``image``; ``head``, ``alpha``): with the run's fitted heads, ``prediction``, ``probability``
      (calibrated), ``set`` (the prediction set at ``alpha``: class names, most probable first; None when the head has
      no calibration) and ``probabilities``;
    * ``embed`` (``image`` and/or ``text``): ``image_embedding`` / ``text_embedding`` (L2-normalised lists);
    * ``similarity`` (both): ``scores``, the cosine of the row's image with every non-empty ``text`` of
      the request in order, and ``best_text``.

    ``error`` names the image of a row that could not be read (that row's answers are empty).
    """
    import pandas as pd

    if task not in TASKS:
        raise InferenceError(f"unknown task {task!r}: use one of {', '.join(TASKS)} (params={{\"task\": ...}})")
    images, texts = _column(frame, "image"), _column(frame, "text")
    need = {"zero_shot": images is not None, "classify": images is not None, "embed": images is not None or texts is not None,
            "similarity": images is not None and texts is not None}[task]
    if not need:
        what = {"zero_shot": "an 'image' column", "classify": "an 'image' column", "embed": "an 'image' or a 'text' column",
                "similarity": "an 'image' and a 'text' column"}[task]
        raise InferenceError(f"task {task} needs {what} (images as base64 bytes; texts); got columns {list(frame.columns)}")
    if task == "classify":  # the request's head and alpha checked before any image is read
        inference.classify(torch.zeros(0, inference.embed_dim), head, alpha)
    n = len(frame)
    out: Dict[str, List[Any]] = {}
    errors: List[Optional[str]] = [None] * n
    image_embeds = None
    if images is not None:
        rows = [i for i, v in enumerate(images) if v is not None]
        embeds, errs = inference.embed_sources([images[i] for i in rows])
        image_embeds = [None] * n
        for i, e, err in zip(rows, embeds, errs):
            image_embeds[i], errors[i] = (None, err) if err else (e, None)
        if task in ("zero_shot", "classify"):
            for i in range(n):
                if images[i] is None:
                    errors[i] = "no image in this row"
    if task == "zero_shot":
        ok = [i for i in range(n) if image_embeds[i] is not None]
        probs, preds = inference.zero_shot(torch.stack([image_embeds[i] for i in ok])) if ok else (None, None)
        names = inference.spec.class_names
        out.update(predicted_class=[None] * n, probability=[None] * n, probabilities=[None] * n)
        for j, i in enumerate(ok):
            out["predicted_class"][i] = names[int(preds[j])]
            out["probability"][i] = float(probs[j, preds[j]])
            out["probabilities"][i] = {c: float(p) for c, p in zip(names, probs[j].tolist())}
    elif task == "classify":
        ok = [i for i in range(n) if image_embeds[i] is not None]
        out.update(prediction=[None] * n, probability=[None] * n, set=[None] * n, probabilities=[None] * n)
        if ok:
            pred = inference.classify(torch.stack([image_embeds[i] for i in ok]), head, alpha)
            for i, record, probs in zip(ok, pred.records(), pred.probabilities.tolist()):
                out["prediction"][i], out["probability"][i], out["set"][i] = record["prediction"], record["probability"], record["set"]
                out["probabilities"][i] = dict(zip(pred.class_names, probs))
    elif task == "embed":
        if image_embeds is not None:
            out["image_embedding"] = [None if e is None else e.tolist() for e in image_embeds]
        if texts is not None:
            rows = [i for i, v in enumerate(texts) if v is not None]
            embeds = inference.encode_texts([str(texts[i]) for i in rows])
            out["text_embedding"] = [None] * n
            for i, e in zip(rows, embeds):
                out["text_embedding"][i] = e.tolist()
    else:
        query = [str(t) for t in texts if t is not None]
        if not query:
            raise InferenceError("task similarity needs at least one non-empty 'text'")
        text_embeds = inference.encode_texts(query)
        out.update(scores=[None] * n, best_text=[None] * n)
        for i, e in enumerate(image_embeds):
            if e is not None:
                s = (e @ text_embeds.T).tolist()
                out["scores"][i], out["best_text"][i] = s, query[max(range(len(s)), key=s.__getitem__)]
    out["error"] = errors
    # object columns: a missing answer stays None (JSON null), where pandas would make it NaN (invalid JSON)
    return pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in out.items()})
