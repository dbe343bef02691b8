"""The expert-compute alternatives `expertpar bench` measures: the batched variant computes
what the product's loop computes (so its timing compares like with like), and the measure
reports one actor's share on the threads asked for."""
from __future__ import annotations

import torch

from expertpar.app.bench_moe import LayerSpec, batched_ffn, expert_compute_means
from expertpar.moe.experts import FFN


def test_batched_experts_equal_the_loop_outputs_and_gradients():
    torch.manual_seed(0)
    ffns = [FFN(8, 16) for _ in range(3)]
    xs = [torch.randn(n, 8) for n in (5, 1, 3)]  # uneven rows: padding must not leak
    loop_in = [x.clone().requires_grad_(True) for x in xs]
    batch_in = [x.clone().requires_grad_(True) for x in xs]
    loop_out = [f(x) for f, x in zip(ffns, loop_in)]
    batch_out = batched_ffn(ffns, batch_in)
    for a, b in zip(loop_out, batch_out):
        torch.testing.assert_close(a, b)
    g = [torch.randn_like(y) for y in loop_out]
    torch.autograd.backward(loop_out, g)
    loop_grads = [p.grad.clone() for f in ffns for p in f.parameters()]
    for f in ffns:
        f.zero_grad()
    torch.autograd.backward(batch_out, g)
    for a, b in zip(loop_grads, [p.grad for f in ffns for p in f.parameters()]):
        torch.testing.assert_close(a, b)
    for a, b in zip(loop_in, batch_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_means_time_one_actors_experts_on_the_threads_asked_for():
    before = torch.get_num_threads()
    spec = LayerSpec(dim=16, hidden=32, experts=4, top_k=2, tokens=64, actors=2)
    m = expert_compute_means(spec, threads=1, repeats=2)
    assert m["threads"] == 1 and torch.get_num_threads() == before
    # 2 experts per actor, 64 * 2 / 4 = 32 rows each on average, ±10%.
    assert m["rows_per_expert"] == [28, 35]
    assert all(m[k] > 0 for k in ("loop_s", "batched_s", "backward_s", "input_grad_first_s"))
