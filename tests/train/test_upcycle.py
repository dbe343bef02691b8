"""Sparse upcycling: a MoE run whose experts start as copies of a dense run's FFNs.

The dense run here has FFNs of 64 units, except where MoE layers would be (block 1 of 2:
``model.moe.every`` 2), where the dense variant puts top_k x expert_hidden = 2 x 48 = 96 units;
so the upcycled experts are 96 wide, and an expert that copied the wrong FFN would not fit.
Branch-train-mix (the tests at the end) mixes that run with a second branch: another seed,
another data subset, the same tokenizer. Another seed means another initialisation, so every
averaged tensor differs from both runs' and the test of the mean means something (BTX proper
branches from one seed run, as the README's example does).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from conftest import tiny_config
from expertpar.app import train
from expertpar.app.cli import main
from expertpar.config import config_from_dict, config_to_dict, dump_config, load_config
from expertpar.data import (ImageTextDataset, encode_captions, load_tokenizer, make_transform,
                            vocab_size)
from expertpar.train.checkpoint import (latest_checkpoint, read_shards, read_train_state,
                                        write_checkpoint)
from expertpar.train.loop import dense_owner
from expertpar.train.setup import build_model, model_for_tokenizer
from expertpar.train.upcycle import (UpcycleError, copy_into_experts, mix_into_experts, upcycle,
                                     upcycled_config)

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
    assert origin == {"method": "upcycle",
                      "checkpoint": str(latest_checkpoint(dense_run / "checkpoints")),
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


def test_a_coca_models_decoder_ffns_become_experts_too(synth_dir, tmp_path):
    """model.objective both: the caption decoder's FFN at a MoE place is copied like a tower's,
    and the upcycled decoder starts as the dense one."""
    dense_cfg = tiny_config(synth_dir, tmp_path, **DENSE, **{"model.objective": "both"})
    dense = build_model(dense_cfg, 128)
    cfg = upcycled_config(dense_cfg, tmp_path / "up", experts=3,
                          overrides=["model.moe.dropless=true"])
    moe = build_model(cfg, 128)
    assert copy_into_experts(dense, moe) == ["towers.shared.1.ffn", "decoder.1.ffn"]
    gen = torch.Generator().manual_seed(0)
    images, ids = torch.rand(6, 3, 32, 32, generator=gen), torch.randint(4, 128, (6, 12),
                                                                          generator=gen)
    mask = torch.ones(6, 12, dtype=torch.bool)
    logits = []
    for model in (dense, moe):
        model.eval()
        with torch.no_grad():
            enc = model.encode(images, ids, mask)
            logits.append(model.decode(enc.image_tokens_BND, ids, mask))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=2e-5)


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


# Branch-train-mix (BTX): several dense runs, one expert each, every other weight their mean.

@pytest.fixture(scope="module")
def branch_run(synth_dir, dense_run, tmp_path_factory) -> Path:
    """A second branch: another seed (so another initialisation), another data subset (the
    first 800 training pairs), the first branch's tokenizer, trained 4 steps."""
    return train(tiny_config(synth_dir, tmp_path_factory.mktemp("branch"), **DENSE, **{
        "run.seed": 1, "data.max_train_samples": 800,
        "tokenizer.path": str(dense_run / "tokenizer.json")})).run_dir


def write_untrained_run(run_dir: Path, cfg, tokenizer_json: str) -> Path:
    """A dense run directory with one verified checkpoint of ``cfg``'s initial model: a branch
    whose weights no test reads, made without training."""
    model = build_model(cfg, vocab_size(Tokenizer.from_str(tokenizer_json)))
    write_checkpoint(run_dir / "checkpoints", 0, dense_owner(model, cfg).export(),
                     train_state={}, text_files={"config.yaml": dump_config(cfg),
                                                 "tokenizer.json": tokenizer_json})
    return run_dir


def test_btx_experts_are_the_runs_ffns_and_every_other_weight_their_mean(
        dense_run, branch_run, tmp_path):
    out = tmp_path / "btx"
    assert main(["upcycle", str(dense_run), str(branch_run), "--out", str(out)]) == 0
    a, tok, _ = load_run(dense_run)
    b, _, _ = load_run(branch_run)
    moe, tok_mixed, cfg = load_run(out)
    assert tok_mixed.to_str() == tok.to_str()
    # The first run's config (its seed and data), two experts of the dense FFN's width, top-2.
    assert (cfg.model.variant, cfg.model.moe.num_experts, cfg.model.moe.top_k,
            cfg.model.moe.expert_hidden) == ("moe", 2, 2, 96)
    assert cfg.run.seed == 0 and cfg.data.max_train_samples is None
    layer = "towers.shared.1.ffn"
    assert [name for name, _ in moe.moe_layers()] == [layer]
    sa, sb = a.state_dict(), b.state_dict()
    mixed = moe.state_dict()
    fresh = model_for_tokenizer(cfg, tok).state_dict()
    differ = 0
    for key, got in mixed.items():
        if key.startswith(f"{layer}.gate."):  # what a fresh MoE run of seed 0 starts with
            assert torch.equal(got, fresh[key]), key
        elif key.startswith(f"{layer}.experts.experts."):  # expert e = run e's FFN, bit for bit
            e, name = key[len(f"{layer}.experts.experts."):].split(".", 1)
            assert torch.equal(got, (sa, sb)[int(e)][f"{layer}.{name}"]), key
        else:  # attention, norms, embeddings, stem, heads, logit scale, block 0's dense FFN
            assert torch.equal(got, (sa[key] + sb[key]) / 2), key
            differ += not torch.equal(sa[key], sb[key])
    assert differ > 20  # the runs differ (seed, data), so the mean is no copy of either
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.name == "step_000000"
    assert not [k for shard in read_shards(ckpt).values() for k in shard if "::" in k
                and not k.startswith("buffer::")]
    origin = json.loads((out / "upcycled_from.json").read_text())
    assert read_train_state(ckpt)["upcycled_from"] == origin
    assert origin == {
        "method": "btx", "config_from": str(dense_run),
        "runs": [{"run": str(r), "checkpoint": str(latest_checkpoint(r / "checkpoints")),
                  "step": 4} for r in (dense_run, branch_run)],
        "moe_layers": [layer], "experts": 2, "top_k": 2}


def test_btx_mixes_both_towers_and_averages_the_cnn_stems_statistics(synth_dir, tmp_path):
    """The mix itself, without training: three branches of other seeds, both towers' MoE
    layers, and the CNN stem's BatchNorm buffers (floats averaged; the integer batch
    counters' mean rounded down)."""
    branches = []
    for seed in range(3):
        cfg = tiny_config(synth_dir, tmp_path, **DENSE, **{"model.towers": "separate",
                                                          "model.stem": "cnn", "run.seed": seed})
        model = build_model(cfg, 128)
        with torch.no_grad():
            for b in model.buffers():
                b.copy_(torch.rand_like(b) + 0.5 if b.is_floating_point() else
                        torch.full_like(b, 10 + seed))
        branches.append(model)
    moe = build_model(upcycled_config(cfg, tmp_path / "up", experts=3), 128)
    layers = mix_into_experts(branches, moe)
    assert layers == ["towers.image.1.ffn", "towers.text.1.ffn"]
    src = [m.state_dict() for m in branches]
    counters = 0
    for key, got in moe.state_dict().items():
        layer = next((n for n in layers if key.startswith(n + ".")), None)
        if layer is None:
            want = torch.stack([s[key] for s in src])
            if got.is_floating_point():
                assert torch.equal(got, want.mean(0)), key
            else:  # (10 + 11 + 12) // 3
                counters += 1
                assert torch.equal(got, torch.full_like(got, 11)), key
        elif ".experts.experts." in key:
            e, name = key.split(".experts.experts.")[1].split(".", 1)
            assert torch.equal(got, src[int(e)][f"{layer}.{name}"]), key
    assert counters > 0


def test_btx_of_two_identical_runs_is_the_upcycled_dense_model(dense_run, batch, tmp_path):
    """BTX of a run and its copy: both experts and every mean are the run's own weights, so
    the checkpoint is `upcycle --experts 2`'s, tensor for tensor, and (renormalised top-2,
    dropless) the first forward is the dense model's."""
    twin = tmp_path / "twin"
    shutil.copytree(dense_run, twin)
    mixed, upcycled = tmp_path / "btx", tmp_path / "up"
    assert main(["upcycle", str(dense_run), str(twin), "--out", str(mixed),
                 "--set", "model.moe.dropless=true"]) == 0
    assert upcycle_cli(dense_run, upcycled, "--experts", "2",
                       "--set", "model.moe.dropless=true") == 0
    got = read_shards(latest_checkpoint(mixed / "checkpoints"))
    want = read_shards(latest_checkpoint(upcycled / "checkpoints"))
    assert sorted(got) == sorted(want)
    for file in want:
        assert sorted(got[file]) == sorted(want[file]), file
        for key in want[file]:
            assert torch.equal(got[file][key], want[file][key]), (file, key)
    dense, _, _ = load_run(dense_run)
    moe, _, _ = load_run(mixed)
    for train_mode in (False, True):
        for want, got in zip(forward(dense, batch, train_mode), forward(moe, batch, train_mode)):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_the_btx_run_trains_on_and_its_loss_falls(dense_run, branch_run, tmp_path):
    out = tmp_path / "btx"
    assert main(["upcycle", str(dense_run), str(branch_run), "--out", str(out),
                 "--set", "train.steps=6", "--set", "train.checkpoint_every=6"]) == 0
    result = train(load_config(out / "config.yaml"))
    assert len(result.losses) == 6  # resumed from the mixed step-0 checkpoint: steps 0..5
    assert sum(result.losses[-3:]) / 3 < result.losses[0], result.losses
    assert latest_checkpoint(out / "checkpoints").name == "step_000006"


def test_btx_refuses_what_it_cannot_mix_naming_it(synth_dir, dense_run, branch_run, tmp_path,
                                                   capsys):
    out = tmp_path / "btx"

    def refused(*runs: Path, args=(), to: Path = out) -> str:
        assert main(["upcycle", *map(str, runs), "--out", str(to), *args]) == 2
        return capsys.readouterr().err

    before = {r: tree_digest(r) for r in (dense_run, branch_run)}
    tok = (dense_run / "tokenizer.json").read_text()
    cfg = load_config(dense_run / "config.yaml")
    a, b = dense_run, branch_run
    assert "--experts is required with one dense run" in refused(a)
    assert "--experts 3 with 2 dense runs: BTX makes one expert of each run's FFN" in refused(
        a, b, args=("--experts", "3"))
    link = tmp_path / "link"
    link.symlink_to(a)
    assert f"dense run '{link}' is given twice (as '{a}' too)" in refused(a, b, link)
    # Another architecture (the key, both values, both runs) or another vocabulary.
    wide = write_untrained_run(tmp_path / "wide", config_from_dict(config_to_dict(cfg),
                                                                    ["model.dim=48"]), tok)
    assert (f"dense run '{wide}' has model.dim 48 but dense run '{a}' has 32: BTX averages"
            in refused(a, wide))
    topk = write_untrained_run(tmp_path / "topk", config_from_dict(
        config_to_dict(cfg), ["model.moe.top_k=1"]), tok)
    assert f"dense run '{topk}' has model.moe.top_k 1 but dense run '{a}' has 2" in refused(
        a, topk)
    relu = write_untrained_run(tmp_path / "relu", config_from_dict(
        config_to_dict(cfg), ["model.moe.activation=relu"]), tok)
    assert f"dense run '{relu}' has model.moe.activation 'relu' but dense run '{a}' has 'gelu'" in (
        refused(a, relu))
    other = Tokenizer.from_str(tok)
    other.add_tokens(["zebra"])
    words = write_untrained_run(tmp_path / "words", cfg, other.to_str())
    assert (f"dense run '{words}' has another tokenizer than dense run '{a}'"
            in refused(a, words))
    # Not a dense run with a checkpoint: missing, without checkpoint, corrupt, MoE.
    assert f"dense run '{tmp_path / 'nowhere'}' is not a directory" in refused(
        a, tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(branch_run, bad)
    for ckpt in (bad / "checkpoints").glob("step_*"):
        (ckpt / "dense.safetensors").write_bytes(b"torn")
    assert f"dense run '{bad}': no usable checkpoint in {bad / 'checkpoints'}" in refused(a, bad)
    moe = tmp_path / "moe"
    assert upcycle_cli(a, moe, "--experts", "2") == 0
    capsys.readouterr()
    assert f"dense run '{moe}' is already a MoE run" in refused(a, moe)
    # An output directory that holds anything: nothing in it, nor in the runs, is touched.
    assert f"--out {b} already holds files" in refused(a, b, to=b)
    assert {r: tree_digest(r) for r in (dense_run, branch_run)} == before
    assert not out.exists() and not list(tmp_path.glob(".tmp-upcycle-*"))
