"""Caption quality: BLEU-4, CIDEr-D and the exact-match fraction of captions against their
references.

Written here rather than taken from pycocoevalcap: its tokenizer runs Java (not a dependency
we want in every training process), and both scores are a few dozen lines. Words are the
lower-cased runs of letters and digits, and each punctuation mark on its own, for candidates
and references alike (COCO's PTB tokenizer drops punctuation instead: scores of captions with
punctuation differ a little from pycocoevalcap's; the synthetic and Fashion-MNIST captions
have none).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence


_WORD = re.compile(r"\w+|[^\w\s]")
CIDER_SIGMA = 6.0  # CIDEr-D's Gaussian length penalty (Vedantam et al. 2015)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(ws: Sequence[str], n: int) -> Counter:
    return Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))


def bleu4(candidates: list[list[str]], references: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002): the geometric mean of the clipped 1..4-gram
    precisions over the whole corpus, times the brevity penalty (each candidate measured
    against its closest reference length). No smoothing: 0 when some n has no match."""
    matched, total = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        cand_len += len(cand)
        ref_len += min((len(r) for r in refs), key=lambda n: (abs(n - len(cand)), n))
        for n in range(1, 5):
            counts = _ngrams(cand, n)
            most = Counter()
            for r in refs:
                most |= _ngrams(r, n)  # the most times any one reference has each n-gram
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(cand) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, 1))
    return brevity * math.exp(log_precision)


def cider_d(candidates: list[list[str]], references: list[list[list[str]]]) -> float:
    """CIDEr-D (Vedantam et al. 2015), as the COCO evaluation computes it: per n = 1..4, the
    cosine of tf-idf n-gram vectors (idf over the split's references, the candidate's counts
    clipped at the reference's), times a Gaussian penalty on the length difference; averaged
    over n and references, times 10, then over images."""
    N = len(references)
    df: Counter = Counter()
    for refs in references:
        df.update({g for r in refs for n in range(1, 5) for g in _ngrams(r, n)})
    log_N = math.log(float(max(N, 1)))

    def vectors(ws: list[str]) -> list[dict]:
        return [{g: c * (log_N - math.log(max(1.0, df[g]))) for g, c in _ngrams(ws, n).items()}
                for n in range(1, 5)]

    def norm(v: dict) -> float:
        return math.sqrt(sum(x * x for x in v.values()))

    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        vc = vectors(cand)
        per_ref = []
        for ref in refs:
            vr = vectors(ref)
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * CIDER_SIGMA ** 2))
            sims = []
            for c, r in zip(vc, vr):
                dot = sum(min(x, r[g]) * r[g] for g, x in c.items() if g in r)
                denom = norm(c) * norm(r)
                sims.append(penalty * dot / denom if denom else 0.0)
            per_ref.append(sum(sims) / 4)
        scores.append(10.0 * sum(per_ref) / len(per_ref))
    return sum(scores) / max(len(scores), 1)


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    cand = [words(c) for c in candidates]
    refs = [[words(r) for r in rs] for rs in references]
    exact = sum(any(c == r for r in rs) for c, rs in zip(cand, refs)) / max(len(cand), 1)
    return {"caption/bleu4": bleu4(cand, refs), "caption/cider": cider_d(cand, refs),
            "caption/exact_match": exact}
