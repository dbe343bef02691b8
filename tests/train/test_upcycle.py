"""Sparse upcycling: a MoE run whose experts start as copies of a dense run's FFNs.

The dense run here has FFNs of 64 units, except where MoE layers would be (block 1 of 2:
``model.moe.every`` 2), where the dense variant puts top_k x expert_hidden = 2 x 48 = 96 units;
so the upcycled experts are 96 wide, and an expert that copied the wrong FFN would not fit.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from expertpar.app import train
from expertpar.app.cli import main
from expertpar.config import load_config
from expertpar.data import ImageTextDataset, encode_captions, load_tokenizer, make_transform
from expertpar.train.checkpoint import latest_checkpoint, read_shards, read_train_state
from expertpar.train.loop import dense_owner
from expertpar.train.setup import build_model, model_for_tokenizer
from expertpar.train.upcycle import UpcycleError, copy_into_experts, upcycle, upcycled_config

DENSE = {"model.variant": "dense", "model.moe.top_k": 2, "model.moe.expert_hidden": 48,
         "train.steps": 4, "train.warmup_steps": 2, "train.checkpoint_every": 4,
         "data.eval": "null"}


@pytest.fixture(scope="module")
def dense_run(synth_dir, tmp_path_factory) -> Path:
    """A dense run trained 4 steps (its weights are no longer their initialisation)."""
    result = train(tiny_config(synth_dir, tmp_path_factory.mktemp("dense"), **DENSE))
    return result.run_dir


def load_run(run_dir: Path):
    """The model of a run directory at its latest checkpoint, as ``expertpar eval`` loads it."""
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model = model_for_tokenizer(cfg, tokenizer)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    dense_owner(model, cfg).load(read_shards(ckpt), where=str(ckpt), optimizer_state=False)
    return model, tokenizer, cfg


@pytest.fixture(scope="module")
def batch(synth_dir, dense_run):
    """48 real training pairs, tokenised with the dense run's tokenizer."""
    ds = ImageTextDataset.load(synth_dir / "train", max_samples=48)
    images, captions, _ = ds.batch(list(range(48)), make_transform(32, train=False))
    ids, mask = encode_captions(load_tokenizer(dense_run / "tokenizer.json"), captions, 12)
    return images, ids, mask


def forward(model, batch, train_mode: bool):
    """Image and text embeddings and the CLIP logits of ``batch``."""
    images, ids, mask = batch
    model.train(train_mode)
    with torch.no_grad():
        enc = model.encode(images, ids, mask)
        logits = model.logit_scale.exp() * enc.image_BE @ enc.text_BE.T
    return enc.image_BE, enc.text_BE, logits


def upcycle_cli(dense_run: Path, out: Path, *args: str) -> int:
    return main(["upcycle", str(dense_run), "--out", str(out), *args])


# Exact equality needs each token's expert weights to sum to 1 and no token dropped. Then
# y = sum_k w_k f(x) = f(x), since every expert f is the same copy of the dense FFN:
# - top-2 of 4 with renormalize: w_1 + w_2 = 1 whatever the fresh gates say;
# - one expert, top-1: softmax over one expert is exactly 1.
# (Top-1 of E > 1 keeps w = p, about 1/E at the start: the MoE output is the dense FFN's
# scaled by p, not equal; see the last case.) dropless keeps every token, since the fresh
# gates route similar tokens alike and capacity could drop some.
@pytest.mark.parametrize("experts,top_k", [(4, 2), (1, 1)])
def test_the_upcycled_model_starts_as_the_dense_model(dense_run, batch, tmp_path, experts,
                                                      top_k):
    out = tmp_path / "up"
    assert upcycle_cli(dense_run, out, "--experts", str(experts), "--top-k", str(top_k),
                       "--set", "model.moe.dropless=true") == 0
    dense, tok, _ = load_run(dense_run)
    moe, tok_up, cfg = load_run(out)
    assert tok_up.to_str() == tok.to_str()
    assert cfg.model.variant == "moe" and cfg.model.moe.num_experts == experts
    assert cfg.model.moe.expert_hidden == 96  # the width of the dense FFN each expert copies
    assert [name for name, _ in moe.moe_layers()] == ["towers.shared.1.ffn"]
    for train_mode in (False, True):  # evaluation routing, and training routing
        for want, got in zip(forward(dense, batch, train_mode),
                             forward(moe, batch, train_mode)):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    # Each expert is the dense FFN; the gate is what a fresh MoE run of this seed starts with.
    ffn = dict(dense.named_parameters())
    for e, expert in enumerate(moe.moe_layers()[0][1].experts.experts):
        for name, p in expert.named_parameters():
            assert torch.equal(p, ffn[f"towers.shared.1.ffn.{name}"]), (e, name)
    fresh = model_for_tokenizer(cfg, tok)
    assert torch.equal(moe.moe_layers()[0][1].gate.w_ED, fresh.moe_layers()[0][1].gate.w_ED)
    # A step-0 checkpoint without optimizer state, that says where it came from.
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.name == "step_000000"
    assert not [k for shard in read_shards(ckpt).values() for k in shard if "::" in k
                and not k.startswith("buffer::")]
    state = read_train_state(ckpt)
    origin = json.loads((out / "upcycled_from.json").read_text())
    assert state["step"] == 0 and state["upcycled_from"] == origin
    assert origin == {"checkpoint": str(latest_checkpoint(dense_run / "checkpoints")),
                      "step": 4, "moe_layers": ["towers.shared.1.ffn"], "experts": experts,
                      "top_k": top_k}


@pytest.mark.parametrize("towers,stem", [("separate", "patch"), ("shared", "cnn")])
def test_two_towers_and_the_cnn_stems_statistics_are_copied(synth_dir, tmp_path, towers, stem):
    """The copy itself, without training: both towers' MoE layers, and the BatchNorm running
    statistics of the CNN stem (buffers, not parameters)."""
    dense_cfg = tiny_config(synth_dir, tmp_path, **DENSE, **{"model.towers": towers,
                                                             "model.stem": stem})
    dense = build_model(dense_cfg, 128)
    with torch.no_grad():
        for name, b in dense.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    cfg = upcycled_config(dense_cfg, tmp_path / "up", experts=3,
                          overrides=["model.moe.dropless=true"])
    moe = build_model(cfg, 128)
    layers = copy_into_experts(dense, moe)
    assert layers == (["towers.shared.1.ffn"] if towers == "shared" else
                      ["towers.image.1.ffn", "towers.text.1.ffn"])
    gen = torch.Generator().manual_seed(0)
    batch = (torch.rand(6, 3, 32, 32, generator=gen), torch.randint(4, 128, (6, 12), generator=gen),
             torch.ones(6, 12, dtype=torch.bool))
    for want, got in zip(forward(dense, batch, False), forward(moe, batch, False)):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_the_experts_keep_the_activation_the_dense_ffns_were_trained_with(synth_dir, tmp_path):
    dense_cfg = tiny_config(synth_dir, tmp_path, **DENSE, **{"model.moe.activation": "silu"})
    cfg = upcycled_config(dense_cfg, tmp_path / "up", experts=2)
    assert cfg.model.moe.activation == "silu"  # inherited: the copies compute what they did
    with pytest.raises(UpcycleError, match=r"model.moe.activation='relu' conflicts .*'silu'"):
        upcycled_config(dense_cfg, tmp_path / "up", experts=2,
                        overrides=["model.moe.activation=relu"])


def test_top1_of_several_experts_does_not_start_as_the_dense_model_and_says_so(
        dense_run, batch, tmp_path, caplog):
    out = tmp_path / "up"
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        assert upcycle_cli(dense_run, out, "--experts", "4", "--top-k", "1",
                           "--set", "model.moe.dropless=true") == 0
    assert "top-1 routing weights each expert's output by its gate probability" in caplog.text
    dense, _, _ = load_run(dense_run)
    moe, _, _ = load_run(out)
    want, got = forward(dense, batch, False)[0], forward(moe, batch, False)[0]
    assert (got - want).abs().max() > 1e-3


def test_the_upcycled_run_trains_on_and_its_loss_falls(dense_run, tmp_path):
    out = tmp_path / "up"
    assert upcycle_cli(dense_run, out, "--experts", "4", "--set", "train.steps=12",
                       "--set", "train.checkpoint_every=6", "--set", "train.log_every=6") == 0
    result = train(load_config(out / "config.yaml"))
    assert len(result.losses) == 12  # resumed from the upcycled step-0 checkpoint: steps 0..11
    first, last3 = result.losses[0], sum(result.losses[-3:]) / 3
    assert last3 < first, result.losses
    assert latest_checkpoint(out / "checkpoints").name == "step_000012"


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_inputs_are_refused_naming_what_is_wrong(dense_run, tmp_path, capsys):
    out = tmp_path / "up"

    def refused(*args: str, run: Path = dense_run, to: Path = out) -> str:
        assert main(["upcycle", str(run), "--out", str(to), *args]) == 2
        return capsys.readouterr().err

    before = tree_digest(dense_run)
    assert "--experts must be >= 1, got 0" in refused("--experts", "0")
    assert "--top-k must be between 1 and --experts (2), got 3" in refused(
        "--experts", "2", "--top-k", "3")
    err = refused("--experts", "4", "--set", "model.dim=64")
    assert "--set model.dim=64 conflicts with the dense run (model.dim 32)" in err
    assert "--set model.depth=4 conflicts with the dense run (model.depth 2)" in refused(
        "--experts", "4", "--set", "model.depth=4")
    assert "model.moe.num_experts is set by `expertpar upcycle` (use --experts)" in refused(
        "--experts", "4", "--set", "model.moe.num_experts=8")
    assert "run.name is set by `expertpar upcycle` (use --out)" in refused(
        "--experts", "4", "--set", "run.name=x")
    # Moving the MoE layers to every block would need experts of 64 units in block 0 and
    # 96 in block 1.
    err = refused("--experts", "4", "--set", "model.moe.every=1")
    assert "after --set model.moe.every" in err and "{0: 64, 1: 96}" in err
    assert "expert_hidden 64, but the dense FFNs the experts copy have 96 units" in refused(
        "--experts", "4", "--set", "model.moe.expert_hidden=64")
    assert "unknown config key 'model.moe.nope'" in refused(
        "--experts", "4", "--set", "model.moe.nope=1")
    # Not a dense run: missing, no checkpoint, already MoE.
    assert f"dense run '{tmp_path / 'nowhere'}' is not a directory" in refused(
        "--experts", "4", run=tmp_path / "nowhere")
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((dense_run / "config.yaml").read_text())
    assert f"dense run '{empty}' has no checkpoint" in refused("--experts", "4", run=empty)
    assert upcycle_cli(dense_run, out, "--experts", "2") == 0
    capsys.readouterr()
    assert "is already a MoE run (model.variant 'moe'" in refused(
        "--experts", "4", run=out, to=tmp_path / "again")
    # An output directory that holds anything, the dense run itself included: nothing is lost.
    up_before = tree_digest(out)
    assert f"--out {out} already holds files" in refused("--experts", "4")
    assert f"--out {dense_run} already holds files" in refused("--experts", "4", to=dense_run)
    assert tree_digest(out) == up_before and tree_digest(dense_run) == before
    assert not list(tmp_path.glob(".tmp-upcycle-*"))
    assert not (tmp_path / "again").exists()


def test_expert_choice_routing_takes_no_top_k(dense_run, tmp_path, caplog):
    with pytest.raises(UpcycleError, match="--top-k 2: model.moe.routing 'expert_choice'"):
        upcycle(dense_run, tmp_path / "a", experts=4, top_k=2,
                overrides=["model.moe.routing=expert_choice"])
    with caplog.at_level(logging.WARNING, logger="expertpar"):
        up = upcycle(dense_run, tmp_path / "b", experts=4,
                     overrides=["model.moe.routing=expert_choice"])
    assert up.config.model.moe.top_k == 1 and "expert_choice" in caplog.text
