"""Retrieval recall@K and zero-shot accuracy on hand-made embeddings, values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from expertpar.eval.retrieval import recall_at_k
from expertpar.eval.zeroshot import class_embeddings, zero_shot_accuracy

# ---------------------------------------------------------------- retrieval recall@K

# Similarities S[i, j] = <image i, text j>, no ties in any row or column. With images = I_4 and
# texts = S^T, image @ text^T is exactly S, so the rankings below are fixed by construction.
#
#            t0   t1   t2   t3
#   img0 [  0.9  0.1  0.5  0.3 ]   image->text order: t0 t2 t3 t1
#   img1 [  0.8  0.2  0.7  0.1 ]                      t0 t2 t1 t3
#   img2 [  0.1  0.6  0.3  0.2 ]                      t1 t2 t3 t0
#   img3 [  0.4  0.5  0.6  0.0 ]                      t2 t1 t0 t3
#
#   text->image order (columns): t0: i0 i1 i3 i2   t1: i2 i3 i1 i0
#                                t2: i1 i3 i0 i2   t3: i0 i2 i1 i3
S = torch.tensor([[0.9, 0.1, 0.5, 0.3],
                  [0.8, 0.2, 0.7, 0.1],
                  [0.1, 0.6, 0.3, 0.2],
                  [0.4, 0.5, 0.6, 0.0]])
IMAGES = torch.eye(4)
TEXTS = S.t().contiguous()


def test_the_hand_made_similarities_are_what_recall_sees():
    assert torch.equal(IMAGES @ TEXTS.t(), S)


def test_recall_distinct_captions_both_directions():
    # Distinct captions: a hit means the query's own pair is in the top K.
    # image->text rank of the own text: img0 1, img1 3, img2 2, img3 4
    #   R@1 = 1/4, R@2 = 2/4, R@3 = 3/4, R@4 = 4/4
    # text->image rank of the own image: t0 1, t1 3, t2 4, t3 4
    #   R@1 = 1/4, R@2 = 1/4, R@3 = 2/4, R@4 = 4/4
    out = recall_at_k(IMAGES, TEXTS, ["a", "b", "c", "d"], (1, 2, 3, 4))
    assert out == {
        "retrieval/image_to_text/R@1": 0.25, "retrieval/image_to_text/R@2": 0.5,
        "retrieval/image_to_text/R@3": 0.75, "retrieval/image_to_text/R@4": 1.0,
        "retrieval/text_to_image/R@1": 0.25, "retrieval/text_to_image/R@2": 0.25,
        "retrieval/text_to_image/R@3": 0.5, "retrieval/text_to_image/R@4": 1.0,
        "retrieval/unique_captions": 4,
    }


def test_recall_duplicate_captions_count_as_hits():
    # Captions a b b d: pairs 1 and 2 share the caption "b", so retrieving either counts.
    # image->text: img0 (a): t0 first -> 1; img1 (b): t0(a), t2(b) -> 2;
    #              img2 (b): t1(b) first -> 1; img3 (d): t3 last -> 4
    #   R@1 = 2/4, R@2 = 3/4, R@3 = 3/4, R@4 = 1
    # text->image: t0 (a): i0 first -> 1; t1 (b): i2(b) first -> 1;
    #              t2 (b): i1(b) first -> 1; t3 (d): i3 last -> 4
    #   R@1 = 3/4, R@2 = 3/4, R@3 = 3/4, R@4 = 1
    out = recall_at_k(IMAGES, TEXTS, ["a", "b", "b", "d"], (1, 2, 3, 4))
    assert out["retrieval/image_to_text/R@1"] == 0.5
    assert out["retrieval/image_to_text/R@2"] == 0.75
    assert out["retrieval/image_to_text/R@3"] == 0.75
    assert out["retrieval/image_to_text/R@4"] == 1.0
    assert out["retrieval/text_to_image/R@1"] == 0.75
    assert out["retrieval/text_to_image/R@2"] == 0.75
    assert out["retrieval/text_to_image/R@3"] == 0.75
    assert out["retrieval/text_to_image/R@4"] == 1.0
    assert out["retrieval/unique_captions"] == 3


def test_recall_k_larger_than_n():
    # K = 10 > N = 4: every query's own item is somewhere in the (whole) list -> 1.0, no error.
    out = recall_at_k(IMAGES, TEXTS, ["a", "b", "c", "d"], (1, 10))
    assert out["retrieval/image_to_text/R@10"] == 1.0
    assert out["retrieval/text_to_image/R@10"] == 1.0
    assert out["retrieval/image_to_text/R@1"] == 0.25  # the small K is unaffected


def test_recall_direction_is_not_swapped():
    # Swapping the towers transposes S: the two directions swap their values.
    caps = ["a", "b", "c", "d"]
    fwd = recall_at_k(IMAGES, TEXTS, caps, (2,))
    back = recall_at_k(TEXTS, IMAGES, caps, (2,))
    assert fwd["retrieval/image_to_text/R@2"] == 0.5
    assert fwd["retrieval/text_to_image/R@2"] == 0.25
    assert back["retrieval/image_to_text/R@2"] == 0.25
    assert back["retrieval/text_to_image/R@2"] == 0.5


def test_recall_perfect_alignment_and_reversed_order():
    # Orthonormal, identical embeddings: every query finds its own pair first.
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    caps = [str(i) for i in range(6)]
    out = recall_at_k(q, q, caps, (1,))
    assert out["retrieval/image_to_text/R@1"] == 1.0
    assert out["retrieval/text_to_image/R@1"] == 1.0
    # Texts negated: the own pair is now the *least* similar (-1 against 0 for the others),
    # so R@1 = R@5 = 0 and only K = N = 6 finds it.
    out = recall_at_k(q, -q, caps, (1, 5, 6))
    assert out["retrieval/image_to_text/R@1"] == 0.0
    assert out["retrieval/image_to_text/R@5"] == 0.0
    assert out["retrieval/image_to_text/R@6"] == 1.0
    assert out["retrieval/text_to_image/R@5"] == 0.0


# ---------------------------------------------------------------- zero-shot accuracy

CLASSES_CE = torch.eye(3)  # class c is the unit vector e_c, so score(x, c) = x[c]


def zero_shot_case():
    # image               label  class order by score   rank of the label
    # [0.9, 0.3, 0.1]      0     c0 c1 c2               1
    # [0.6, 0.5, 0.2]      1     c0 c1 c2               2
    # [0.1, 0.2, 0.7]      0     c2 c1 c0               3
    # [0.9, 0.0, 0.0]     -1     (unknown: ignored; it would be a miss at every K)
    # [0.0, 0.1, 0.8]      2     c2 c1 c0               1
    images = torch.tensor([[0.9, 0.3, 0.1], [0.6, 0.5, 0.2], [0.1, 0.2, 0.7],
                           [0.9, 0.0, 0.0], [0.0, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 0, -1, 2])
    return images, labels


def test_zero_shot_top1_top2_top5_ignoring_unknown_labels():
    images, labels = zero_shot_case()
    out = zero_shot_accuracy(images, labels, CLASSES_CE, (1, 2, 5))
    # 4 known samples, ranks 1, 2, 3, 1:
    #   top1 = 2/4; top2 = 3/4; top5 -> top3 (only 3 classes) = 4/4
    # (counting the -1 sample would give 2/5, 3/5, 4/5 instead)
    assert out["zero_shot/top1"] == 0.5
    assert out["zero_shot/top2"] == 0.75
    assert out["zero_shot/top5"] == 1.0
    assert out["zero_shot/samples"] == 4
    assert out["zero_shot/chance_top1"] == pytest.approx(1 / 3)


def test_zero_shot_chance_value_follows_class_count():
    images = torch.eye(16)[:5]
    labels = torch.arange(5)
    out = zero_shot_accuracy(images, labels, torch.eye(16), (1, 5))
    assert out["zero_shot/chance_top1"] == 1 / 16  # README: 16 classes, chance 6.25%
    assert out["zero_shot/top1"] == 1.0  # image i is class i exactly


def test_zero_shot_all_unknown_gives_nothing():
    images, _ = zero_shot_case()
    assert zero_shot_accuracy(images, torch.full((5,), -1), CLASSES_CE, (1,)) == {}


def test_class_embeddings_average_templates_then_normalise():
    # Prompt embeddings (unit vectors, as the text tower returns them):
    #   "a cat" -> [1, 0, 0], "the cat" -> [0, 1, 0]: mean [0.5, 0.5, 0], norm 1/sqrt(2)
    #       -> [1/sqrt(2), 1/sqrt(2), 0]
    #   "a dog" -> [0, 0, 1], "the dog" -> [0.6, 0, 0.8]: mean [0.3, 0, 0.9], norm sqrt(0.9)
    #       -> [0.3/sqrt(0.9), 0, 0.9/sqrt(0.9)] = [0.316228, 0, 0.948683]
    table = {"a cat": [1.0, 0.0, 0.0], "the cat": [0.0, 1.0, 0.0],
             "a dog": [0.0, 0.0, 1.0], "the dog": [0.6, 0.0, 0.8]}
    calls = []

    def embed_texts(prompts):
        calls.append(list(prompts))
        return torch.tensor([table[p] for p in prompts])

    out = class_embeddings(embed_texts, ("cat", "dog"), ("a {}", "the {}"))
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[r, r, 0.0], [0.3 / math.sqrt(0.9), 0.0, 0.9 / math.sqrt(0.9)]])
    assert out.shape == (2, 3)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-6)
    # one call, every template of a class together, classes in order
    assert calls == [["a cat", "the cat", "a dog", "the dog"]]


def test_class_embeddings_feed_zero_shot():
    # The two prototypes above classify images pointing at them.
    table = {"a cat": [1.0, 0.0, 0.0], "the cat": [0.0, 1.0, 0.0],
             "a dog": [0.0, 0.0, 1.0], "the dog": [0.6, 0.0, 0.8]}
    protos = class_embeddings(lambda ps: torch.tensor([table[p] for p in ps]),
                              ("cat", "dog"), ("a {}", "the {}"))
    # [0, 1, 0] scores cat 0.707 vs dog 0; [1, 0, 0.5] scores cat 0.707 vs dog 0.316+0.474=0.791
    images = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.5]])
    out = zero_shot_accuracy(images, torch.tensor([0, 1]), protos, (1,))
    assert out["zero_shot/top1"] == 1.0
