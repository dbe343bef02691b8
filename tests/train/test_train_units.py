"""CLIP loss, learning-rate schedule and weight-decay selection, against values worked by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from expertpar.config import TrainConfig, config_from_dict
from expertpar.model import VisionLanguageModel
from expertpar.moe.layer import Gate
from expertpar.train.loss import clip_loss
from expertpar.train.optim import build_optimizer, lr_at, wants_decay

# ---------------------------------------------------------------- CLIP loss

# image = I_2, text rows t0 = [0.6, 0.8], t1 = [0, 1]  ->  sim = image @ text^T = [[0.6, 0.0],
#                                                                                [0.8, 1.0]]
IMG_2 = torch.eye(2)
TXT_2 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_clip_loss_2x2_by_hand():
    # logit_scale = ln 2, applied as exp(ln 2) = 2: logits = [[1.2, 0.0], [1.6, 2.0]]
    # For 2 classes, CE(target t) = log(1 + exp(other - target logit)) = softplus(other - t).
    #   image->text (rows):    row 0: softplus(0.0 - 1.2) = 0.263282
    #                          row 1: softplus(1.6 - 2.0) = 0.513015     mean 0.388149
    #   text->image (columns): col 0: softplus(1.6 - 1.2) = 0.913015
    #                          col 1: softplus(0.0 - 2.0) = 0.126928     mean 0.519972
    #   loss = (0.388149 + 0.519972) / 2 = 0.454060
    i2t = (softplus(-1.2) + softplus(-0.4)) / 2
    t2i = (softplus(0.4) + softplus(-2.0)) / 2
    assert (i2t + t2i) / 2 == pytest.approx(0.454060, abs=1e-6)
    loss = clip_loss(IMG_2, TXT_2, torch.tensor(math.log(2.0)))
    assert loss.item() == pytest.approx(0.454060, abs=1e-6)


def test_clip_loss_applies_exp_of_the_scale():
    # logit_scale = 0 -> exp(0) = 1: logits = sim = [[0.6, 0.0], [0.8, 1.0]]
    #   image->text: softplus(-0.6) = 0.437488, softplus(-0.2) = 0.598139   mean 0.517813
    #   text->image: softplus(0.2)  = 0.798139, softplus(-1.0) = 0.313262   mean 0.555700
    #   loss = 0.536757   (a scale used as-is, 0 * sim, would give ln 2 = 0.693147)
    loss = clip_loss(IMG_2, TXT_2, torch.tensor(0.0))
    assert loss.item() == pytest.approx(0.536757, abs=1e-6)
    # scale 2 as given would be exp(2) = 7.389 on the logits, not 2: not the ln-2 value above
    assert clip_loss(IMG_2, TXT_2, torch.tensor(2.0)).item() != pytest.approx(0.454060, abs=1e-3)


def test_clip_loss_perfect_alignment_large_scale_is_zero():
    # image = text = I_4, scale ln 100: logits 100 on the diagonal, 0 elsewhere;
    # CE = log(1 + 3 exp(-100)) ~ 1e-43 in both directions.
    eye = torch.eye(4)
    loss = clip_loss(eye, eye, torch.tensor(math.log(100.0)))
    assert 0.0 <= loss.item() < 1e-6


def test_clip_loss_uniform_similarities_is_log_batch():
    # All pairs equally similar: every row/column is a uniform softmax over B = 4 -> ln 4.
    v = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)
    for scale in (0.0, 1.0, math.log(100.0)):
        assert clip_loss(v, v, torch.tensor(scale)).item() == pytest.approx(math.log(4), abs=1e-5)


def test_clip_loss_symmetric_in_swapping_the_towers():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    scale = torch.tensor(math.log(10.0))
    a, b = clip_loss(img, txt, scale), clip_loss(txt, img, scale)
    assert torch.allclose(a, b, atol=1e-6)
    # ...but not invariant to re-pairing (the diagonal is the positive)
    assert not torch.allclose(a, clip_loss(img, txt.roll(1, dims=0), scale), atol=1e-3)


def test_clip_loss_gradient_reaches_the_scale_and_both_towers():
    img = IMG_2.clone().requires_grad_()
    txt = TXT_2.clone().requires_grad_()
    scale = torch.tensor(math.log(2.0), requires_grad=True)
    clip_loss(img, txt, scale).backward()
    for t in (img, txt, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


# ---------------------------------------------------------------- learning-rate schedule

LR, FLOOR = 1e-3, 1e-4  # min_lr_ratio 0.1


def sched(steps: int, warmup: int) -> TrainConfig:
    return TrainConfig(steps=steps, warmup_steps=warmup, lr=LR, min_lr_ratio=0.1)


def test_warmup_is_linear_from_lr_over_warmup_steps():
    cfg = sched(20, 5)  # warmup steps 0..4: lr * (step + 1) / 5
    assert lr_at(0, cfg) == pytest.approx(2e-4, rel=1e-9)  # lr / warmup_steps
    assert lr_at(1, cfg) == pytest.approx(4e-4, rel=1e-9)
    assert lr_at(2, cfg) == pytest.approx(6e-4, rel=1e-9)
    assert lr_at(3, cfg) == pytest.approx(8e-4, rel=1e-9)


def test_peak_at_the_end_of_warmup():
    cfg = sched(20, 5)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[4] == pytest.approx(LR, rel=1e-12)  # the last warmup step
    assert max(lrs) == pytest.approx(LR, rel=1e-12)
    assert lrs.index(max(lrs)) == 4
    # rises during warmup, never rises after it
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5]))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert all(FLOOR - 1e-12 <= x for x in lrs)


@pytest.mark.parametrize("steps,warmup", [(20, 5), (110, 10), (11, 0)])
def test_cosine_reaches_lr_times_min_lr_ratio_at_the_last_step(steps, warmup):
    # The loop calls lr_at(step) for step = 0 .. train.steps - 1 (step + 1 is the step count
    # it logs and checkpoints), so the last optimizer step is steps - 1: it should run at
    # lr * min_lr_ratio = 1e-4. (Today's lr_at gets there only at step == steps, which never
    # runs: 1.098e-4 at step 19 of 20 with 5 warmup steps.)
    cfg = sched(steps, warmup)
    assert lr_at(steps - 1, cfg) == pytest.approx(FLOOR, rel=1e-9)


def test_no_warmup_starts_at_the_peak():
    cfg = sched(11, 0)
    # warmup_steps = 0: no warmup (and no division by zero): step 0 runs at the peak lr.
    assert lr_at(0, cfg) == pytest.approx(LR, rel=1e-12)
    assert all(lr_at(s, cfg) <= LR for s in range(11))


def test_no_warmup_cosine_midpoint_is_halfway():
    cfg = sched(11, 0)
    # Cosine over steps 0..10; its midpoint is step 5 (progress 1/2, cos = 0):
    #   floor + (lr - floor) / 2 = 1e-4 + 4.5e-4 = 5.5e-4
    assert lr_at(5, cfg) == pytest.approx(5.5e-4, rel=1e-9)


def test_beyond_the_last_step_stays_at_the_floor():
    cfg = sched(20, 5)
    assert lr_at(20, cfg) == pytest.approx(FLOOR, rel=1e-9)
    assert lr_at(500, cfg) == pytest.approx(FLOOR, rel=1e-9)


# ---------------------------------------------------------------- weight decay


@pytest.mark.parametrize("name,shape,decay", [
    ("towers.shared.0.attn.qkv.weight", (96, 32), True),        # weight matrix
    ("towers.shared.0.attn.out.bias", (32,), False),            # bias
    ("towers.shared.0.norm1.weight", (32,), False),             # norm gain
    ("towers.shared.1.ffn.experts.experts.0.fc1.weight", (64, 32), True),  # expert matrix
    ("towers.shared.1.ffn.experts.experts.0.fc2.bias", (32,), False),
    ("towers.shared.1.ffn.gate.w_ED", (4, 32), True),           # router matrix
    ("image_stem.proj.weight", (32, 3, 8, 8), True),            # conv kernel
    ("image_proj.weight", (32, 32), True),
    ("text_embed.tok.weight", (128, 32), False),                # token embedding (2-D)
    ("modality_embed", (2, 32), False),                         # embedding (2-D)
    ("image_pos", (1, 16, 32), False),                          # positional (3-D)
    ("text_embed.pos", (1, 12, 32), False),                     # positional (3-D)
    ("image_norm.weight", (32,), False),
    ("logit_scale", (), False),                                 # scalar
])
def test_wants_decay_by_name_and_ndim(name, shape, decay):
    assert wants_decay(name, torch.empty(shape)) is decay


def expected_decay(model: nn.Module) -> tuple[set[int], set[int]]:
    """An independent rule by module type: Linear/Conv weights and the gate decay, nothing
    else (biases, LayerNorm/BatchNorm, nn.Embedding, positional and modality embeddings,
    the logit scale)."""
    decay, no_decay = set(), set()
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if (isinstance(mod, (nn.Linear, nn.Conv2d)) and pname == "weight") or (
                    isinstance(mod, Gate) and pname == "w_ED"):
                decay.add(id(p))
            else:
                no_decay.add(id(p))
    return decay, no_decay


def small_model(**model_overrides) -> VisionLanguageModel:
    tree = {"data": {"train": "unused"},
            "model": {"dim": 32, "depth": 2, "heads": 2, "ffn_hidden": 64, "embed_dim": 32,
                      "patch_size": 8, "moe": {"num_experts": 4, "expert_hidden": 64}}}
    overrides = [f"model.{k}={v}" for k, v in model_overrides.items()]
    cfg = config_from_dict(tree, overrides)
    return VisionLanguageModel(cfg.model, image_size=32, vocab_size=128, context_length=12)


@pytest.mark.parametrize("overrides", [
    {}, {"stem": "conv"}, {"stem": "cnn"}, {"towers": "separate"}, {"variant": "dense"},
], ids=["patch", "conv", "cnn", "separate", "dense"])
def test_build_optimizer_groups_for_a_real_model(overrides):
    model = small_model(**overrides)
    tc = TrainConfig(weight_decay=0.05)
    opt = build_optimizer(model.named_parameters(), tc)
    decay, no_decay = expected_decay(model)
    assert len(opt.param_groups) == 2
    g_decay, g_plain = opt.param_groups
    assert g_decay["weight_decay"] == 0.05 and g_plain["weight_decay"] == 0.0
    assert {id(p) for p in g_decay["params"]} == decay
    assert {id(p) for p in g_plain["params"]} == no_decay
    # every parameter exactly once
    assert len(g_decay["params"]) + len(g_plain["params"]) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in g_plain["params"]}
    for must in ("logit_scale", "image_pos", "modality_embed", "text_embed.pos",
                 "text_embed.tok.weight", "image_norm.weight", "image_norm.bias",
                 "text_norm.weight"):
        assert must in plain_names, must
    decay_names = {names[id(p)] for p in g_decay["params"]}
    assert {"image_proj.weight", "text_proj.weight"} <= decay_names
    assert any(n.endswith("attn.qkv.weight") for n in decay_names)
    assert not any(n.endswith(".bias") or "norm" in n for n in decay_names)


def test_build_optimizer_skips_frozen_parameters():
    model = small_model()
    model.logit_scale.requires_grad_(False)
    opt = build_optimizer(model.named_parameters(), TrainConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.logit_scale) not in ids
    assert len(ids) == len(list(model.parameters())) - 1


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_and_a_bad_one_named(tmp_path, caplog):
    import json
    import logging

    from expertpar.train.metrics import MetricsLog, read_metrics
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss/total": 2.0}, {"step": 2, "loss/total": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 3, "loss/to')
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        assert read_metrics(path) == good
        MetricsLog(path, resume_step=2)  # a resume keeps what its checkpoint holds
    assert f"{path}:3: the last line was cut short" in caplog.text
    assert read_metrics(path) == good
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}:2 is not a JSON metrics record"):
        read_metrics(path)
