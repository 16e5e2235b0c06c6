"""Contrastive-exact gradient accumulation (GradCache, Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup").

Plain accumulation averages micro-batch losses, so each sample only meets the negatives of its own
micro-batch: accumulating 8 x 32 is *not* a batch of 256 for a contrastive loss. GradCache is: the
loss of a contrastive model depends on the parameters only through the embeddings, so

1. embed every micro-batch without a graph (cheap in memory: only ``[B, D]`` embeddings are kept);
2. compute the loss once on the whole logical batch from those embeddings (as leaf tensors) and
   backward it: this gives ``dL/d(embeddings)`` for every sample, and the full gradient of every
   parameter the loss uses directly (a learnable temperature, SigLIP's bias, ``model.logit_scale``);
3. re-run each micro-batch's forward *with* a graph and backpropagate the cached embedding-gradient
   slice through it (``torch.autograd.backward([img, txt], [g_img, g_txt])``); parameter gradients
   accumulate in ``.grad`` across micro-batches.

The result is the gradient of the logical-batch loss, exactly (up to float summation order), for any
loss of the contract ``loss_fn(image_embeds, text_embeds, group_ids, labels, logit_scale) -> dict``,
at the memory cost of one micro-batch's activations plus ``B x D`` embeddings. It costs one extra
forward per micro-batch (about +33% compute versus plain accumulation).

Dropout: the RNG state (CPU, and CUDA / MPS when the device is one) is recorded before each tower's
no-grad forward and restored before its re-forward, so the re-forward draws the same masks and its
embeddings equal the cached ones bit for bit. After the step the RNG is left where a single pass over
the micro-batches would have left it.

Frozen towers (``lock_image`` / ``lock_text``) are not re-run in step 3.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from clipexp.models.clip import image_features, text_features

Tensor = torch.Tensor

__all__ = ["exact_accumulation_step", "get_rng_state", "set_rng_state"]


# --------------------------------------------------------------------------------------------------
# RNG state of the torch generators a forward may draw from
# --------------------------------------------------------------------------------------------------


def get_rng_state(device: Union[str, torch.device, None] = None) -> Dict[str, Any]:
    """Torch's CPU generator state, plus the CUDA (that device's) / MPS generator when ``device`` is one."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    elif device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "get_rng_state"):
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a state from :func:`get_rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        device, cuda_state = state["cuda"]
        torch.cuda.set_rng_state(cuda_state, device)
    if "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


def _trainable(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether any parameter of ``model.<name>`` (for the names that exist) requires grad.

    A model without those sub-modules is assumed trainable (always re-run: correct, just not lazy).
    """
    modules = [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]
    if not modules:
        return True
    return any(p.requires_grad for m in modules for p in m.parameters())


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value


def _embed_image(model, batch, device, autocast) -> Tensor:
    with autocast():
        return image_features(model, _to(batch["pixel_values"], device))


def _embed_text(model, batch, device, autocast) -> Tensor:
    with autocast():
        return text_features(model, _to(batch["input_ids"], device), _to(batch.get("attention_mask"), device),
                             text_index=_to(batch.get("text_index"), device))


def _cat_optional(micro_batches: List[Dict[str, Any]], key: str, device: torch.device) -> Optional[Tensor]:
    """Concatenate ``key`` over the micro-batches; None unless every micro-batch has it as a tensor."""
    parts = [mb.get(key) for mb in micro_batches]
    if any(not isinstance(p, Tensor) for p in parts):
        return None
    return torch.cat([p.to(device) for p in parts])


def _scale_loss(loss: Tensor, loss_scale: Any) -> Tensor:
    """``loss_scale``: a number (multiplier), a GradScaler (``.scale(loss)``) or a callable ``f(loss)``."""
    if hasattr(loss_scale, "scale") and callable(loss_scale.scale):
        return loss_scale.scale(loss)
    if callable(loss_scale):
        return loss_scale(loss)
    factor = float(loss_scale)
    return loss if factor == 1.0 else loss * factor


def _embed_without_graph(model, micro_batches, device, autocast) -> Tuple[List[Tensor], List[Tensor], List[tuple]]:
    """Step (a): every micro-batch's image and text embeddings under ``no_grad``, and the RNG state
    before each tower's forward (so the re-forward draws the same dropout masks)."""
    image_parts: List[Tensor] = []
    text_parts: List[Tensor] = []
    rng_states: List[tuple] = []
    with torch.no_grad():
        for mb in micro_batches:
            before_image = get_rng_state(device)
            image_parts.append(_embed_image(model, mb, device, autocast))
            before_text = get_rng_state(device)
            text_parts.append(_embed_text(model, mb, device, autocast))
            rng_states.append((before_image, before_text))
    return image_parts, text_parts, rng_states


def _reforward(model, mb, states: tuple, image_grad: Optional[Tensor], text_grad: Optional[Tensor], device, autocast) -> None:
    """Step (c) for one micro-batch: re-run each tower that has a cached embedding gradient (from the
    RNG state of its first forward) and backpropagate that gradient through it."""
    outputs: List[Tensor] = []
    grads: List[Tensor] = []
    for tower_grad, state, embed in ((image_grad, states[0], _embed_image), (text_grad, states[1], _embed_text)):
        if tower_grad is None:
            continue
        set_rng_state(state)
        emb = embed(model, mb, device, autocast)
        if emb.requires_grad:
            outputs.append(emb)
            grads.append(tower_grad.to(emb.dtype))
    if outputs:
        torch.autograd.backward(outputs, grads)


def exact_accumulation_step(
    model: nn.Module,
    loss_fn: Callable[..., Dict[str, Tensor]],
    micro_batches: List[Dict[str, Any]],
    *,
    device: Union[str, torch.device],
    autocast: Callable[[], Any] = contextlib.nullcontext,
    loss_scale: Any = 1.0,
    logit_scale: Optional[Tensor] = None,
    prepare: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """Accumulate into ``.grad`` the exact gradient of ``loss_fn`` on the concatenation of ``micro_batches``.

    ``micro_batches``: dicts with ``pixel_values``, ``input_ids``, ``attention_mask`` and optionally
    ``group_ids`` / ``labels`` (concatenated and passed to the loss only when every micro-batch has
    them); micro-batches may differ in size. ``autocast``: a zero-argument factory of the forward's
    autocast context (e.g. ``DeviceInfo.autocast``); the loss runs outside it, as in the trainer.
    ``loss_scale``: 1.0, any multiplier, a ``torch.amp.GradScaler`` (its ``scale(loss)`` is what is
    backwarded, so every parameter gradient carries the scale; call ``scaler.unscale_`` /
    ``scaler.step`` as usual) or a callable ``loss -> scaled loss``. ``logit_scale``: passed to the
    loss (``model.logit_scale``; its gradient comes out of the loss backward). ``prepare``: applied to a
    micro-batch each time it is embedded (the trainer's: move to the device, normalise uint8 pixels, pack
    captions with a ``text_index``), so only one micro-batch's inputs are on the device at a time.

    Gradients are *added* to existing ``.grad`` (zero them before, as for any backward). The model's
    train/eval mode is left as it is. Returns the loss output dict of the logical batch with detached
    tensors (``loss`` unscaled); checking it for NaN/inf is the caller's job.
    """
    if not micro_batches:
        raise ValueError("exact_accumulation_step needs at least one micro-batch")
    device = torch.device(device)
    train_image = _trainable(model, ("vision_model", "visual_projection"))
    train_text = _trainable(model, ("text_model", "text_projection"))

    # (a) embeddings without a graph, remembering the RNG state before each tower's forward
    prep = prepare or (lambda mb: mb)
    image_parts, text_parts, rng_states = _embed_without_graph(model, map(prep, micro_batches), device, autocast)
    rng_after = get_rng_state(device)
    sizes = [p.shape[0] for p in image_parts]

    # (b) the loss on the logical batch, from leaf embeddings
    image_all = torch.cat(image_parts).detach().requires_grad_(True)
    text_all = torch.cat(text_parts).detach().requires_grad_(True)
    del image_parts, text_parts
    out = loss_fn(
        image_all,
        text_all,
        group_ids=_cat_optional(micro_batches, "group_ids", device),
        labels=_cat_optional(micro_batches, "labels", device),
        logit_scale=logit_scale,
    )
    if out["loss"].requires_grad:  # False only when nothing is trainable (frozen towers, fixed temperature)
        _scale_loss(out["loss"], loss_scale).backward()
    image_grads = image_all.grad.split(sizes) if image_all.grad is not None and train_image else None
    text_grads = text_all.grad.split(sizes) if text_all.grad is not None and train_text else None

    # (c) re-forward each micro-batch with a graph and push its cached embedding gradients through it
    if image_grads is not None or text_grads is not None:
        for i, (raw, states) in enumerate(zip(micro_batches, rng_states)):
            image_grad = None if image_grads is None else image_grads[i]
            text_grad = None if text_grads is None else text_grads[i]
            _reforward(model, prep(raw), states, image_grad, text_grad, device, autocast)
    set_rng_state(rng_after)

    return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in out.items()}
