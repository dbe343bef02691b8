"""The drop-in SparseMoE in process: the README's example as written, shapes, refused
arguments, the activation, the auxiliary loss and statistics by hand, state_dict, and an
``import expertpar`` that stays light. (On expert actors: tests/distributed/
test_dist_ray_parity.py.)"""
from __future__ import annotations

import dataclasses
import inspect
import io
import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from expertpar import MoEStats, RayExperts, SparseMoE
from expertpar.config import MoEConfig
from expertpar.sparse_moe import FIELD_OF, adamw_hyperparameters

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine two torch threads
    spin against each other (100x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def readme_example() -> str:
    section = README.read_text().split("\n## Drop-in SparseMoE\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```\n", 1)[0]


def test_the_readme_example_runs_as_written_and_trains(tmp_path, capsys):
    code = readme_example()
    assert "from expertpar import SparseMoE" in code and "aux_loss" in code
    (tmp_path / "example.py").write_text(code)
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert len(losses) == 4, losses
    # XOR of the signs: from chance (ln 2 = 0.69) to nearly solved.
    assert losses[0] > 0.5 and losses[-1] < 0.1 and losses == sorted(losses, reverse=True)


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8), (2, 1, 3, 8), (8,), (0, 8)])
def test_any_leading_shape_in_the_same_shape_out_token_by_token(shape):
    moe = SparseMoE(4, 16, dim=8, top_k=2, dropless=True, seed=0).eval()
    x = torch.randn(shape)
    y = moe(x)
    assert y.shape == x.shape
    # Dropless and in evaluation, each token's output depends on that token alone: the
    # same rows flattened give the same outputs.
    assert torch.allclose(y.reshape(-1, 8), moe(x.reshape(-1, 8)), atol=1e-6)
    assert moe.stats.tokens == x.numel() // 8


def test_an_input_of_the_wrong_width_is_refused_naming_dim():
    with pytest.raises(ValueError, match=r"shape \(4, 7\).*dim=8"):
        SparseMoE(4, 16, dim=8)(torch.randn(4, 7))


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 5}, "top_k=5 must be <= num_experts (4)"),
    ({"activation": "tanh"}, "activation='tanh' is not one of ['gelu', 'relu', 'silu']"),
    ({"expert_size": 0}, "expert_size=0 must be >= 1"),
    ({"capacity_factor": 0}, "capacity_factor=0 must be > 0 unless dropless is true"),
    ({"temperature": -1.0}, "temperature=-1.0 must be > 0"),
    ({"top_k": "2"}, "top_k='2' is not an integer"),
    ({"dropless": 1}, "dropless=1 is not True or False"),
    ({"routing": "expert_choice", "top_k": 2}, "top_k=2 must be 1 with routing 'expert_choice'"),
    ({"load_balance_weight": -0.1}, "load_balance_weight=-0.1 must be >= 0"),
    ({"dim": 0}, "dim=0 must be a positive integer"),
    ({"seed": -1}, "seed=-1 must be an integer in [0, 2**32)"),
    ({"ray": RayExperts(num_actors=5)}, "ray=RayExperts(num_actors=5) must be between 1 and "
                                        "num_experts (4)"),
    ({"ray": RayExperts(calls="grpc")}, "ray=RayExperts(calls='grpc') must be 'socket' or"),
    ({"ray": 2}, "ray=2 must be a RayExperts(...) or None"),
])
def test_bad_arguments_are_refused_naming_the_argument_and_value(kwargs, message):
    args = {"num_experts": 4, "expert_size": 16, "dim": 8, **kwargs}
    with pytest.raises(ValueError) as err:
        SparseMoE(**args)
    assert message in str(err.value)


def test_dim_is_required():
    with pytest.raises(TypeError, match="dim"):
        SparseMoE(4, 16)  # noqa


@pytest.mark.parametrize("activation, fn", [("gelu", F.gelu), ("relu", F.relu),
                                            ("silu", F.silu)])
def test_the_activation_is_the_experts_nonlinearity(activation, fn):
    # One expert, top-1: its gate probability is softmax over one logit = 1, so the layer is
    # that expert's FFN: fc2(act(fc1 x)).
    moe = SparseMoE(1, 16, activation, dim=8, dropless=True, seed=1)
    ffn = moe.layer.experts.experts[0]
    with torch.no_grad():  # weights far from the 0.02 init, so the nonlinearities differ
        for p in ffn.parameters():
            p.normal_()
    x = torch.randn(5, 8)
    expected = ffn.fc2(fn(ffn.fc1(x)))
    assert torch.allclose(moe(x), expected, atol=1e-6)
    others = [g for g in (F.gelu, F.relu, F.silu) if g is not fn]
    assert all(not torch.allclose(moe(x), ffn.fc2(g(ffn.fc1(x))), atol=1e-3) for g in others)


def test_aux_loss_and_statistics_by_hand():
    # 8 tokens, 2 experts, top-1. The gate sends x[0] > 0 to expert 0 and x[0] < 0 to expert
    # 1 with logits (+1, -1) or (-1, +1): p = softmax(1, -1) = (0.8808, 0.1192) for its
    # choice. Capacity ceil(0.5 * 8 * 1 / 2) = 2 per expert: 4 of 8 kept, drop rate 1/2.
    moe = SparseMoE(2, 4, dim=3, capacity_factor=0.5, seed=0)
    with torch.no_grad():
        moe.layer.gate.w_ED.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
    x = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]).repeat(4, 1)  # 4 tokens each way
    moe(x)
    stats = moe.stats
    assert isinstance(stats, MoEStats)
    assert stats.tokens == 8 and stats.tokens_per_expert.tolist() == [2.0, 2.0]
    assert stats.load.tolist() == [0.5, 0.5] and stats.drop_rate == 0.5
    p = 1 / (1 + math.exp(-2))  # 0.8808
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))  # 0.3625 nats
    assert stats.router_entropy == pytest.approx(entropy, rel=1e-5)
    # Load balance E * sum_e f_e P_e: f = (1/2, 1/2), P = (1/2, 1/2) -> 1.
    # z-loss: logsumexp(1, -1)^2 = (1 + ln(1 + e^-2))^2 for every token.
    z = (1 + math.log(1 + math.exp(-2))) ** 2
    assert set(moe.aux) == {"load_balance", "z_loss", "local_entropy", "global_entropy"}
    assert float(moe.aux["load_balance"]) == pytest.approx(1.0, rel=1e-6)
    assert float(moe.aux["z_loss"]) == pytest.approx(z, rel=1e-6)
    assert float(moe.aux["local_entropy"]) == pytest.approx(entropy, rel=1e-5)
    # Global: minus the entropy of the mean gate probabilities, (1/2, 1/2): -ln 2.
    assert float(moe.aux["global_entropy"]) == pytest.approx(-math.log(2), rel=1e-5)
    # The default weights: 0.01 load balance, 0.001 z-loss, 0.05 local and 0.10 global.
    assert moe.aux_loss.item() == pytest.approx(
        0.01 * 1.0 + 0.001 * z + 0.05 * entropy - 0.10 * math.log(2), rel=1e-5)


def test_the_aux_loss_is_differentiable_and_every_parameter_trains():
    moe = SparseMoE(4, 16, dim=8, top_k=2, seed=0)
    # The optimizer sees the gate and every expert from construction: 4 x (8*16 + 16 +
    # 16*8 + 8) expert parameters and the 4 x 8 gate.
    assert sum(p.numel() for p in moe.parameters()) == 4 * 280 + 32
    y = moe(torch.randn(2, 5, 8))
    assert moe.aux_loss.requires_grad and moe.aux_loss.ndim == 0
    assert not any(v.requires_grad for v in moe.aux.values())
    moe.aux_loss.backward(retain_graph=True)
    assert moe.layer.gate.w_ED.grad.abs().sum() > 0  # the aux loss reaches the gate
    y.sum().backward()
    assert all(p.grad is not None for p in moe.parameters())


def test_state_dict_round_trip():
    a = SparseMoE(4, 16, "silu", dim=8, top_k=2, seed=0)
    opt = torch.optim.AdamW(a.parameters(), lr=0.1)
    (a(torch.randn(16, 8)).square().mean() + a.aux_loss).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = SparseMoE(4, 16, "silu", dim=8, top_k=2, seed=1)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(16, 8)
    assert torch.equal(a.eval()(x), b.eval()(x))
    assert list(a.state_dict()) == list(b.state_dict()) == [
        "layer.gate.w_ED", *[f"layer.experts.experts.{e}.{n}" for e in range(4)
                             for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]]


def test_seed_none_follows_torchs_global_generator():
    torch.manual_seed(5)
    a = SparseMoE(4, 16, dim=8)
    torch.manual_seed(5)
    b = SparseMoE(4, 16, dim=8)
    c = SparseMoE(4, 16, dim=8)
    assert a.seed == b.seed != c.seed
    assert torch.equal(a.layer.gate.w_ED, b.layer.gate.w_ED)


def test_the_experts_take_adamw_hyperparameters_and_refuse_other_optimizers():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=0.003, betas=(0.8, 0.9), weight_decay=0.1)
    assert adamw_hyperparameters(opt, opt.param_groups[0]) == {
        "lr": 0.003, "betas": (0.8, 0.9), "eps": 1e-8, "weight_decay": 0.1}
    adam = torch.optim.Adam([w], lr=0.003)
    assert adamw_hyperparameters(adam, adam.param_groups[0])["weight_decay"] == 0.0
    for bad in (torch.optim.SGD([w], lr=0.1), torch.optim.Adam([w], weight_decay=0.1),
                torch.optim.AdamW([w], amsgrad=True)):
        with pytest.raises(TypeError, match=type(bad).__name__):
            adamw_hyperparameters(bad, bad.param_groups[0])
    with pytest.raises(RuntimeError, match="ordinary parameters"):
        SparseMoE(2, 4, dim=3).step_experts(0.1)


# model.moe keys that are no argument: the layer is one MoE layer (every), routes its batch as
# one group (routing_groups), and has no image tokens to prioritise (batch_prioritized_images).
NOT_ARGUMENTS = {"every", "routing_groups", "batch_prioritized_images"}


def test_the_defaults_are_model_moes():
    params = inspect.signature(SparseMoE).parameters
    args = {FIELD_OF.get(name, name): p for name, p in params.items()
            if name not in ("dim", "seed", "ray")}
    fields = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    assert sorted(args) == sorted(fields.keys() - NOT_ARGUMENTS)
    assert not NOT_ARGUMENTS & args.keys()
    differ = {key: (p.default, fields[key]) for key, p in args.items()
              if p.default is not p.empty and p.default != fields[key]}
    assert not differ, differ  # argument: (its default, model.moe's)
    # the required ones (num_experts, expert_size, dim) are the only ones without a default
    assert [n for n, p in params.items() if p.default is p.empty] == [
        "num_experts", "expert_size", "dim"]


def test_import_expertpar_stays_light():
    code = ("import sys, expertpar; heavy = {'torch', 'ray'} & set(sys.modules); "
            "assert not heavy, heavy; assert 'SparseMoE' in dir(expertpar)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
