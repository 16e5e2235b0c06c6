"""Model loading: the tiny built CLIP, encoding, save/load round trip, and the offline-hub error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from numerics import assert_all_close, assert_close, eps_times

from clipexp.errors import ModelLoadError
from clipexp.models.clip import build_tokenizer
from clipexp.models.loading import load_clip


def test_generated_tokenizer_is_byte_level_clip():
    tok = build_tokenizer(16)
    assert len(tok) == 514
    enc = tok(["A photo, of a cat"], padding="max_length", max_length=16, truncation=True)
    ids = enc["input_ids"][0]
    assert ids[0] == tok.bos_token_id == 512 and tok.eos_token_id == 513
    assert len(ids) == 16 and sum(enc["attention_mask"][0]) == 2 + len("aphoto,ofacat")
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphoto,ofacat"


def test_tiny_model_size_and_encoding(tiny_controller, rgb_images):
    state = tiny_controller.get_model_state()
    assert 100_000 < state["num_parameters"] < 500_000
    assert state["device_type"] == "cpu" and state["embedding_dim"] == 64 and state["is_loaded"]
    t = tiny_controller.encode_text(["a red square", "a green square", "a blue square"])
    i = tiny_controller.encode_image(rgb_images)
    assert t.shape == i.shape == (3, 64)
    # close: a norm and a similarity are 64-term float32 sums of unit-scale numbers
    assert_close(t.norm(dim=-1), torch.ones(3), rel=eps_times(64))
    assert_close(i.norm(dim=-1), torch.ones(3), rel=eps_times(64))
    sim = tiny_controller.compute_similarity(["a red square", "a blue square"], rgb_images)
    assert sim.shape == (3, 2)
    assert_close(sim, i @ t[[0, 2]].T, rel=eps_times(64), scale=1.0)


def test_save_pretrained_round_trip_gives_identical_embeddings(tiny_controller, rgb_images, tmp_path):
    from transformers import CLIPModel

    from clipexp.config.notes import CLIPFinetuningConfig
    from clipexp.models.loading import CLIPFinetuningController

    texts = ["a red square", "defect"]
    before_t, before_i = tiny_controller.encode_text(texts), tiny_controller.encode_image(rgb_images)
    tiny_controller.save_pretrained(tmp_path / "model")
    assert isinstance(CLIPModel.from_pretrained(tmp_path / "model"), CLIPModel)
    cfg = CLIPFinetuningConfig(model_name=str(tmp_path / "model"), image_resolution=64, max_sequence_length=32, device="cpu")
    loaded = CLIPFinetuningController(cfg).setup()
    # exact: the same weights through the same operations
    torch.testing.assert_close(loaded.encode_text(texts), before_t, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_image(rgb_images), before_i, rtol=0, atol=0)


def test_missing_local_dir_is_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such directory; give a save_pretrained folder or a hub id"):
        load_clip(str(tmp_path / "nope"))


def test_offline_hub_error_is_one_line(tmp_path):
    """With the hub unreachable and nothing cached, loading a hub id fails with one actionable line."""
    code = "from clipexp.models import load_clip; load_clip('openai/clip-vit-base-patch32')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("clipexp.errors.ModelLoadError: cannot load 'openai/clip-vit-base-patch32': the Hugging Face hub is "
                           "unreachable (or HF_HUB_OFFLINE=1, or the id is unknown) and it is not in the local cache; run offline with "
                           "model=tiny, model=tiny_siglip or model=tiny_open_clip")


def test_pack_captions_by_hand():
    from clipexp.models.clip import pack_captions

    B, E = 512, 513  # BOS, EOS (= padding) of the generated tokenizer
    ids = torch.tensor([[B, 7, E, E, E, E], [B, 8, 9, E, E, E], [B, 7, E, E, E, E]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    p_ids, p_mask, index = pack_captions(ids, mask)
    assert p_ids.shape == p_mask.shape == (2, 4)  # 2 distinct captions, cut after the longest (4 tokens)
    assert torch.equal(p_ids[index], ids[:, :4]) and torch.equal(p_mask[index], mask[:, :4])
    assert index[0] == index[2] != index[1]
    t_ids, t_mask, none = pack_captions(ids, mask, dedup=False)  # only the padding is cut
    assert none is None and torch.equal(t_ids, ids[:, :4]) and torch.equal(t_mask, mask[:, :4])
    distinct = pack_captions(ids[:2], mask[:2])
    assert distinct[2] is None and distinct[0].shape == (2, 4)


def test_packed_captions_give_the_same_embeddings_and_gradients(tiny_controller):
    from clipexp.models.clip import pack_captions, text_features

    model = tiny_controller.model.train()
    tok = tiny_controller.processor.tokenizer(["a scratch", "a red square on grey", "a scratch", "ok", "a scratch"],
                                              padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    target = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))

    def run(packed: bool):
        model.zero_grad(set_to_none=True)
        ids, mask, index = pack_captions(tok["input_ids"], tok["attention_mask"]) if packed else \
            (tok["input_ids"], tok["attention_mask"], None)
        feats = text_features(model, ids, mask, text_index=index)
        (feats * target).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.text_model.named_parameters() if p.grad is not None}
        return ids.shape, feats.detach(), grads

    full_shape, full, full_grads = run(False)
    packed_shape, packed, packed_grads = run(True)
    # 3 distinct captions; the longest, "a red square on grey", is 16 byte tokens (no spaces) + BOS + EOS
    assert full_shape == (5, 32) and packed_shape == (3, 18)
    # exact: the three copies of "a scratch" are one encoded row, gathered three times
    assert torch.equal(packed[0], packed[2]) and torch.equal(packed[0], packed[4])
    # close: 18 positions instead of 32 change the attention's and the matmuls' summation order; the copies'
    # gradients are summed before the text tower (index_select's backward) instead of after it. The
    # token-embedding gradients reach ~15, where that order moves an entry by ~5e-6 on an AMD EPYC.
    assert_close(packed, full)
    assert_all_close(packed_grads, full_grads)
