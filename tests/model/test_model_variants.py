"""Model variants: two towers (`model.towers: separate`) and the dense baseline
(`model.variant: dense`), against the shared-tower MoE model they are compared with."""
from __future__ import annotations

import pytest
import torch

from expertpar.config import TrainConfig, config_from_dict
from expertpar.model import VisionLanguageModel, count_params
from expertpar.model.tower import Block
from expertpar.moe import IMAGE, TEXT, RouteContext
from expertpar.moe.experts import FFN
from expertpar.moe.layer import Gate, MoELayer
from expertpar.train.loss import clip_loss
from expertpar.train.optim import build_optimizer

B, IMAGE_SIZE, PATCH, VOCAB, CTX = 4, 32, 8, 64, 8
TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16 image tokens per image


def make_cfg(depth: int = 4, **model_overrides):
    tree = {"data": {"train": "unused"},
            "model": {"dim": 32, "depth": depth, "heads": 2, "ffn_hidden": 64, "embed_dim": 24,
                      "patch_size": PATCH,
                      "moe": {"num_experts": 4, "top_k": 1, "every": 2, "expert_hidden": 48}}}
    return config_from_dict(tree, [f"model.{k}={v}" for k, v in model_overrides.items()])


def make_model(cfg, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel(cfg.model, image_size=IMAGE_SIZE, vocab_size=VOCAB,
                               context_length=CTX, seed=seed)


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    ids = torch.randint(1, VOCAB, (B, CTX), generator=gen)
    lengths = torch.tensor([8, 5, 3, 6])
    mask = torch.arange(CTX)[None, :] < lengths[:, None]
    ids = ids * mask  # padding id 0 after the caption
    return images, ids, mask


def tower_of(name: str) -> str:
    return name.split(".")[1]  # "towers.<tower>.<block>.ffn"


# ---------------------------------------------------------------- two towers


def test_separate_towers_have_their_own_moe_layers():
    shared, separate = make_model(make_cfg()), make_model(make_cfg(towers="separate"))
    # depth 4, every 2: blocks 1 and 3 are MoE -> 2 per tower
    assert shared.num_moe_layers == 2 and make_cfg().num_moe_layers == 2
    assert separate.num_moe_layers == 4 and make_cfg(towers="separate").num_moe_layers == 4
    assert set(separate.towers) == {"image", "text"}
    layers = separate.moe_layers()
    assert [layer.layer_index for _, layer in layers] == [0, 1, 2, 3]
    # image tower: MoE layers 0, 1; text tower: 2, 3 (the image tower is built first)
    assert [tower_of(n) for n, _ in layers] == ["image", "image", "text", "text"]
    # no parameter is shared between the towers
    image_ids = {id(p) for p in separate.towers["image"].parameters()}
    text_ids = {id(p) for p in separate.towers["text"].parameters()}
    assert image_ids and text_ids and not image_ids & text_ids
    # and the two towers' experts are initialised differently (per-layer seeds)
    e_img = layers[0][1].experts.experts[0].fc1.weight
    e_txt = layers[2][1].experts.experts[0].fc1.weight
    assert not torch.equal(e_img, e_txt)


def test_separate_towers_route_each_modality_through_its_own_tower():
    model = make_model(make_cfg(towers="separate"))
    seen_blocks = {"image": [], "text": []}
    seen_moe = {}
    hooks = []
    for tower in ("image", "text"):
        for block in model.towers[tower]:
            hooks.append(block.register_forward_pre_hook(
                lambda _m, args, t=tower: seen_blocks[t].extend(s.modality for s in args[0])))
    for name, layer in model.moe_layers():
        hooks.append(layer.register_forward_pre_hook(
            lambda _m, args, n=name: seen_moe.setdefault(n, []).append(args[1].clone())))
    images, ids, mask = batch()
    model.encode(images, ids, mask)
    for h in hooks:
        h.remove()
    assert seen_blocks["image"] == [IMAGE] * 4  # 4 blocks, one image sequence each
    assert seen_blocks["text"] == [TEXT] * 4
    for name, calls in seen_moe.items():
        (modality_T,) = calls
        if tower_of(name) == "image":
            assert modality_T.numel() == B * TOKENS and (modality_T == IMAGE).all()
        else:
            assert modality_T.numel() == int(mask.sum()) == 22  # 8 + 5 + 3 + 6 real tokens
            assert (modality_T == TEXT).all()
    assert len(seen_moe) == 4


# Tight capacity (0.5): experts drop tokens, so in a shared tower text tokens compete with image
# tokens for expert slots and a different caption batch changes the image embedding.
TIGHT = {"moe.capacity_factor": 0.5, "moe.eval_capacity_factor": 0.5}


def encode_with_two_caption_batches(model):
    """The same images encoded with two different caption batches: (a, b, images, ids, mask)."""
    images, ids, mask = batch(0)
    _, other_ids, other_mask = batch(1)
    other_ids = (other_ids + 7) % VOCAB * other_mask
    a = model.encode(images, ids, mask, RouteContext(step=3))
    b = model.encode(images, other_ids, other_mask.flip(0), RouteContext(step=3))
    return a, b, images, ids, mask


def test_changing_text_never_changes_the_image_embedding_with_two_towers():
    model = make_model(make_cfg(towers="separate", **TIGHT)).train()
    a, b, images, ids, mask = encode_with_two_caption_batches(model)
    assert not torch.equal(a.text_BE, b.text_BE)
    assert torch.equal(a.image_BE, b.image_BE)
    # images alone give the same image embedding as images with captions
    alone = model.encode(images, None, None, RouteContext(step=3))
    assert torch.equal(alone.image_BE, a.image_BE) and alone.text_BE is None
    # and the other way round: other images, same text embedding
    c = model.encode(images.flip(0) * 0.5, ids, mask, RouteContext(step=3))
    assert torch.equal(c.text_BE, a.text_BE)


def test_shared_tower_image_embedding_does_depend_on_the_text_batch():
    # The control for the test above: one tower, one joint routing over both modalities.
    model = make_model(make_cfg(**TIGHT)).train()
    a, b, *_ = encode_with_two_caption_batches(model)
    assert not torch.equal(a.image_BE, b.image_BE)


# ---------------------------------------------------------------- dense baseline


def test_dense_variant_has_no_moe_layers():
    cfg = make_cfg(variant="dense")
    model = make_model(cfg)
    assert cfg.num_moe_layers == 0 and model.num_moe_layers == 0
    assert model.moe_layers() == []
    assert not any(isinstance(m, (MoELayer, Gate)) for m in model.modules())
    assert not any(b.is_moe for b in model.modules() if isinstance(b, Block))
    enc = model.encode(*batch())
    assert enc.stats == {} and enc.aux == {} and float(enc.aux_loss) == 0.0


@pytest.mark.parametrize("towers", ["shared", "separate"])
def test_dense_ffn_at_moe_positions_has_top_k_times_expert_hidden_units(towers):
    # top_k 2 x expert_hidden 48 = 96 units at blocks 1 and 3 (the MoE positions, every 2);
    # ffn_hidden 64 elsewhere.
    dense = make_model(make_cfg(variant="dense", towers=towers, **{"moe.top_k": 2}))
    moe = make_model(make_cfg(towers=towers, **{"moe.top_k": 2}))
    for tower in dense.towers:
        widths = [b.ffn.fc1.out_features for b in dense.towers[tower]]
        assert widths == [64, 96, 64, 96]
        for b in dense.towers[tower]:
            assert isinstance(b.ffn, FFN) and b.ffn.fc2.in_features == b.ffn.fc1.out_features
        moe_blocks = [b.is_moe for b in moe.towers[tower]]
        assert moe_blocks == [False, True, False, True]
        for b in moe.towers[tower]:
            if b.is_moe:
                assert all(e.fc1.out_features == 48 for e in b.ffn.experts.experts)


def test_the_moe_activation_reaches_the_experts_and_the_dense_variants_stand_ins():
    # model.moe.activation: every expert, and the dense variant's FFN where the MoE layer
    # would be (its equal-compute counterpart); every other dense FFN keeps GELU.
    moe = make_model(make_cfg(depth=2, **{"moe.activation": "relu"}))
    dense = make_model(make_cfg(depth=2, variant="dense", **{"moe.activation": "relu"}))
    blocks = list(moe.towers["shared"])
    assert [e.activation for e in blocks[1].ffn.experts.experts] == ["relu"] * 4
    assert blocks[0].ffn.activation == "gelu"
    assert [b.ffn.activation for b in dense.towers["shared"]] == ["gelu", "relu"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_count_params_moe_and_dense(top_k):
    # dim D = 32, depth 2, every 2 -> block 1 is the only MoE position; E = 4, F = 48.
    # Shared parts (both models):
    #   patch stem Conv2d(3, 32, 8, 8): 3*32*64 + 32 = 6176;  image_pos 16*32 = 512
    #   token embedding 64*32 = 2048;  text pos 8*32 = 256;  modality embedding 2*32 = 64
    #   per block: 2 LayerNorms 2*64 + qkv 32*96 (no bias) + out 32*32+32 = 128+3072+1056 = 4256
    #   block 0 FFN(32, 64): 32*64+64 + 64*32+32 = 4192
    #   image/text norms 64 + 64, image/text projections 32*24 + 32*24 = 1536, logit scale 1
    #   -> 6176+512+2048+256+64 + 2*4256 + 4192 + 128 + 1536 + 1 = 23425
    # One expert FFN(32, 48): 32*48+48 + 48*32+32 = 3152;  gate 4*32 = 128
    # MoE:   total  = 23425 + 128 + 4*3152 = 36161
    #        active = total - 4*3152 + top_k*3152 = 23425 + 128 + top_k*3152
    # Dense: FFN(32, top_k*48) at block 1: 32*48k + 48k + 48k*32 + 32 = 3120k + 32
    #        total = active = 23425 + 3120k + 32
    # So MoE active - dense active = 128 (gate) + 32*(top_k - 1) (the extra output biases).
    k = top_k
    moe = make_model(make_cfg(depth=2, **{"moe.top_k": k}))
    dense = make_model(make_cfg(depth=2, variant="dense", **{"moe.top_k": k}))
    assert count_params(moe) == {"total": 36161, "active_per_token": 23425 + 128 + k * 3152}
    assert count_params(dense) == {"total": 23425 + 3120 * k + 32,
                                   "active_per_token": 23425 + 3120 * k + 32}
    gap = count_params(moe)["active_per_token"] - count_params(dense)["active_per_token"]
    assert gap == 4 * 32 + 32 * (k - 1)
    # What is equal: the FFN weight matrices and hidden biases a token passes through.
    ffn_moe = k * (2 * 32 * 48 + 48)
    ffn_dense = 2 * 32 * (48 * k) + 48 * k
    assert ffn_moe == ffn_dense


def test_count_params_definition_on_a_separate_tower_model():
    # count_params' promise: active = total - all expert parameters + top_k experts per layer.
    model = make_model(make_cfg(towers="separate", **{"moe.top_k": 2}))
    total = sum(p.numel() for p in model.parameters())
    per_expert = 2 * 32 * 48 + 48 + 32
    experts = 4 * 4 * per_expert  # 4 MoE layers (2 per tower) x 4 experts
    assert count_params(model) == {"total": total,
                                   "active_per_token": total - experts + 4 * 2 * per_expert}


# ---------------------------------------------------------------- embeddings and one step

VARIANTS = {"separate": {"towers": "separate"}, "dense": {"variant": "dense"},
            "separate-dense": {"towers": "separate", "variant": "dense"}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_embeddings_are_unit_vectors_of_embed_dim(variant):
    model = make_model(make_cfg(**VARIANTS[variant]))
    for mode in (model.train, model.eval):
        mode()
        enc = model.encode(*batch())
        for emb in (enc.image_BE, enc.text_BE):
            assert emb.shape == (B, 24)
            assert torch.allclose(emb.norm(dim=-1), torch.ones(B), atol=1e-5)


def expert_ids_without_tokens(model, enc) -> set[int]:
    """Parameters of experts that received no token this step: they get no gradient."""
    idle = set()
    for _, layer in model.moe_layers():
        kept_E = enc.stats[layer.layer_index].kept_ME.sum(0)
        for e, expert in enumerate(layer.experts.experts):
            if kept_E[e] == 0:
                idle |= {id(p) for p in expert.parameters()}
    return idle


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_one_step(variant):
    model = make_model(make_cfg(**VARIANTS[variant])).train()
    images, ids, mask = batch()
    opt = build_optimizer(model.named_parameters(), TrainConfig(lr=1e-3, weight_decay=0.05))
    enc = model.encode(images, ids, mask, RouteContext(seed=0, step=0))
    loss = clip_loss(enc.image_BE, enc.text_BE, model.logit_scale) + enc.aux_loss
    assert torch.isfinite(loss)
    # a random model is near chance: ln B = 1.386 for the contrastive part
    assert 0.5 < loss.item() < 5.0
    loss.backward()
    idle = expert_ids_without_tokens(model, enc)
    if "dense" in variant:
        assert idle == set()
    missing = []
    for name, p in model.named_parameters():
        if id(p) in idle:
            assert p.grad is None or not p.grad.any(), name
            continue
        if p.grad is None or not p.grad.abs().sum() > 0:
            missing.append(name)
            continue
        assert torch.isfinite(p.grad).all(), name
    assert not missing, f"no gradient for {missing}"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if id(p) not in idle:
            assert not torch.equal(p, before[name]), f"{name} did not move"
    enc2 = model.encode(images, ids, mask, RouteContext(seed=0, step=1))
    assert torch.isfinite(clip_loss(enc2.image_BE, enc2.text_BE, model.logit_scale))
