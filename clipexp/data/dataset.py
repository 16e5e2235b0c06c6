"""PyTorch datasets of image-text pairs, and the trainer's one-call builder.

Items are dicts::

    pixel_values    float32 [3, R, R]   normalised image (uint8 with an ``output="uint8"`` image transform,
                                        e.g. ``build_datasets(..., pixels="uint8")``: normalise per batch
                                        with ``dataset.image_transform.normalizer``)
    input_ids       long    [L]         caption tokens, padded/truncated to L
    attention_mask  long    [L]
    labels          long    []          class index into ``dataset.class_names``; -1 when unlabelled
    group_ids       long    []          caption group (same normalised caption = same group)
    indices         long    []          the item's index in the dataset

Captions are tokenised once, at construction (every distinct string once), never per item.

Reproducible augmentation: every random draw for item ``i`` in epoch ``e`` (crop, flips, rotation,
jitter, which caption) comes from a ``torch.Generator`` seeded with ``item_seed(seed, e, i)`` (an image
transform that takes no ``generator``, e.g. a torchvision ``Compose``, gets torch's global RNG seeded so,
inside ``torch.random.fork_rng``); the caller's RNG state is left untouched. Call ``dataset.set_epoch(e)``
before each epoch: the epoch lives in a shared-memory tensor, so DataLoader workers (persistent or
not, forked or spawned) see it. The same (seed, epoch, index) gives the same tensors whatever the
worker count, batch size or resume point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset, get_worker_info

from clipexp.data.cache import ImageCache
from clipexp.data.images import RESIZE_INTERPOLATION, ImageDecodeError, check_interpolation, load_resized
from clipexp.data.pairs import ImageTextPair, caption_group_ids, class_names_of
from clipexp.data.problems import DataValidationError, Problem
from clipexp.data.split import SPLITS, check_split_sizes, split_pairs
from clipexp.data.text import DEFAULT_TEMPLATES, TextTransform, warn_long_captions
from clipexp.data.transforms import ImageTransform, MultiResolutionImageTransform, processor_mean_std

log = logging.getLogger(__name__)

Tensor = torch.Tensor
_MASK64 = (1 << 64) - 1


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of epoch ``epoch`` (splitmix64 of the three)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + (int(epoch) + 1) * 0xBF58476D1CE4E5B9 + (int(index) + 1) * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


@contextlib.contextmanager
def main_process_single_thread():
    """Run a block on one intra-op thread when in the main process (no-op inside DataLoader workers,
    which PyTorch already sets to one thread).

    Per-item work (crop, flip, rotate, stack a batch) is a handful of small memory-bound tensor ops:
    intra-op threads cost more in synchronisation than they save (docs/memory-and-speed.md), and toggling
    ``torch.set_num_threads`` costs next to nothing.
    """
    threads = torch.get_num_threads()
    if threads <= 1 or get_worker_info() is not None:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _processor_resolution(processor: Any) -> Optional[int]:
    crop = getattr(getattr(processor, "image_processor", None), "crop_size", None)
    height = crop.get("height") if isinstance(crop, Mapping) else getattr(crop, "height", None)  # dict or SizeDict
    return int(height) if height else None


class CLIPDataset(Dataset):
    """Image-text pairs -> item dicts (see module doc). Uses each pair's first caption.

    ``processor``: a CLIPProcessor (its tokenizer and image mean/std are used) or a tokenizer.
    ``config``: an optional :class:`~clipexp.config.notes.CLIPFinetuningConfig` (``image_resolution``,
    ``max_sequence_length``, ``seed``). Without ``image_transform`` the eval transform is used;
    for augmentation pass ``ImageTransform(config, augment=True)`` (or use :func:`build_datasets`).
    ``cache``: an :class:`~clipexp.data.ImageCache` or a mode string (``memory|disk|none|auto``).
    ``class_names``: the label vocabulary (default: this dataset's sorted labels); give all splits
    the same one so label indices agree.
    """

    multi_caption = False

    def __init__(
        self,
        pairs: Sequence[ImageTextPair],
        processor: Any = None,
        config: Any = None,
        image_transform: Any = None,
        text_transform: Optional[TextTransform] = None,
        *,
        resolution: Optional[int] = None,
        max_length: Optional[int] = None,
        cache: Union[ImageCache, str, None] = None,
        seed: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        prompt_templates: Optional[Sequence[str]] = None,
    ):
        self.pairs: List[ImageTextPair] = list(pairs)
        if any(p.group_id < 0 for p in self.pairs):
            gids = caption_group_ids(p.captions[0] for p in self.pairs)
            self.pairs = [dataclasses.replace(p, group_id=g) for p, g in zip(self.pairs, gids)]
        self.resolution = int(
            resolution
            or getattr(image_transform, "resolution", None)
            or getattr(config, "image_resolution", None)
            or _processor_resolution(processor)
            or 224
        )
        if image_transform is None:
            mean, std = processor_mean_std(processor)
            image_transform = ImageTransform(config, augment=False, resolution=self.resolution, mean=mean, std=std)
        self.image_transform = image_transform
        # the resize's interpolation: the transform's (a foreign transform: the config's, else bicubic)
        self.interpolation = check_interpolation(
            getattr(image_transform, "interpolation", None) or getattr(config, "image_interpolation", None)
            or RESIZE_INTERPOLATION)
        self._random_image = bool(getattr(image_transform, "is_random", True))
        # clipexp's transforms draw from a generator passed in (no global RNG state to save and restore)
        self._generator_transform = isinstance(image_transform, (ImageTransform, MultiResolutionImageTransform))
        if text_transform is None:
            if processor is None:
                raise ValueError("CLIPDataset needs a processor (or tokenizer) or a text_transform")
            text_transform = TextTransform(
                processor, max_length or getattr(config, "max_sequence_length", None), prompt_templates or DEFAULT_TEMPLATES
            )
        self.text_transform = text_transform
        self.max_length = text_transform.max_length
        self.seed = int(seed if seed is not None else getattr(config, "seed", 0) or 0)
        self.class_names: List[str] = list(class_names) if class_names is not None else class_names_of(self.pairs)
        index = {c: i for i, c in enumerate(self.class_names)}
        unknown = sorted({p.label for p in self.pairs if p.label is not None and p.label not in index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in class_names {self.class_names}")
        self.labels = torch.tensor([index[p.label] if p.label is not None else -1 for p in self.pairs], dtype=torch.long)
        self.group_ids = torch.tensor([p.group_id for p in self.pairs], dtype=torch.long)

        self._tokenize()

        if isinstance(cache, str):
            cache = ImageCache(cache, self.resolution, interpolation=self.interpolation)
            cache.prepare(self.image_paths)
        if cache is not None and cache.mode == "none":
            cache = None
        if cache is not None and cache.resolution != self.resolution:
            raise ValueError(f"the image cache holds {cache.resolution}px images but this dataset loads {self.resolution}px")
        if cache is not None and cache.interpolation != self.interpolation:
            raise ValueError(f"the image cache holds images resized with {cache.interpolation!r} interpolation but this "
                             f"dataset resizes with {self.interpolation!r}")
        self.cache = cache
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def _tokenize(self) -> None:
        """Tokenise every distinct candidate string once: ``texts``, and per item the indices of its candidates."""
        strings: Dict[str, int] = {}
        self._cands: List[tuple] = []
        for p in self.pairs:
            cands = self.text_transform.candidates(self._item_captions(p), p.label)
            self._cands.append(tuple(strings.setdefault(s, len(strings)) for s in cands))
        self.texts: List[str] = list(strings)
        if strings:
            self._ids, self._mask = self.text_transform.encode(self.texts)
        else:
            self._ids = self._mask = torch.zeros(0, self.max_length, dtype=torch.long)

    # ----------------------------------------------------------------------------------------------
    def _item_captions(self, pair: ImageTextPair) -> List[str]:
        return pair.captions[:1]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def is_random(self) -> bool:
        """Whether items depend on (seed, epoch): random image transform or several caption candidates."""
        return self._random_image or any(len(c) > 1 for c in self._cands)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws the next items use (visible to workers)."""
        self._epoch[0] = int(epoch)

    @property
    def captions(self) -> List[str]:
        """Each item's first caption (retrieval ground truth pairs it with ``group_ids``)."""
        return [p.captions[0] for p in self.pairs]

    @property
    def all_captions(self) -> List[List[str]]:
        return [list(p.captions) for p in self.pairs]

    @property
    def image_paths(self) -> List[str]:
        return [str(p.image_path) for p in self.pairs]

    def caption_tokens(self) -> Dict[str, Tensor]:
        """``input_ids``/``attention_mask`` [N, L] of each item's first caption (no augmentation)."""
        first = torch.tensor([c[0] for c in self._cands], dtype=torch.long)
        return {"input_ids": self._ids[first], "attention_mask": self._mask[first]}

    def load_image(self, index: int) -> Tensor:
        """Decoded, resized uint8 image of item ``index`` (from the cache when there is one)."""
        pair = self.pairs[index]
        try:
            if self.cache is not None:
                return self.cache.get(pair.image_path)
            return load_resized(pair.image_path, self.resolution, self.interpolation)
        except ImageDecodeError as err:
            problem = Problem(pair.source or str(pair.image_path), f"image '{pair.image_path}' {err.reason}")
            raise DataValidationError(
                f"{problem} (it passed validation when the data was loaded: the file was changed or removed since)",
                [problem], pair.source,
            ) from None

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, Tensor]]:
        """The items of ``indices`` (the DataLoader's batched fetch): one thread switch per batch.

        (Building a batch's items on two threads instead measured no faster inside the trainer on 2
        cores: the per-item Python work holds the GIL.)"""
        n = len(self)
        indices = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        with main_process_single_thread():
            if self._generator_transform:
                return [self._item(i) for i in indices]
            with torch.random.fork_rng(devices=[]):
                return [self._item(i) for i in indices]

    def _item(self, index: int) -> Dict[str, Tensor]:
        """Item ``index``. With a transform that takes no generator, seeds the global CPU RNG (the caller
        forks it around the call)."""
        image = self.load_image(index)
        cands = self._cands[index]
        k = 0
        if self._random_image or len(cands) > 1:
            seed = item_seed(self.seed, self.epoch, index)
            if self._generator_transform:
                gen = torch.Generator().manual_seed(seed)
                pixels = self.image_transform(image, generator=gen)
            else:
                gen = None
                # the CPU generator only: torch.manual_seed also queues a CUDA seed, recording a stack
                # trace each call while CUDA is not initialised (0.4 ms, as much as the augmentation)
                torch.default_generator.manual_seed(seed)
                pixels = self.image_transform(image)
            k = int(torch.randint(len(cands), (1,), generator=gen)) if len(cands) > 1 else 0
        else:
            pixels = self.image_transform(image)
        t = cands[k]
        return {
            "pixel_values": pixels,
            "input_ids": self._ids[t],
            "attention_mask": self._mask[t],
            "labels": self.labels[index],
            "group_ids": self.group_ids[index],
            "indices": torch.tensor(index, dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} pairs, {len(self.class_names)} classes, {self.resolution}px, "
                f"L={self.max_length}, transform={self.image_transform!r}, cache={self.cache!r})")


class MultiCaptionCLIPDataset(CLIPDataset):
    """Several captions per image: each item draws one (seeded by seed, epoch, index).

    Group ids stay those of the pair's first caption whichever caption is drawn.
    """

    multi_caption = True

    def _item_captions(self, pair: ImageTextPair) -> List[str]:
        return list(pair.captions)


# --------------------------------------------------------------------------------------------------
# The trainer's builder
# --------------------------------------------------------------------------------------------------


@dataclass
class DataSplits:
    """What :func:`build_datasets` returns. ``val``/``test`` are None when their split is empty."""

    train: CLIPDataset
    val: Optional[CLIPDataset]
    test: Optional[CLIPDataset]
    class_names: List[str]
    num_pairs: int
    skipped: List[str] = field(default_factory=list)
    cache: Optional[ImageCache] = None
    eval_transforms: Optional[Tuple[Any, Any]] = None  # (image, text) transforms of val and test

    def train_for_evaluation(self) -> Optional[CLIPDataset]:
        """The training pairs with the evaluation transforms (no augmentation, each pair's first caption; the same
        image cache): what the heads are fitted on. None for a streamed training split (``data=webdataset``)."""
        if self.eval_transforms is None or not isinstance(self.train, CLIPDataset):
            return None
        t = self.train
        return CLIPDataset(t.pairs, None, None, *self.eval_transforms, resolution=t.resolution, cache=t.cache, seed=t.seed,
                           class_names=t.class_names)

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(ds) if ds is not None else 0}" for name, ds in
                          (("train", self.train), ("val", self.val), ("test", self.test)))
        text = f"{self.num_pairs} pairs ({sizes}); classes: {', '.join(self.class_names) or 'none'}"
        if self.skipped:
            text += f"; {len(self.skipped)} problem rows skipped"
        if self.cache is not None:
            text += f"; image cache: {self.cache.mode}"
        return text


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def split_transforms(data_cfg: Any, processor: Any, templates: Sequence[str], *, augmentation: Any, image_resolution: int,
                     image_interpolation: str, max_sequence_length: int, pixels: str):
    """(train image, eval image, train text, eval text) transforms of a run: one place for every source
    (files and shards), so they all resize, augment, normalise and tokenize alike."""
    mean, std = processor_mean_std(processor)
    common = dict(resolution=image_resolution, mean=mean, std=std, output=pixels, interpolation=image_interpolation)
    train_tf = ImageTransform(augment=bool(_get(data_cfg, "augment_images", True)), policy=augmentation, **common)
    eval_tf = ImageTransform(augment=False, **common)
    train_tt = TextTransform(processor, max_sequence_length, templates, augment=bool(_get(data_cfg, "augment_text", False)))
    eval_tt = TextTransform(processor, max_sequence_length, templates, augment=False)
    return train_tf, eval_tf, train_tt, eval_tt


def build_datasets(
    data_cfg: Mapping[str, Any],
    *,
    processor: Any,
    image_resolution: int,
    max_sequence_length: int,
    prompt_templates: Optional[Sequence[str]] = None,
    augmentation: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    pixels: str = "float",
    image_interpolation: str = RESIZE_INTERPOLATION,
) -> DataSplits:
    """Load, validate, split and wrap a source (``data_cfg``: the keys of ``DataConfig``).

    Validation decodes every image once and, when caching is on (``cache_images``), stores the
    resized image at the same time, so the first epoch already reads from the cache. Train uses the
    domain ``augmentation`` when ``augment_images`` and text augmentation when ``augment_text``;
    val/test use the eval transforms. Pairs with several captions make the train set a
    :class:`MultiCaptionCLIPDataset`. ``pixels="uint8"`` (the trainer's choice) leaves the images uint8
    for the batch to be normalised on its device (``splits.train.image_transform.normalizer``).
    ``image_interpolation`` (``model.image_interpolation``) is the resize's and the augmentation's.
    """
    from clipexp.data.loaders import read_source

    templates = list(prompt_templates or DEFAULT_TEMPLATES)
    cache = ImageCache(
        _get(data_cfg, "cache_images", "auto"),
        image_resolution,
        cache_dir=_get(data_cfg, "cache_dir"),
        memory_mb=_get(data_cfg, "cache_memory_mb", 2048),
        interpolation=image_interpolation,
    )
    pairs, problems = read_source(data_cfg, templates, seed=seed, cache=cache)
    ratios = [_get(data_cfg, f"{name}_split", default) for name, default in zip(SPLITS, (0.8, 0.1, 0.1))]
    train_p, val_p, test_p = split_pairs(pairs, *ratios, seed)
    check_split_sizes(pairs, (train_p, val_p, test_p), ratios)
    class_names = class_names_of(pairs)
    train_tf, eval_tf, train_tt, eval_tt = split_transforms(data_cfg, processor, templates, augmentation=augmentation,
                                                            image_resolution=image_resolution, image_interpolation=image_interpolation,
                                                            max_sequence_length=max_sequence_length, pixels=pixels)
    kw = dict(resolution=image_resolution, cache=cache, seed=seed, class_names=class_names)
    train_cls = MultiCaptionCLIPDataset if any(len(p.captions) > 1 for p in train_p) else CLIPDataset
    train = train_cls(train_p, processor, None, train_tf, train_tt, **kw)
    val = CLIPDataset(val_p, processor, None, eval_tf, eval_tt, **kw) if val_p else None
    test = CLIPDataset(test_p, processor, None, eval_tf, eval_tt, **kw) if test_p else None
    warn_long_captions(train_tt, [t for ds in (train, val, test) if ds is not None for t in ds.texts])
    splits = DataSplits(train, val, test, class_names, len(pairs), [str(p) for p in problems], cache if cache.mode != "none" else None,
                        (eval_tf, eval_tt))
    log.info("data: %s", splits.summary())
    return splits
