"""Captions -> token ids with a CLIP tokenizer, and the label prompt templates of text augmentation."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger(__name__)

Tensor = torch.Tensor

DEFAULT_TEMPLATES = ["a photo of {}."]


def get_tokenizer(tokenizer_or_processor: Any) -> Any:
    return getattr(tokenizer_or_processor, "tokenizer", None) or tokenizer_or_processor


class TextTransform:
    """Tokenise captions to ``max_length`` (padding + truncation) with a CLIP tokenizer.

    With ``augment=True`` and a label, a caption is drawn uniformly among the pair's own caption(s)
    and the domain's ``prompt_templates`` filled with the label (``"a photo of {}."`` -> ``"a photo of
    local defect."``): text augmentation for labelled data. Unlabelled pairs keep their captions.
    """

    def __init__(self, tokenizer: Any, max_length: Optional[int] = None, prompt_templates: Optional[Sequence[str]] = None, augment: bool = False):
        self.tokenizer = get_tokenizer(tokenizer)
        ml = max_length or getattr(self.tokenizer, "model_max_length", None)
        self.max_length = int(ml) if ml and ml < 100_000 else 77
        self.prompt_templates = list(prompt_templates) if prompt_templates else list(DEFAULT_TEMPLATES)
        self.augment = bool(augment)

    def candidates(self, captions: Sequence[str], label: Optional[str] = None) -> List[str]:
        """The strings an item may be shown with."""
        out = list(captions)
        if self.augment and label is not None:
            out += [t.format(label) for t in self.prompt_templates]
        return list(dict.fromkeys(out))

    def encode(self, texts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both long ``[N, max_length]``."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        return tok["input_ids"].long(), tok["attention_mask"].long()

    def too_long(self, texts: Sequence[str]) -> List[int]:
        """Indices of the ``texts`` with more than ``max_length`` tokens: :meth:`encode` cuts them to it."""
        if not texts:
            return []
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length + 1)["input_ids"]
        return [i for i, row in enumerate(ids) if len(row) > self.max_length]

    def __call__(self, caption: Union[str, Sequence[str]], label: Optional[str] = None, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        caps = [caption] if isinstance(caption, str) else list(caption)
        cands = self.candidates(caps, label)
        k = int(torch.randint(len(cands), (1,), generator=generator)) if len(cands) > 1 else 0
        ids, mask = self.encode([cands[k]])
        return {"input_ids": ids[0], "attention_mask": mask[0]}


def warn_long_captions(text_transform: TextTransform, texts: Sequence[str]) -> int:
    """Log one warning counting the distinct ``texts`` (captions, filled prompts) longer than the
    model's context, which :meth:`TextTransform.encode` cuts to it; returns that count."""
    texts = list(dict.fromkeys(texts))
    long = text_transform.too_long(texts)
    if long:
        log.warning("%d of %d distinct captions are longer than the model's context of %d tokens and are cut to it "
                    "(e.g. %r); shorten them, or raise model.max_sequence_length if the model allows",
                    len(long), len(texts), text_transform.max_length, texts[long[0]][:60])
    return len(long)
