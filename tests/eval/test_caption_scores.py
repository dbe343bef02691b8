"""BLEU-4, CIDEr-D and exact match, on hand-worked examples."""
from __future__ import annotations

import math

import pytest

from expertpar.eval.captions import bleu4, caption_scores, cider_d, words


def test_bleu4_of_a_hand_worked_caption():
    cand = words("a red circle above a blue square")  # 7 words
    ref = words("a red circle above a small blue square")  # 8 words
    # Clipped precisions: 1-grams 7/7, 2-grams 5/6 ("a blue" is not in the reference),
    # 3-grams 3/5, 4-grams 2/4; brevity penalty exp(1 - 8/7).
    want = math.exp(1 - 8 / 7) * (1 * 5 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert bleu4([cand], [[ref]]) == pytest.approx(want)  # 0.6130
    assert bleu4([ref], [[ref]]) == pytest.approx(1.0)
    # No 4-gram in common: 0 (no smoothing), whatever the shorter n-grams.
    assert bleu4([words("a red circle")], [[words("a red circle here")]]) == 0.0


def test_bleu4_counts_a_repeated_word_only_as_often_as_a_reference_has_it():
    cand = words("the the the the the")
    assert bleu4([cand], [[words("the cat is on the mat")]]) == 0.0


def test_cider_d_of_a_hand_worked_corpus():
    refs = [[words("a red circle")], [words("a blue square")]]
    # Identical captions: the 1..3-gram cosines are 1 ("a" is in both references, so its idf
    # is 0 and it counts for nothing); three words have no 4-gram, whose cosine is 0; no
    # length penalty: 10 x (1 + 1 + 1 + 0) / 4 = 7.5.
    assert cider_d([words("a red circle"), words("a blue square")], refs) == pytest.approx(7.5)
    # "a red square" against "a red circle": with idf log 2 on each n-gram but "a", the
    # unigram and bigram cosines are 1/2 each, the trigram's 0: 10 x (1/2 + 1/2) / 4 = 2.5;
    # the mean with the second image's 7.5 is 5.
    assert cider_d([words("a red square"), words("a blue square")], refs) == pytest.approx(5.0)
    # One word more: the unigram cosine is 2/sqrt(10) ("red" twice, clipped to once against
    # the reference: norms sqrt(5) and sqrt(2)), the bigrams' 2/sqrt(6) ("circle red" is
    # new), the trigrams' 1/sqrt(2), no 4-gram in the reference; and the Gaussian penalty
    # exp(-(4 - 3)^2 / 72) on each.
    want = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    longer = cider_d([words("a red circle red"), words("a blue square")], refs)
    assert longer == pytest.approx((want + 7.5) / 2)


def test_exact_match_ignores_case_and_spacing_only():
    scores = caption_scores(["A red  circle", "a red circle"],
                            [["a red circle"], ["a red circle above a cross"]])
    assert scores["caption/exact_match"] == 0.5
    assert set(scores) == {"caption/bleu4", "caption/cider", "caption/exact_match"}
