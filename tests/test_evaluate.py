"""Group-aware retrieval and zero-shot metrics on hand-made similarity matrices."""

from __future__ import annotations

import torch

from clipexp.evaluate import class_text_embeddings, evaluate_retrieval, zero_shot_metrics


def _embeds_from_sim(sim: torch.Tensor):
    """Image embeddings = identity rows, text embeddings = sim^T, so image @ text^T == sim exactly."""
    n = sim.shape[0]
    return torch.eye(n), sim.T.clone()


def test_recall_on_hand_made_matrix_without_groups():
    # rows = images, columns = texts; the diagonal is the true pair
    sim = torch.tensor([
        [0.9, 0.1, 0.2],   # image 0: its text ranks 1st
        [0.8, 0.5, 0.1],   # image 1: text 0 beats it -> rank 2
        [0.7, 0.6, 0.3],   # image 2: texts 0 and 1 beat it -> rank 3
    ])
    img, txt = _embeds_from_sim(sim)
    m = evaluate_retrieval(img, txt, ks=(1, 2))
    assert m["i2t_R1"] == 1 / 3 and m["i2t_R2"] == 2 / 3
    assert m["i2t_median_rank"] == 2.0 and m["i2t_mean_rank"] == 2.0
    # text->image: column 0 ranks image 0 first (0.9); column 1: 0.6 (img2) > 0.5 (img1) -> rank 2;
    # column 2: 0.3 (img2) is the best -> rank 1
    assert m["t2i_R1"] == 2 / 3 and m["t2i_median_rank"] == 1.0


def test_duplicate_captions_count_as_correct():
    # images 1 and 2 share a caption group: for image 1, text 2 (same group) ranking first is correct
    sim = torch.tensor([
        [0.9, 0.1, 0.2],
        [0.1, 0.5, 0.8],
        [0.1, 0.7, 0.6],
    ])
    img, txt = _embeds_from_sim(sim)
    plain = evaluate_retrieval(img, txt, ks=(1,))
    grouped = evaluate_retrieval(img, txt, torch.tensor([0, 1, 1]), ks=(1,))
    assert plain["i2t_R1"] == 1 / 3          # images 1 and 2 each "miss"
    assert grouped["i2t_R1"] == 1.0          # ... but their best text is a duplicate caption
    assert grouped["t2i_R1"] == 1.0 and plain["t2i_R1"] == 1 / 3


def test_chunking_gives_identical_results():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(50, 8, generator=g), dim=-1)
    groups = torch.arange(50) % 7
    assert evaluate_retrieval(img, txt, groups, chunk_size=7) == evaluate_retrieval(img, txt, groups, chunk_size=1024)


def test_zero_shot_accuracy_balanced_and_confusion():
    class_embeds = torch.eye(3)
    # 4 images of class 0 (3 right), 1 of class 1 (wrong, predicted 2), 1 of class 2 (right); one unlabelled
    image_embeds = torch.tensor([[1., 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 2, -1])
    m = zero_shot_metrics(image_embeds, labels, class_embeds)
    assert abs(m["zeroshot_acc"] - 4 / 6) < 1e-7
    assert abs(m["zeroshot_balanced_acc"] - (3 / 4 + 0 + 1) / 3) < 1e-7
    assert m["confusion"].tolist() == [[3, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_class_embeddings_average_templates():
    table = {"a x": [1.0, 0.0], "b x": [0.0, 1.0], "a y": [1.0, 1.0], "b y": [1.0, -1.0]}

    def encode(prompts):
        return torch.nn.functional.normalize(torch.tensor([table[p] for p in prompts]), dim=-1)

    out = class_text_embeddings(encode, ["x", "y"], ["a {}", "b {}"])
    expected_x = torch.nn.functional.normalize(torch.tensor([0.5, 0.5]), dim=0)
    torch.testing.assert_close(out[0], expected_x)
    torch.testing.assert_close(out[1], torch.tensor([1.0, 0.0]))
