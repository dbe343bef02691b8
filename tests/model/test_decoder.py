"""The caption decoder (model.objective captioning / both): what it may see, what it adds to
the model and its MoE layers, its loss, and greedy against beam search."""
from __future__ import annotations

import math

import pytest
import torch

from expertpar.config import ConfigError, config_from_dict
from expertpar.data import Batch
from expertpar.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from expertpar.eval.generate import generate
from expertpar.moe import RouteContext
from expertpar.train.loss import caption_loss_sum
from expertpar.train.names import model_buffers, model_entries
from expertpar.train.owners import ParameterOwner
from expertpar.train.step import SingleProcess, train_step
from test_model_variants import B, CTX, IMAGE_SIZE, VOCAB, make_model
from test_model_variants import make_cfg as variant_cfg


def make_cfg(**model):
    """test_model_variants' small model, 2 blocks, with a CoCa decoder of 2 blocks."""
    return variant_cfg(depth=2, **{"objective": "both", "decoder_depth": 2, **model})


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    ids = torch.randint(4, VOCAB, (B, CTX), generator=gen)
    ids[:, 0] = BOS_ID
    mask = torch.ones(B, CTX, dtype=torch.bool)
    return images, ids, mask


def test_a_position_sees_the_tokens_before_it_and_the_image_but_not_the_tokens_after():
    # Dropless: with a capacity, which tokens overflow an expert depends on all of them
    # (as in every token-choice MoE decoder); here attention alone is under test.
    model = make_model(make_cfg(**{"moe.dropless": True})).eval()
    images, ids, mask = inputs()
    memory = model.encode(images).image_tokens_BND
    logits = model.decode(memory, ids, mask)
    later = ids.clone()
    later[:, 5:] = torch.randint(4, VOCAB, (B, CTX - 5))
    # Positions 0..4 read tokens 0..4 only: the same logits whatever follows.
    torch.testing.assert_close(model.decode(memory, later, mask)[:, :5], logits[:, :5])
    assert not torch.allclose(model.decode(memory, later, mask)[:, 5:], logits[:, 5:])
    other = model.encode(torch.randn_like(images)).image_tokens_BND
    assert not torch.allclose(model.decode(other, ids, mask)[:, 0], logits[:, 0])


def test_decoder_moe_layers_come_after_the_encoders_and_a_contrastive_model_is_unchanged():
    cfg = make_cfg()
    both = make_model(cfg)
    assert both.num_moe_layers == 2  # the shared tower's block 2, the decoder's block 2
    assert [name for name, _ in both.moe_layers()] == ["towers.shared.1.ffn", "decoder.1.ffn"]
    # The default model: 4 blocks, every 2nd MoE; a default decoder (2 blocks) adds one.
    assert config_from_dict({"data": {"train": "x"}}).num_moe_layers == 2
    assert config_from_dict({"data": {"train": "x"}, "model": {"objective": "both"}}
                            ).num_moe_layers == 3
    # Contrastive: no decoder parameters, and the others start where they always did.
    plain, again = make_model(make_cfg(objective="contrastive")), make_model(cfg)
    plain_names = dict(plain.named_parameters())
    assert not any(n.startswith(("decoder.", "lm_head", "memory_norm", "decoder_norm"))
                   for n in plain_names)
    for name, p in plain_names.items():
        torch.testing.assert_close(dict(again.named_parameters())[name], p, msg=name)


@pytest.mark.parametrize("key,value,message", [
    ("model.objective", "lm", "is not one of ['contrastive', 'captioning', 'both']"),
    ("model.decoder_depth", 0, "must be >= 1"),
    ("model.caption_loss_weight", 0.0, "must be > 0"),
    ("model.moe.routing", "expert_choice",
     "is refused with model.objective 'both': the caption decoder")])
def test_bad_decoder_settings_are_refused_by_name(key, value, message):
    overrides = [f"{key}={value}"] + (["model.objective=both"] if "routing" in key else [])
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"train": "x"}}, overrides)
    assert f"'{key}': {value!r} {message}" in str(err.value)


def test_the_caption_loss_counts_real_next_tokens_only():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(token 2) = 3/6 at position 0
    target = torch.tensor([[2, 1, 0]])
    mask = torch.tensor([[True, True, False]])  # position 2 is padding
    # -ln(1/2) for position 0, -ln(1/4) for position 1 (uniform), nothing for padding
    assert float(caption_loss_sum(logits, target, mask)) == pytest.approx(
        math.log(2) + math.log(4))


def test_captioning_alone_trains_the_decoder_and_not_the_text_tower():
    cfg = make_cfg(objective="captioning", variant="dense", towers="separate")
    model = make_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    owner = ParameterOwner(model_entries(model), _train_cfg(), model_buffers(model))
    images, ids, mask = inputs()
    out = train_step(model, Batch(0, images, ids, mask), RouteContext(), [owner],
                     SingleProcess(), 1.0, 1e-3)
    assert "loss/clip" not in out.metrics
    # caption_loss_weight (2 by default) weighs captioning against the contrastive term: alone,
    # the caption loss counts once.
    assert out.metrics["loss/total"] == pytest.approx(
        out.metrics["loss/caption"] + out.metrics["loss/aux"])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"lm_head.weight", "decoder.0.cross.q.weight", "towers.image.0.attn.qkv.weight",
            "text_embed.tok.weight"} <= moved  # the decoder reads the token embeddings
    untrained = {n for n in before if n.startswith(("towers.text.", "text_proj.", "text_norm."))}
    assert len(untrained) > 5 and not moved & (untrained | {"logit_scale"})


def _train_cfg():
    return config_from_dict({"data": {"train": "x"}}).train


class Scripted(torch.nn.Module):
    """A decoder whose next-token distribution depends on the last token alone:
    after [BOS]: A 0.6, B 0.4; after A: [EOS] 0.55, A 0.45; after B: [EOS] 1."""
    A, B = 4, 5

    def __init__(self):
        super().__init__()
        self.training = False
        table = torch.full((6, 6), 1e-9)
        table[BOS_ID, self.A], table[BOS_ID, self.B] = 0.6, 0.4
        table[self.A, EOS_ID], table[self.A, self.A] = 0.55, 0.45
        table[self.B, EOS_ID] = 1.0
        table[EOS_ID, EOS_ID] = table[PAD_ID, PAD_ID] = 1.0
        self.table = table

    def encode(self, images):
        return type("Enc", (), {"image_tokens_BND": images})()

    def decode(self, memory, ids, mask, ctx):
        return self.table[ids].log()


def test_beam_search_finds_the_caption_greedy_misses():
    model, images = Scripted(), torch.zeros(2, 1, 1)
    # Greedy takes A (0.6), then [EOS]: mean log-probability (ln .6 + ln .55) / 2 = -0.554.
    assert generate(model, images, max_tokens=5) == [[Scripted.A]] * 2
    # A beam of 2 keeps B (0.4), then [EOS] with certainty: ln .4 / 2 = -0.458, better.
    assert generate(model, images, max_tokens=5, beam=2) == [[Scripted.B]] * 2
    with pytest.raises(ValueError, match="beam must be >= 1"):
        generate(model, images, max_tokens=5, beam=0)


def test_generation_stops_at_max_tokens_and_leaves_the_model_in_its_mode():
    model = make_model(make_cfg()).train()
    images, _, _ = inputs()
    for beam in (1, 3):
        out = generate(model, images, max_tokens=4, beam=beam)
        assert len(out) == B and all(len(c) <= 4 for c in out)
        assert all(t != BOS_ID for c in out for t in c)  # never generated
    assert model.training
