"""tokenizer.glove: token embeddings start from GloVe vectors, and words never seen in training
but close in GloVe space are understood at evaluation."""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from expertpar.app import train
from expertpar.app.evaluate import load_run_model
from expertpar.config import ConfigError, config_from_dict
from expertpar.data import (DatasetInfo, SampleIndex, load_tokenizer, save_tokenizer,
                            train_tokenizer)
from expertpar.data.glove import glove_words
from expertpar.data.synthetic import CLASSES, TEMPLATES
from expertpar.eval.run import embed_classes, embed_split
from expertpar.eval.zeroshot import zero_shot_accuracy
from expertpar.model.stems import TOKEN_INIT_STD
from expertpar.train.metrics import read_metrics
from expertpar.train.setup import build_model, load_tokenizer_for, model_for_run, prepare_run
from expertpar.train.text_init import apply_text_init, glove_text_init, projection
from glove_helpers import SYNONYMS, shapes_glove_vectors, synonym_classes, write_glove

CAPTIONS = ["a red circle", "a blue square"]
VECTORS = {"red": [3.0, 0.0, 4.0], "crimson": [2.0, 1.0, 4.0], "circle": [0.0, -1.0, 0.0],
           "dog": [1.0, 1.0, 1.0]}


def _setup(tmp_path, dim, seed=0, suffix=".txt"):
    """A tokenizer trained with the GloVe file of VECTORS, and a model config of ``dim``."""
    path = write_glove(tmp_path / f"g{suffix}", {w: np.float32(v) for w, v in VECTORS.items()})
    tok = train_tokenizer(CAPTIONS, 64, glove_words(path))
    cfg = tiny_config(tmp_path, tmp_path, **{"model.dim": dim, "model.heads": 1,
                                             "run.seed": seed})
    return path, tok, cfg


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_rows_are_the_vectors_scaled_to_the_init_std(tmp_path, suffix):
    path, tok, cfg = _setup(tmp_path, dim=3, suffix=suffix)
    init = glove_text_init(tok, path, dim=3, seed=0)
    ids = {w: tok.token_to_id(w) for w in VECTORS}
    assert init.ids == tuple(sorted(ids.values())) and init.vocab == tok.get_vocab_size()
    assert (init.words_read, init.glove_dim) == (4, 3)
    # Same dims: no projection, one common factor. The four vectors' squares sum to
    # 25 + 21 + 1 + 3 = 50 over 12 entries, so their RMS is sqrt(50/12) and every row is its
    # vector times 0.02 / sqrt(50/12).
    scale = TOKEN_INIT_STD / math.sqrt(50 / 12)
    for k, w in enumerate(sorted(VECTORS, key=ids.get)):
        np.testing.assert_allclose(init.rows_ND[k], np.float32(VECTORS[w]) * scale, rtol=1e-6)
    # Applied: the covered rows are these, every other row is the ordinary init, unchanged.
    plain = build_model(cfg, tok.get_vocab_size())
    model = build_model(cfg, tok.get_vocab_size())
    apply_text_init(model, init)
    got, before = model.text_embed.tok.weight.detach(), plain.text_embed.tok.weight.detach()
    np.testing.assert_allclose(got[list(init.ids)].numpy(), init.rows_ND)
    others = [i for i in range(tok.get_vocab_size()) if i not in init.ids]
    assert torch.equal(got[others], before[others])
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert name == "text_embed.tok.weight" or torch.equal(a, b), name


def test_other_dims_take_a_seeded_projection_and_leave_the_global_rng_alone(tmp_path):
    path, tok, _ = _setup(tmp_path, dim=8)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    init = glove_text_init(tok, path, dim=8, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the dense init stream is untouched
    order = sorted(VECTORS, key=tok.token_to_id)
    raw_ND = torch.tensor([VECTORS[w] for w in order]) @ projection(3, 8, seed=5)
    expected = raw_ND * TOKEN_INIT_STD / raw_ND.pow(2).mean().sqrt()
    np.testing.assert_allclose(init.rows_ND, expected.numpy(), rtol=1e-5, atol=1e-8)
    assert init.rows_ND.shape == (4, 8) and init.rows_ND.dtype == np.float32
    np.testing.assert_allclose(glove_text_init(tok, path, dim=8, seed=5).rows_ND, init.rows_ND)
    other = glove_text_init(tok, path, dim=8, seed=6).rows_ND
    assert not np.allclose(other, init.rows_ND)
    # The projection keeps GloVe's geometry roughly: crimson stays nearer red than circle is.
    r, c, o = (init.rows_ND[order.index(w)] for w in ("red", "crimson", "circle"))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(r, c) > cos(r, o)


def test_a_loaded_tokenizer_keeps_its_vocabulary_and_pieces_are_not_covered(synth_dir,
                                                                           tmp_path):
    path = write_glove(tmp_path / "g.txt", {"red": np.float32([1, 2]), "r": np.float32([3, 4]),
                                            "##e": np.float32([5, 6]),
                                            "crimson": np.float32([7, 8])})
    saved = save_tokenizer(train_tokenizer(CAPTIONS, 64), tmp_path / "tokenizer.json")
    cfg = tiny_config(synth_dir, tmp_path / "runs", **{"tokenizer.path": str(saved),
                                                       "tokenizer.glove": str(path)})
    (tmp_path / "run").mkdir()
    tok = load_tokenizer_for(cfg, tmp_path / "run", CAPTIONS)
    # tokenizer.path's vocabulary as it is: GloVe's "crimson" is not added to it.
    assert tok.get_vocab() == load_tokenizer(saved).get_vocab()
    assert tok.token_to_id("crimson") is None
    init = glove_text_init(tok, path, dim=2, seed=0)
    # "red" and the word-initial "r" are tokens; "##e" is not a GloVe word (two pieces).
    assert init.ids == tuple(sorted([tok.token_to_id("red"), tok.token_to_id("r")]))
    assert tok.token_to_id("##e") not in init.ids


def test_a_missing_or_empty_glove_path_is_a_config_error(synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"tokenizer.glove": str(tmp_path / "nope.txt")})
    with pytest.raises(ConfigError, match=r"config key 'tokenizer\.glove': '.*nope\.txt' is not"
                                          r" a file \(it does not exist\)"):
        prepare_run(cfg, None, stop_after=None)
    with pytest.raises(ConfigError, match=r"'tokenizer\.glove': '' must be a path"):
        config_from_dict({"data": {"train": "x"}, "tokenizer": {"glove": ""}})


def test_prepare_run_hands_the_rows_to_a_fresh_start_only(synth_dir, tmp_path, caplog):
    path = write_glove(tmp_path / "g.txt", shapes_glove_vectors(dim=50))
    cfg = tiny_config(synth_dir, tmp_path, **{"tokenizer.glove": str(path)})
    with caplog.at_level(logging.INFO, logger="expertpar"):
        spec, _, _ = prepare_run(cfg, None, stop_after=None)
    init = spec.text_init
    vocab = spec.cfg.tokenizer.vocab_size
    # 16 caption words + 8 synonyms + 16 other words, all with room in 128 tokens.
    assert len(init.ids) == 40 and init.vocab <= vocab
    assert (f"tokenizer.glove {path}: 40 of {init.vocab} vocabulary tokens covered "
            f"(40 words read, 50 dims, projected to 32)") in caplog.text
    fresh = model_for_run(spec, _tokenizer(spec))
    np.testing.assert_array_equal(fresh.text_embed.tok.weight[list(init.ids)].detach().numpy(),
                                  init.rows_ND)
    # A run resumed (or recovered) from a checkpoint loads its embeddings: the rows are not
    # applied, so nothing but the checkpoint decides them.
    resumed = model_for_run(dataclasses.replace(spec, resume_from="ckpt"), _tokenizer(spec))
    plain = build_model(cfg, init.vocab)
    assert torch.equal(resumed.text_embed.tok.weight, plain.text_embed.tok.weight)
    # The spec carries the covered rows only (40 x D float32): small enough for every worker.
    assert init.rows_ND.shape == (40, cfg.model.dim)


def _tokenizer(spec):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(spec.tokenizer_json)


def _zero_shot(run_dir, cfg, evald, classes):
    model, tok, _ = load_run_model(run_dir, cfg)
    info = DatasetInfo("shapes", classes, TEMPLATES)
    cpu = torch.device("cpu")
    class_CE = embed_classes(model, tok, cfg, info, cpu)
    emb = embed_split(model, evald, tok, cfg, cpu)
    return zero_shot_accuracy(emb.image_NE, emb.labels_N, class_CE, (1,))["zero_shot/top1"], tok


def test_held_out_synonyms_are_matched_better_with_glove(synth_dir, tmp_path):
    # The point of it. GloVe puts "crimson" next to "red"; the captions never say "crimson".
    # Prompts with the colour words swapped for synonyms ("a crimson circle") are matched to
    # images by a model trained on "red": with GloVe the synonym's row starts near red's
    # and keeps it (no gradient reaches an unused row, no weight decay on embeddings), so it
    # lands near red; without, "crimson" is character pieces the model learnt nothing for.
    path = write_glove(tmp_path / "shapes_glove.txt", shapes_glove_vectors(dim=50))
    evald = SampleIndex.build(str(synth_dir / "test"), max_samples=200)
    colour_synonyms = synonym_classes(CLASSES, ("colour",))
    top1 = {}
    for use in (False, True):
        # No evaluation inside train(): the one that matters is below, with the synonyms.
        over = {"train.steps": 50, "train.checkpoint_every": 50, "data.eval": "null"}
        if use:
            over["tokenizer.glove"] = str(path)
        cfg = tiny_config(synth_dir, tmp_path / ("glove" if use else "plain"), **over)
        train(cfg)
        top1[use], tok = _zero_shot(cfg.run_dir, cfg, evald, colour_synonyms)
        known = [tok.token_to_id(SYNONYMS[c]) for c in ("red", "green", "blue", "yellow")]
        if use:
            assert None not in known  # each synonym is one token, started from GloVe
            start = read_metrics(cfg.run_dir / "metrics.jsonl")[0]
            assert start["event"] == "start" and start["tokenizer/glove_covered"] == 40
        else:  # without GloVe, never a token: [UNK] or character pieces
            assert known == [None] * 4
            assert tok.encode("crimson").tokens[1:-1] != ["crimson"]
    chance = 1 / len(CLASSES)
    # Measured at 50 steps, seeds 0, 1, 2 (400 images): 0.25, 0.23, 0.23 with GloVe against
    # 0.095, 0.03, 0.045 without (chance 0.0625; the ordinary class names score 0.21-0.24
    # either way: this tiny model tells colours apart, hardly shapes yet).
    assert top1[True] > top1[False] + 0.1, top1
    assert top1[True] > 2.5 * chance, top1
