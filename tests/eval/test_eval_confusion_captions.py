"""The report's two held-out views, on hand-made embeddings: the zero-shot confusion matrix and
the captions nearest to an image."""
from __future__ import annotations

import pytest
import torch

from expertpar.eval.retrieval import top_captions
from expertpar.eval.zeroshot import confusion_matrix, zero_shot_accuracy

# Three classes as the unit axes; each image is a point, its nearest class the largest entry.
#   image  embedding        label  nearest class
#   i0     (0.9, 0.1, 0.0)  0      0   right
#   i1     (0.2, 0.7, 0.1)  0      1   taken for class 1
#   i2     (0.1, 0.8, 0.1)  1      1   right
#   i3     (0.0, 0.3, 0.6)  2      2   right
#   i4     (0.5, 0.2, 0.3)  2      0   taken for class 0
#   i5     (0.0, 0.0, 1.0)  -1     (no label: left out)
IMAGES = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                       [0.0, 0.3, 0.6], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]])
LABELS = torch.tensor([0, 0, 1, 2, 2, -1])
CLASSES = torch.eye(3)


def test_confusion_counts_rows_true_columns_picked_and_leaves_out_unlabelled_images():
    assert confusion_matrix(IMAGES, LABELS, CLASSES).tolist() == [[1, 1, 0],
                                                                  [0, 1, 0],
                                                                  [1, 0, 1]]


def test_the_confusion_trace_is_zero_shot_top1():
    counts = confusion_matrix(IMAGES, LABELS, CLASSES)
    top1 = zero_shot_accuracy(IMAGES, LABELS, CLASSES, (1,))["zero_shot/top1"]
    assert float(counts.trace()) / float(counts.sum()) == pytest.approx(top1) == 3 / 5


# Captions "a", "b", "a", "c": "a" twice, with one embedding (as identical captions have).
# Image q's similarities to the texts t0..t3 (rows of TEXTS are unit axes, so image @ text^T
# reads the image's own entries):
#   image 0: (0.2, 0.9, 0.2, 0.5) -> unique captions ranked: b 0.9, c 0.5, a 0.2
#   image 1: (0.7, 0.1, 0.7, 0.3) -> a 0.7, c 0.3, b 0.1 ("a" once, though two texts say it)
CAPTIONS = ["a", "b", "a", "c"]
TEXTS = torch.eye(4)
TEXTS[2] = TEXTS[0]  # t2 repeats t0's caption, so it has t0's embedding
QUERY_IMAGES = torch.tensor([[0.2, 0.9, 0.0, 0.5], [0.7, 0.1, 0.0, 0.3]])


def test_top_captions_ranks_each_caption_text_once_best_first():
    out = top_captions(QUERY_IMAGES, TEXTS, CAPTIONS, [0, 1], 3)
    assert [[c for c, _ in row] for row in out] == [["b", "c", "a"], ["a", "c", "b"]]
    assert [[s for _, s in row] for row in out] == [pytest.approx([0.9, 0.5, 0.2]),
                                                    pytest.approx([0.7, 0.3, 0.1])]


def test_top_captions_asks_for_no_more_than_there_are_distinct_captions():
    out = top_captions(QUERY_IMAGES, TEXTS, CAPTIONS, [1], 10)
    assert [c for c, _ in out[0]] == ["a", "c", "b"]
