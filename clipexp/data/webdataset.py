"""WebDataset tar shards streamed into the trainer (``data.source=webdataset``); no Hydra, no MLflow.

Shards are read with the ``webdataset`` package (``tarfile_samples``: local paths, brace patterns,
``pipe:`` URLs, whatever ``webdataset.gopen`` opens); clipexp only decides which shard goes where and
what a sample means. A sample is ``<key>.<image ext>`` + a caption (``<key>.txt`` or a field of
``<key>.json``) + optionally a label (a ``json`` field, or ``<key>.cls``).

The epoch, per process:

* the shard list is permuted by ``(seed, epoch)`` (``shuffle``) and dealt to *streams*: rank ``r`` of
  ``world`` and loader worker ``w`` of ``W`` read shards ``order[r::world][w::W]``, so no shard (and no
  sample) is read twice in an epoch;
* every stream yields exactly ``quota`` batches (from the manifest's counts: the smallest number of
  samples any stream can be dealt, over the batch), so every rank takes the same number of steps and
  the DataLoader's round-robin over its workers is fixed; the samples a larger stream holds beyond the
  quota are left out of that epoch (as ``drop_last`` does), different ones each epoch;
* raw samples pass a seeded shuffle buffer (``shuffle_buffer``) before they are decoded.

Each sample's augmentation is drawn from ``item_seed(seed, epoch, sample id)``, the sample id being its
position in the shard set (manifest: the shard's first index + the offset in the shard), as the CSV
source draws from the pair's index: shards written from a source hold the same items.

Resume (:meth:`WebDatasetStream.set_start`): the trainer's position (epoch, batch in the epoch) says
how many batches each stream has delivered; a resumed stream replays its epoch's raw samples without
decoding them and starts at the next one. Step-exact for the same shards, world size, batch and loader
workers, unless undecodable images came before the resume point (found only by decoding: the resumed
stream then repeats that many samples). See docs/shards.md.

Bad samples (a truncated or unreadable shard, a sample without image or caption, an undecodable image)
are named in a warning and skipped; :meth:`WebDatasetStream.bad_counts` counts them, and a stream whose
bad share exceeds ``max_bad_fraction`` stops the run with one :class:`DataValidationError` line.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipexp.data.dataset import CLIPDataset, DataSplits, _get, item_seed, main_process_single_thread, split_transforms
from clipexp.data.images import ImageDecodeError, channels_last, decode_image_bytes, resize_shorter
from clipexp.data.pairs import ImageTextPair, normalize_caption
from clipexp.data.problems import DataValidationError
from clipexp.data.shards import IMAGE_KEYS, Keys, ShardSet, shard_samples, shard_set

log = logging.getLogger(__name__)

_MASK63 = (1 << 63) - 1


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = ((x ^ (int(p) + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        x ^= x >> 31
    return x & _MASK63


def caption_group(caption: str) -> int:
    """A caption's group id, the same in every process and batch (a stable hash of the normalised caption)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(normalize_caption(caption).encode(), digest_size=8).digest(), "little") & _MASK63


class WebDatasetStream(IterableDataset):
    """Training items (the dict of :class:`~clipexp.data.CLIPDataset`) streamed from a :class:`ShardSet`.

    ``len()`` is the manifest's sample count (approximate: the schedule's and the progress bar's);
    :meth:`configure` fixes the epoch's length in batches for the ranks and loader workers.
    """

    is_stream = True

    def __init__(self, shards: ShardSet, *, image_transform, text_transform, class_names: Sequence[str], seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, keys: Optional[Keys] = None, resolution: int = 224,
                 interpolation: str = "bicubic", max_bad_fraction: float = 0.01, multi_caption: bool = False):
        self.shards, self.image_transform, self.text_transform = shards, image_transform, text_transform
        self.class_names = list(class_names)
        self._label_index = {c: i for i, c in enumerate(self.class_names)}
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), bool(shuffle), int(shuffle_buffer) if shuffle else 0
        self.keys = keys or Keys()
        self.resolution, self.interpolation = int(resolution), interpolation
        self.max_bad_fraction = float(max_bad_fraction)
        self.multi_caption = multi_caption
        self.max_length = text_transform.max_length
        self._random_image = bool(getattr(image_transform, "is_random", True))
        self._last_problem = ""
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()
        self._start = torch.zeros(1, dtype=torch.long).share_memory_()  # batches already delivered this epoch
        self.configure(0, 1, 1, 1)

    # ---------------------------------------------------------------------------------- the epoch
    def configure(self, rank: int, world_size: int, workers: int, batch_size: int) -> int:
        """Fix the streams (``world_size`` ranks x ``workers`` loader workers, at least 1) and the batch;
        returns the batches per epoch of this rank (each stream's quota x ``workers``)."""
        self.rank, self.world_size, self.workers, self.batch_size = int(rank), int(world_size), max(1, int(workers)), int(batch_size)
        streams = self.world_size * self.workers
        n = len(self.shards.urls)
        if n < streams:
            raise DataValidationError(f"data.urls has {n} shard(s) for {self.world_size} rank(s) x {self.workers} loader worker(s): every "
                                      f"worker needs a shard of its own; write smaller shards (to_shards --shard-size) or lower "
                                      f"data.num_workers")
        # the least samples any stream can be dealt: n // streams of the smallest shards
        smallest = sorted(self.shards.counts)[: n // streams]
        self.quota = sum(smallest) // self.batch_size
        if self.quota < 1:
            raise DataValidationError(f"data.urls: a stream ({self.world_size} rank(s) x {self.workers} worker(s)) may get only "
                                      f"{sum(smallest)} samples, less than one batch of {self.batch_size}: write more or larger shards, "
                                      f"or lower trainer.batch_size or data.num_workers")
        self._bad = torch.zeros(self.workers, 2, dtype=torch.long).share_memory_()  # per stream: bad, seen
        return self.quota * self.workers

    @property
    def steps_per_epoch(self) -> int:
        return self.quota * self.workers

    def __len__(self) -> int:
        return self.shards.total

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def set_start(self, batches: int) -> None:
        """Start the next iteration after ``batches`` batches of the epoch (the resume position)."""
        self._start[0] = int(batches)

    def bad_counts(self) -> Tuple[int, int]:
        """(bad samples skipped, samples seen) by this process's streams so far."""
        bad, seen = self._bad.sum(0).tolist()
        return int(bad), int(seen)

    def shards_of(self, epoch: int, role: int) -> List[int]:
        """Indices of the shards stream ``role`` of this rank reads in ``epoch``."""
        order = list(range(len(self.shards.urls)))
        if self.shuffle:
            random.Random(_seed(self.seed, epoch, 17)).shuffle(order)
        return order[self.rank::self.world_size][role::self.workers]

    # ------------------------------------------------------------------------------ raw samples
    def _problem(self, role: int, where: str, message: str) -> None:
        self._bad[role, 0] += 1
        self._last_problem = f"{where}: {message}"
        log.warning("skipped bad sample %s", self._last_problem)
        self._check_fraction()

    def _check_fraction(self) -> None:
        """Stop once the bad share of the samples read exceeds ``max_bad_fraction`` (judged from
        ``min(1/f, 1000)`` samples read on; at once with 0)."""
        bad, seen = self.bad_counts()
        f = self.max_bad_fraction
        if bad > f * seen and (f == 0 or seen >= min(1 / f, 1000)):
            raise DataValidationError(f"{bad} bad samples of {seen} read ({bad / max(seen, 1):.1%}) exceed data.max_bad_fraction={f} "
                                      f"(the last: {self._last_problem}): fix or drop the shards named above, or raise data.max_bad_fraction")

    def _pass(self, epoch: int, role: int) -> Iterator[Tuple[int, bytes, List[str], Optional[str], str]]:
        """(sample id, image bytes, captions, label, where) of the stream's shards in order, once; samples
        without image or caption named and skipped; a shard that ends early (truncated, unreadable) named,
        its missing samples (the manifest's count minus those read) counted as bad."""
        for s in self.shards_of(epoch, role):
            url, problems, read = self.shards.urls[s], [], 0
            for offset, sample in enumerate(shard_samples(url, problems)):
                read += 1
                self._bad[role, 1] += 1
                where = f"{url}:{sample.get('__key__')}"
                image, caps, label, problem = self.keys.parse(sample)
                if problem:
                    self._problem(role, where, problem)
                    continue
                yield self.shards.first_index[s] + offset, image, caps, label, where
            lost = self.shards.counts[s] - read
            if problems or lost > 0:
                lost = max(0, lost)
                self._bad[role] += lost
                why = problems[0] if problems else "the tar ends early: truncated?"
                self._last_problem = f"{url}: {lost} of the manifest's {self.shards.counts[s]} samples missing ({why})"
                log.warning("skipped the rest of shard %s", self._last_problem)
                self._check_fraction()

    def _samples(self, epoch: int, role: int) -> Iterator[Tuple[int, bytes, List[str], Optional[str], str]]:
        """The stream's raw samples: its shards once through the shuffle buffer, then, only when bad samples
        left it short of its quota, again from the start (warned: these samples repeat in the epoch)."""
        yield from self._shuffled(self._pass(epoch, role), epoch, role)
        for again in range(1, 1_000_000):
            log.warning("rank %d worker %d: its shards held too few usable samples for the epoch's %d batches (bad samples): "
                        "repeating samples from the start of its shards", self.rank, role, self.quota)
            n = 0
            for n, sample in enumerate(self._shuffled(self._pass(epoch, role), epoch, role + 1000 * again), 1):
                yield sample
            if n == 0:
                raise DataValidationError(f"no usable samples in the shards of rank {self.rank} loader worker {role}: "
                                          f"{', '.join(self.shards.urls[s] for s in self.shards_of(epoch, role)[:3])}")

    def _shuffled(self, raw: Iterator, epoch: int, role: int) -> Iterator:
        if self.shuffle_buffer <= 1:
            yield from raw
            return
        rng, buf = random.Random(_seed(self.seed, epoch, self.rank, role, 29)), []
        for x in raw:
            if len(buf) < self.shuffle_buffer:
                buf.append(x)
                continue
            j = rng.randrange(len(buf))
            buf[j], x = x, buf[j]
            yield x
        rng.shuffle(buf)
        yield from buf

    # ---------------------------------------------------------------------------------- items
    def _encode(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        hit = self._tokens.get(text)
        if hit is None:
            ids, mask = self.text_transform.encode([text])
            hit = self._tokens[text] = (ids[0], mask[0])
            if len(self._tokens) > 100_000:
                self._tokens.clear()
        return hit

    def item(self, sample_id: int, image_bytes: bytes, captions: List[str], label: Optional[str], where: str, epoch: int) -> Dict[str, Any]:
        """One item, as :class:`~clipexp.data.CLIPDataset` builds it (same seeds); raises ImageDecodeError."""
        image = channels_last(resize_shorter(decode_image_bytes(image_bytes, where), self.resolution, self.interpolation))
        cands = self.text_transform.candidates(captions if self.multi_caption else captions[:1], label)
        k, gen = 0, None
        if self._random_image or len(cands) > 1:
            gen = torch.Generator().manual_seed(item_seed(self.seed, epoch, sample_id))
            pixels = self.image_transform(image, generator=gen)
            k = int(torch.randint(len(cands), (1,), generator=gen)) if len(cands) > 1 else 0
        else:
            pixels = self.image_transform(image)
        ids, mask = self._encode(cands[k])
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor(self._label_index.get(label, -1) if label is not None else -1, dtype=torch.long),
                "group_ids": torch.tensor(caption_group(captions[0]), dtype=torch.long),
                "indices": torch.tensor(sample_id, dtype=torch.long)}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"the stream was configured for {self.workers} loader workers but runs under {workers}")
        epoch, start = self.epoch, int(self._start[0])
        role = (worker + start) % workers  # the loader starts at worker 0: batch `start` is stream start % W's
        delivered = max(0, (start - role + workers - 1) // workers)  # batches i < start with i % W == role
        skip, left = delivered * self.batch_size, (self.quota - delivered) * self.batch_size
        self._tokens: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        samples = self._samples(epoch, role)
        for _ in range(skip):  # resume: replay without decoding
            next(samples)
        while left > 0:
            sample_id, image, caps, label, where = next(samples)
            try:
                with main_process_single_thread():  # (per item: a suspended generator must not hold the step's threads)
                    item = self.item(sample_id, image, caps, label, where, epoch)
            except ImageDecodeError as err:
                self._problem(role, where, f"image {err.reason}")
                continue
            left -= 1
            yield item


# --------------------------------------------------------------------------------------------------
# The training loader and the evaluation splits
# --------------------------------------------------------------------------------------------------


class StreamLoader(DataLoader):
    """The training DataLoader over a :class:`WebDatasetStream`: each ``iter()`` starts at the trainer's
    sampler position (``sampler.start``, the resume point), and a bad-data error from a worker is re-raised
    as its one line. ``steps_per_epoch``: the stream's epoch in batches."""

    def __init__(self, dataset: WebDatasetStream, sampler, num_workers: int, batch_size: Any = None, shuffle: bool = False,
                 drop_last: bool = False, **kw: Any):
        self.position = sampler  # (the stream decides its order: batch_size, shuffle and drop_last are the sampler's)
        self.steps_per_epoch = dataset.configure(sampler.rank, sampler.world_size, num_workers, sampler.batch_size)
        super().__init__(dataset, batch_size=sampler.batch_size, num_workers=num_workers, **kw)

    def __iter__(self):
        self.dataset.set_start(self.position.start // self.position.global_batch)
        try:
            yield from super().__iter__()
        except DataValidationError as err:
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            raise DataValidationError(lines[-1].split("DataValidationError: ", 1)[-1] if lines else str(err)) from None
        self.dataset._check_fraction()  # judged again on the whole epoch: a bad shard read early, before enough samples, counts too
        bad, seen = self.dataset.bad_counts()
        if bad:
            log.warning("data: %d bad samples skipped of %d read so far (data.max_bad_fraction=%s)", bad, seen, self.dataset.max_bad_fraction)


def read_split(shards: ShardSet, keys: Keys, on_error: str = "skip") -> Tuple[List[ImageTextPair], List[bytes], List[str]]:
    """Every usable sample of a (small) split, in shard order: pairs (``image_path``: ``<shard>#<key>``), their
    image bytes (checked by decoding), and the problems met."""
    pairs, images, problems = [], [], []
    for url in shards.urls:
        errors: List[str] = []
        for sample in shard_samples(url, errors):
            where = f"{url}#{sample.get('__key__')}"
            image, caps, label, problem = keys.parse(sample)
            if problem is None:
                try:
                    decode_image_bytes(image, where)
                except ImageDecodeError as err:
                    problem = f"image {err.reason}"
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            pairs.append(ImageTextPair(where, caps, label, -1, where))
            images.append(image)
        problems += [f"{url}: {e}" for e in errors]
    if problems and on_error == "raise":
        raise DataValidationError.from_problems(shards.urls[0], [_P(p) for p in problems])
    if problems:
        log.warning("skipped %d bad samples of %s:\n%s", len(problems), shards.urls[0], "\n".join(f"  {p}" for p in problems))
    return pairs, images, problems


class _P(str):
    """A problem line (``DataValidationError.from_problems`` formats its items with str())."""


def build_webdataset_splits(data_cfg, *, processor, image_resolution: int, max_sequence_length: int, prompt_templates,
                            augmentation, seed: int, pixels: str, image_interpolation: str):
    """:class:`~clipexp.data.DataSplits` of ``data.urls`` (a :class:`WebDatasetStream`) and ``data.val_urls`` /
    ``data.test_urls`` (read whole, into memory: evaluation needs every pair at once)."""
    from clipexp.data.text import DEFAULT_TEMPLATES

    keys = Keys(_get(data_cfg, "image_key", IMAGE_KEYS), _get(data_cfg, "caption_key", "txt"),
                _get(data_cfg, "label_key", "json.label"))
    manifest = _get(data_cfg, "manifest")
    train_set = shard_set(_get(data_cfg, "urls"), manifest, "data.urls")
    evals = {name: shard_set(_get(data_cfg, f"{name}_urls"), manifest, f"data.{name}_urls") if _get(data_cfg, f"{name}_urls") else None
             for name in ("val", "test")}
    read = {name: read_split(s, keys, _get(data_cfg, "on_error", "raise")) if s is not None else None for name, s in evals.items()}
    class_names = train_set.class_names or sorted({p.label for r in read.values() if r for p in r[0] if p.label is not None})
    templates = list(prompt_templates or DEFAULT_TEMPLATES)
    train_tf, eval_tf, train_tt, eval_tt = split_transforms(data_cfg, processor, templates, augmentation=augmentation,
                                                            image_resolution=image_resolution, image_interpolation=image_interpolation,
                                                            max_sequence_length=max_sequence_length, pixels=pixels)
    train = WebDatasetStream(train_set, image_transform=train_tf, text_transform=train_tt, class_names=class_names, seed=seed,
                             shuffle=bool(_get(data_cfg, "shuffle", True)), shuffle_buffer=int(_get(data_cfg, "shuffle_buffer", 1000)),
                             keys=keys, resolution=image_resolution, interpolation=image_interpolation,
                             max_bad_fraction=float(_get(data_cfg, "max_bad_fraction", 0.01)), multi_caption=True)

    def eval_set(r):
        if r is None or not r[0]:
            return None
        return ShardPairsDataset(r[0], r[1], processor, None, eval_tf, eval_tt, resolution=image_resolution, seed=seed,
                                 class_names=[c for c in class_names])

    unknown = sorted({p.label for r in read.values() if r for p in r[0] if p.label is not None} - set(class_names))
    if unknown:
        raise DataValidationError(f"labels {unknown} of data.val_urls/test_urls are not among the manifest's class names {class_names}")
    val, test = eval_set(read["val"]), eval_set(read["test"])
    skipped = [p for r in read.values() if r for p in r[2]]
    splits = DataSplits(train, val, test, class_names, train_set.total + sum(len(ds) for ds in (val, test) if ds is not None), skipped)
    log.info("data: webdataset, train ~%d samples in %d shards (%s), val %d, test %d, classes: %s", train_set.total,
             len(train_set.urls), train_set.manifest or "counts from _stats.json", len(val) if val else 0, len(test) if test else 0,
             ", ".join(class_names) or "none")
    return splits


class ShardPairsDataset(CLIPDataset):
    """A CLIPDataset over samples read from shards into memory (``images``: their encoded bytes)."""

    def __init__(self, pairs, images, *args, **kw):
        self._images = list(images)
        super().__init__(pairs, *args, **kw)

    def load_image(self, index: int) -> torch.Tensor:
        pair = self.pairs[index]
        return channels_last(resize_shorter(decode_image_bytes(self._images[index], pair.source), self.resolution, self.interpolation))
