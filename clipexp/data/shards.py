"""Shard lists for ``data=webdataset``: URLs, the manifest's sample counts, and the samples of one shard.

``manifest.json`` (written by :mod:`clipexp.data.to_shards` beside the shards) gives each shard's sample
count and first sample id; img2dataset's ``<shard>_stats.json`` (``successes``) stands in for it. Samples
are read with the ``webdataset`` package's tar reader (``tarfile_samples``), one shard at a time, so each
sample knows its shard and offset. :class:`Keys` says which tar members hold the image, caption and label.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from clipexp.data.problems import DataValidationError

MANIFEST = "manifest.json"
FORMAT = "clipexp-shards/1"
IMAGE_KEYS = "jpg;jpeg;png;webp"


# --------------------------------------------------------------------------------------------------
# Shard lists and the manifest
# --------------------------------------------------------------------------------------------------


def expand_urls(urls: Any) -> List[str]:
    """A brace pattern / ``::``-joined string, or a list of them -> the shard URLs (webdataset's expansion)."""
    from webdataset.shardlists import expand_urls as wds_expand

    if urls is None:
        return []
    items = [urls] if isinstance(urls, str) else list(urls)
    return [u for item in items for u in wds_expand(str(item))]


def _local(url: str) -> Optional[Path]:
    if url.startswith("file:"):
        url = url[5:]
    return None if re.match(r"^[a-z0-9]+:", url) else Path(os.path.expanduser(url))


@dataclass
class ShardSet:
    """One split's shards: URLs, each shard's sample count and first sample id, the class names."""

    urls: List[str]
    counts: List[int]
    first_index: List[int]
    class_names: List[str] = field(default_factory=list)
    manifest: Optional[str] = None

    @property
    def total(self) -> int:
        return sum(self.counts)


def find_manifest(urls: Sequence[str], manifest: Optional[str] = None) -> Optional[Path]:
    if manifest:
        return Path(manifest)
    local = _local(urls[0]) if urls else None
    if local is not None and (local.parent / MANIFEST).is_file():
        return local.parent / MANIFEST
    return None


def shard_set(urls: Any, manifest: Optional[str] = None, key: str = "data.urls") -> ShardSet:
    """The shards of ``urls`` with their counts: from ``manifest`` (default: ``manifest.json`` beside the
    first local shard, as :mod:`clipexp.data.to_shards` writes it), else from the ``<shard>_stats.json``
    files img2dataset writes beside each shard (``successes``). Raises one-line errors."""
    expanded = expand_urls(urls)
    if not expanded:
        raise DataValidationError(f"{key} is empty: give shard paths or a brace pattern, e.g. /data/shards/train-{{000000..000009}}.tar")
    for url in expanded:
        local = _local(url)
        if local is not None and not local.is_file():
            raise DataValidationError(f"{key}: shard {url} not found")
    path = find_manifest(expanded, manifest)
    counts: List[Optional[int]] = [None] * len(expanded)
    firsts: List[Optional[int]] = [None] * len(expanded)
    class_names: List[str] = []
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise DataValidationError(f"manifest {path} is unreadable ({err}): rewrite it with clipexp shards") from None
        by_name = {s["name"]: s for split in data.get("splits", {}).values() for s in split.get("shards", [])}
        class_names = list(data.get("class_names") or [])
        for i, url in enumerate(expanded):
            entry = by_name.get(os.path.basename(url))
            if entry is not None:
                counts[i], firsts[i] = int(entry["count"]), entry.get("first_index")
    for i, url in enumerate(expanded):  # img2dataset: 00000.tar + 00000_stats.json
        local = _local(url)
        stats = local.with_name(local.stem + "_stats.json") if local is not None else None
        if counts[i] is None and stats is not None and stats.is_file():
            counts[i] = int(json.loads(stats.read_text()).get("successes", 0))
    missing = [u for u, c in zip(expanded, counts) if c is None]
    if missing:
        raise DataValidationError(f"{key}: no sample count for {len(missing)} shard(s) (e.g. {missing[0]}): write the shards with "
                                  f"clipexp shards (manifest.json), or with img2dataset (<shard>_stats.json), "
                                  f"or point data.manifest at a manifest")
    running, out_first = 0, []
    for c, f in zip(counts, firsts):  # sample ids: the manifest's, else positions in this list
        out_first.append(int(f) if f is not None else running)
        running += int(c)
    return ShardSet(expanded, [int(c) for c in counts], out_first, class_names, str(path) if path else None)


# --------------------------------------------------------------------------------------------------
# Raw samples: webdataset's tar reader, one shard at a time so each sample knows where it came from
# --------------------------------------------------------------------------------------------------


@dataclass
class Keys:
    """Which tar members hold the image, the caption(s) and the label."""

    image: str = IMAGE_KEYS  # ';'-separated extensions, first present wins
    caption: str = "txt"  # an extension, or json.<field> (a string or a list of strings)
    label: Optional[str] = "json.label"  # json.<field>, an extension (cls), or None

    def _field(self, sample: Dict[str, Any], spec: str) -> Any:
        if spec.startswith("json."):
            raw = sample.get("json")
            if raw is None:
                return None
            meta = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
            return meta.get(spec[5:]) if isinstance(meta, dict) else None
        value = sample.get(spec)
        return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value

    def parse(self, sample: Dict[str, Any]) -> Tuple[Optional[bytes], List[str], Optional[str], Optional[str]]:
        """-> (image bytes, captions, label, problem or None). No decoding of the image."""
        image = next((sample[k] for k in self.image.split(";") if sample.get(k)), None)
        if image is None:
            return None, [], None, f"no image ({self.image.replace(';', ', ')})"
        try:
            raw = self._field(sample, self.caption)
            label = self._field(sample, self.label) if self.label else None
        except (ValueError, UnicodeDecodeError) as err:
            return None, [], None, f"unreadable caption/label ({err})"
        caps = [raw] if isinstance(raw, str) else list(raw or [])
        caps = [str(c).strip() for c in caps if c is not None and str(c).strip()]
        if not caps:
            return None, [], None, f"no caption ({self.caption})"
        return bytes(image), caps, None if label is None or str(label).strip() == "" else str(label).strip(), None


def shard_samples(url: str, problems: List[str]) -> Iterator[Dict[str, Any]]:
    """The samples of one shard (webdataset's reader); a read error (a truncated or unreadable tar)
    ends the shard and is appended to ``problems``."""
    from webdataset.tariterators import tarfile_samples

    def handler(exn: BaseException) -> bool:
        first = str(exn.args[0]).split(" @ ")[0] if exn.args else str(exn)  # (webdataset appends " @ <stream>")
        problems.append(f"unreadable ({type(exn).__name__}: {first})"[:300])
        return True  # skip the rest of the shard

    yield from tarfile_samples([{"url": url}], handler=handler)
