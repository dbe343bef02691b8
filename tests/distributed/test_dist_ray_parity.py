"""The Ray backend against the in-process reference: forward, gradients, training, resume."""
from __future__ import annotations

import threading

import pytest
import ray
import torch

from conftest import tiny_config
from expertpar.config import MoEConfig
from expertpar.data import (Batch, ImageTextDataset, encode_captions, make_transform,
                            train_tokenizer, vocab_size)
from expertpar.distributed.actors import start_moe_actors
from expertpar.distributed.bridge import RayBackend
from expertpar.distributed.calls import PeerStuck
from expertpar.distributed.runtime import RemoteOwner
from expertpar.moe import MoELayer, RouteContext
from expertpar.train.loop import dense_owner
from expertpar.train.loss import caption_loss_sum, clip_loss
from expertpar.train.names import expert_entries, gate_entries, model_entries
from expertpar.train.setup import build_model
from expertpar.train.step import SingleProcess, train_step

pytestmark = pytest.mark.slow


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def batch(synth_dir):
    ds = ImageTextDataset.load(synth_dir / "train", max_samples=64)
    tok = train_tokenizer(ds.captions, 128)
    images, caps, _ = ds.batch(list(range(32)), make_transform(32, train=False))
    ids, mask = encode_captions(tok, caps, 12)
    return tok, images, ids, mask


ROUTINGS = ["token_choice", "expert_choice"]


def routed(routing: str) -> dict:
    """Top-2 token choice (the harder case for parity), or expert choice (top_k does not apply)."""
    return {"model.moe.routing": routing, "model.moe.top_k": 2 if routing == "token_choice" else 1}


@pytest.mark.parametrize("routing,num_actors,calls,transport,objective", [
    ("token_choice", 1, "socket", "router", "contrastive"),
    ("expert_choice", 2, "socket", "router", "contrastive"),
    ("expert_choice", 4, "ray", "direct", "contrastive"),
    # CoCa: the caption decoder's MoE layer (layer 1) on the actors too, both transports
    ("token_choice", 2, "ray", "router", "both"),
    ("token_choice", 2, "socket", "direct", "both")])
def test_forward_and_every_gradient_match_in_process(ray_local, synth_dir, tmp_path, batch,
                                                     num_actors, calls, transport, routing,
                                                     objective):
    tok, images, ids, mask = batch
    cfg = tiny_config(synth_dir, tmp_path, **routed(routing), **{
        "model.objective": objective, "model.decoder_depth": 2,
        "distributed.backend": "ray", "experts.num_actors": num_actors, "experts.calls": calls,
        "experts.transport": transport,
        "experts.cpus_per_actor": 0.5, "model.moe.capacity_factor": 1.0,
        "model.moe.noise_std": 0.3, "model.moe.local_entropy_weight": 0.01,
        "model.moe.global_entropy_weight": 0.01})
    local = build_model(cfg, vocab_size(tok))
    owners_l = [dense_owner(local, cfg)]
    moe = start_moe_actors(cfg)
    try:
        backend = RayBackend(moe.router)
        # Forward and backward go the configured way, worker -> router -> every actor.
        assert backend.calls.via_socket == (calls == "socket")
        assert ray.get(moe.router.info.remote())["expert_calls"] == [calls] * num_actors
        assert backend.transport == transport
        remote = build_model(cfg, vocab_size(tok), backend)
        owners_r = [dense_owner(remote, cfg), RemoteOwner(backend, lead=True)]
        ctx = RouteContext(seed=0, step=0)
        enc_l = local.encode(images, ids, mask, ctx)
        enc_r = remote.encode(images, ids, mask, ctx)
        assert rel_err(enc_r.image_BE, enc_l.image_BE) <= 1e-5
        assert rel_err(enc_r.text_BE, enc_l.text_BE) <= 1e-5
        logits = {}
        if objective == "both":  # teacher-forced captions through the decoder's MoE layer
            for name, model, enc in (("local", local, enc_l), ("remote", remote, enc_r)):
                logits[name] = model.decode(enc.image_tokens_BND, ids[:, :-1], mask[:, :-1], ctx,
                                            enc)
            assert rel_err(logits["remote"], logits["local"]) <= 1e-5
            assert sorted(enc_l.stats) == sorted(enc_r.stats) == [0, 1]
        # A small sum of float32 terms whose order the router's threads choose: 1.8e-5
        # relative was seen once (expert choice, aux loss ~1e-3), hence 1e-4 for it alone.
        assert float(enc_r.aux_loss) == pytest.approx(float(enc_l.aux_loss), rel=1e-4)
        for L in enc_l.stats:
            assert torch.equal(enc_r.stats[L].kept_ME, enc_l.stats[L].kept_ME)

        # Backward both ways, then compare every gradient by its checkpoint name.
        for name, model, enc in (("local", local, enc_l), ("remote", remote, enc_r)):
            loss = clip_loss(enc.image_BE, enc.text_BE, model.logit_scale) + enc.aux_loss
            if logits:
                loss = loss + caption_loss_sum(logits[name], ids[:, 1:], mask[:, 1:])
            loss.backward()
        remote_grads = {**owners_r[0].grads(), **ray.get(moe.router.grads.remote())}
        # Direct: this worker called the actors; through the router: the router did.
        direct_calls = backend.calls_made["worker->expert/forward"]
        assert (direct_calls > 0) == (transport == "direct"), backend.calls_made
        checked = 0
        for slot, p in model_entries(local):
            if p.grad is None:
                continue
            assert rel_err(remote_grads[str(slot)], p.grad) <= 1e-5, slot
            checked += 1
        assert checked == sum(p.grad is not None for p in local.parameters())
        assert any(k.startswith("experts/") for k in remote_grads)
        # And a whole step (with clipping) keeps the parameters equal.
        for owner in owners_l + owners_r:
            owner.zero_grad()
        batch = Batch(1, images, ids, mask)
        for model, owners in ((local, owners_l), (remote, owners_r)):
            train_step(model, batch, RouteContext(0, 1), owners, SingleProcess(),
                       cfg.train.grad_clip, cfg.train.lr)
        want = owners_l[0].export()
        got = {**owners_r[0].export(), **owners_r[1].export()}
        for slot, _ in model_entries(local):
            assert rel_err(got[slot.file][slot.key], want[slot.file][slot.key]) <= 1e-5, slot
    finally:
        moe.shutdown()


def test_expert_with_no_tokens_does_not_block(ray_local, synth_dir, tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"distributed.backend": "ray",
                                              "experts.num_actors": 4,
                                              "experts.cpus_per_actor": 0.5})
    moe = start_moe_actors(cfg)
    try:
        backend = RayBackend(moe.router)
        layer = backend.build_layer(0, cfg.model.dim, cfg.model.moe, 0)
        owner = RemoteOwner(backend, lead=True)
        # Identical tokens all choose the same expert: the other three get nothing.
        x = torch.linspace(-1, 1, cfg.model.dim).repeat(6, 1)
        modality = torch.tensor([0, 0, 0, 1, 1, 1])
        xr = x.clone().requires_grad_(True)
        out_r = layer(xr, modality, RouteContext(0, 0))
        assert (out_r.stats.routed_ME.sum(0) == 0).sum() == 3
        (out_r.y_TD.sum() + out_r.aux_loss).backward()
        # The backward reply brought the norms: the gate and the one expert's 4 tensors.
        assert owner.grad_norms(0).shape == (5,)
        owner.step(1e-3, 1.0)
        owner.settle()
        # Same numbers as the in-process layer with the same initial weights.
        ref = MoELayer(cfg.model.dim, cfg.model.moe, 0, seed=0)
        xt = x.clone().requires_grad_(True)
        out = ref(xt, modality, RouteContext(0, 0))
        (out.y_TD.sum() + out.aux_loss).backward()
        assert rel_err(out_r.y_TD, out.y_TD) <= 1e-5
        assert rel_err(xr.grad, xt.grad) <= 1e-5
    finally:
        moe.shutdown()


def test_bfloat16_experts_on_actors_match_bfloat16_experts_in_process(ray_local, synth_dir,
                                                                       tmp_path):
    cfg = tiny_config(synth_dir, tmp_path, **{"distributed.backend": "ray",
                                              "experts.num_actors": 2,
                                              "experts.cpus_per_actor": 0.5,
                                              "model.moe.top_k": 2,
                                              "model.moe.expert_precision": "bfloat16"})
    moe = start_moe_actors(cfg)
    try:
        assert [info["precision"] for info in moe.infos] == ["bfloat16", "bfloat16"]
        layer = RayBackend(moe.router).build_layer(0, cfg.model.dim, cfg.model.moe, 0)
        ref = MoELayer(cfg.model.dim, cfg.model.moe, 0, seed=0)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(48, cfg.model.dim, generator=gen)
        g = torch.randn(48, cfg.model.dim, generator=gen)
        modality = (torch.arange(48) >= 32).long()
        xr, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_r, out_l = layer(xr, modality, RouteContext(0, 0)), ref(xl, modality,
                                                                    RouteContext(0, 0))
        # The same bf16 matmuls on the same rows: equal to float32 rounding, not bf16's.
        assert rel_err(out_r.y_TD, out_l.y_TD) <= 1e-5
        (out_r.y_TD * g).sum().backward()
        (out_l.y_TD * g).sum().backward()
        assert rel_err(xr.grad, xl.grad) <= 1e-5
        ref32 = MoELayer(cfg.model.dim, MoEConfig(**{**cfg.model.moe.__dict__,
                                                     "expert_precision": "float32"}), 0, seed=0)
        assert rel_err(out_r.y_TD, ref32(x, modality, RouteContext(0, 0)).y_TD) > 1e-5
    finally:
        moe.shutdown()


@pytest.mark.parametrize("transport", ["router", "direct"])
def test_two_routers_route_their_workers_groups_like_the_grouped_layer(ray_local, synth_dir,
                                                                       tmp_path, transport):
    cfg = tiny_config(synth_dir, tmp_path, **{
        "experts.transport": transport,
        "distributed.backend": "ray", "distributed.num_workers": 2, "experts.num_actors": 2,
        "experts.cpus_per_actor": 0.5, "experts.num_routers": 2, "model.moe.routing_groups": 2,
        "model.moe.top_k": 2, "model.moe.capacity_factor": 1.0, "model.moe.noise_std": 0.3,
        "model.moe.global_entropy_weight": 0.01})
    gen = torch.Generator().manual_seed(3)
    D = cfg.model.dim
    # Each worker: 12 image tokens, then 6 text tokens.
    xs = [torch.randn(18, D, generator=gen) for _ in range(2)]
    gs = [torch.randn(18, D, generator=gen) for _ in range(2)]
    modality = (torch.arange(18) >= 12).long()
    moe = start_moe_actors(cfg)
    try:
        assert [info["group"] for info in moe.router_infos] == [0, 1]
        backends = [RayBackend(moe.routers, rank=w, world_size=2) for w in range(2)]
        assert [b.router for b in backends] == moe.routers and [b.rank for b in backends] == [0, 0]
        owners = [RemoteOwner(b, lead=w == 0) for w, b in enumerate(backends)]
        layers = [b.build_layer(0, D, cfg.model.moe, 0) for b in backends]
        xr = [x.clone().requires_grad_(True) for x in xs]
        outs, norms = [None, None], [None, None]

        def worker(w):  # a train worker: forward, backward, its norms for the global clip
            outs[w] = layers[w](xr[w], modality, RouteContext(0, 4))
            ((outs[w].y_TD * gs[w]).sum() + outs[w].aux_loss / 2).backward()
            norms[w] = owners[w].grad_norms(4)
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(o is not None for o in outs) and all(n is not None for n in norms)
        remote_grads = ray.get(moe.router.grads.remote())
        counts = [ray.get(r.call_counts.remote()) for r in moe.routers]
        first = "worker->router/forward" if transport == "router" else "worker->router/plan"
        assert [c[first] for c in counts] == [1, 1]  # one group each
        assert counts[1]["router->router/share"] == 2  # its routing, then its gate gradients
    finally:
        moe.shutdown()
    # The in-process layer routing the same two groups (worker 0's tokens, worker 1's).
    ref = MoELayer(D, cfg.model.moe, 0, seed=0)
    order = torch.cat([torch.arange(12), 18 + torch.arange(12), 12 + torch.arange(6),
                       30 + torch.arange(6)])  # images of both, then texts, as in one batch
    x = torch.cat(xs)[order].clone().requires_grad_(True)
    group_T = (order >= 18).long()
    out = ref(x, torch.cat([modality, modality])[order], RouteContext(0, 4), group_T)
    ((out.y_TD * torch.cat(gs)[order]).sum() + out.aux_loss).backward()
    back = torch.argsort(order)
    assert rel_err(torch.cat([o.y_TD for o in outs]), out.y_TD[back]) <= 1e-5
    assert [float(o.aux_loss) for o in outs] == pytest.approx([float(out.aux_loss)] * 2, rel=1e-5)
    assert torch.equal(outs[0].stats.kept_ME, out.stats.kept_ME)
    assert rel_err(torch.cat([x_.grad for x_ in xr]), x.grad[back]) <= 1e-5
    entries = [*gate_entries(0, ref), *[e for i, ffn in enumerate(ref.experts.experts)
                                        for e in expert_entries(0, i, ffn)]]
    for slot, p in entries:  # the gate: summed over the routers; experts: over both calls
        assert rel_err(remote_grads[str(slot)], p.grad) <= 1e-5, slot
    # Both workers got the same, complete gradient norms for the global clip.
    assert torch.equal(norms[0], norms[1])
    want = torch.cat([ref.gate.w_ED.grad.norm().reshape(1),
                      *[p.grad.norm().reshape(1) for p in ref.experts.parameters()]])
    assert float(norms[0].norm()) == pytest.approx(float(want.norm()), rel=1e-5)


def test_a_skipped_step_changes_no_gate_or_expert_and_the_next_step_runs(ray_local):
    """What train_step does on a NaN or inf loss, on the Ray path: the remote owner skips,
    the router and expert actors drop the step's gradients without stepping, and the next
    step's calls do not wait for an optimizer step that never comes."""
    import math

    from expertpar.app.bench_moe import LayerSpec, _inputs, _step
    from expertpar.train.step import clip_coefficient

    spec = LayerSpec(dim=16, hidden=32, experts=4, top_k=2, tokens=64, actors=2)
    cfg = spec.config()
    moe = start_moe_actors(cfg)
    try:
        backend = RayBackend(moe.router)
        layer = backend.build_layer(0, spec.dim, cfg.model.moe, 0)
        owner = RemoteOwner(backend, lead=True)
        x_TD, g_TD, modality_T = _inputs(spec)
        _step(layer, [owner], x_TD, g_TD, modality_T, step=0)
        before = owner.export()
        out = layer(x_TD.clone().requires_grad_(True), modality_T, RouteContext(0, 1))
        ((out.y_TD * g_TD).sum() * float("nan")).backward()
        norm, _ = clip_coefficient(owner.grad_norms(1), 1.0)
        assert not math.isfinite(norm)
        owner.skip()
        after = owner.export()
        assert sorted(after) == sorted(before)
        for file in before:
            for key in before[file]:
                assert torch.equal(after[file][key], before[file][key]), (file, key)
        _step(layer, [owner], x_TD, g_TD, modality_T, step=2)  # answers: nothing waits
        stepped = owner.export()
        changed = [k for f in before for k in before[f]
                   if not torch.equal(stepped[f][k], before[f][k])]
        assert changed  # and it did step
    finally:
        moe.shutdown()


def test_the_drop_in_layer_on_expert_actors_trains_as_in_process(ray_local):
    """``SparseMoE(..., ray=RayExperts(num_actors=2))`` against the same layer in process,
    inside a user's model trained by a plain torch AdamW loop: the same outputs, auxiliary
    loss and statistics, the same losses step by step (the actors step when the optimizer
    holding the gate does, with its hyperparameters), the same state_dict, which also loads
    back into the actors (with strict=False, what is there). The MoE reads the raw input (no
    gradient), so the experts' gradients must not depend on one; the activation is not the
    default, so the actors' FFN is checked. Then what is refused: non-finite expert gradients
    (dropped, no step), another optimizer (before it steps), a call past its deadline (naming
    RayExperts' knob), and everything after close()."""
    from expertpar import RayExperts, SparseMoE

    class Net(torch.nn.Module):
        def __init__(self, ray_experts=None):
            super().__init__()
            self.moe = SparseMoE(4, 16, "silu", dim=8, top_k=2, noise_std=0.1,
                                 capacity_factor=1.0, seed=3, ray=ray_experts)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(x + self.moe(x)).mean(dim=1)

    torch.manual_seed(0)
    here = Net()
    torch.manual_seed(0)  # the layer leaves torch's generator as in process: same head
    there = Net(RayExperts(num_actors=2))
    actors = list(there.moe._experts.actors)
    try:
        assert len(list(there.parameters())) == 3  # the gate and the head; experts are there
        x, labels = torch.randn(16, 4, 8), torch.randint(0, 3, (16,))
        opts = [torch.optim.AdamW(m.parameters(), lr=0.01) for m in (here, there)]
        for step in range(3):
            losses = []
            for model, opt in zip((here, there), opts):
                loss = torch.nn.functional.cross_entropy(model(x), labels) + model.moe.aux_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7), step
            a, b = here.moe, there.moe
            assert rel_err(b.aux_loss, a.aux_loss) <= 1e-5
            assert b.stats.tokens_per_expert.tolist() == a.stats.tokens_per_expert.tolist()
            assert b.stats.drop_rate == a.stats.drop_rate > 0  # capacity 1.0 of top-2 drops
        want, got = here.state_dict(), there.state_dict()
        assert list(got) == list(want)  # the experts' weights under the in-process names
        assert max(rel_err(got[k], want[k]) for k in want) <= 1e-5
        here.eval(), there.eval()
        with torch.no_grad():
            assert rel_err(there(x), here(x)) <= 1e-5
            fresh = Net()  # new weights everywhere, loaded into the actors
            there.load_state_dict(fresh.state_dict())
            assert rel_err(there(x), fresh.eval()(x)) <= 1e-5
            # strict=False loads what is there, as torch does: expert 1 keeps its weights
            part, kept = dict(want), there.state_dict()
            gone = [k for k in part if ".experts.experts.1." in k]
            for k in gone:
                del part[k]
            assert sorted(there.load_state_dict(part, strict=False).missing_keys) == sorted(gone)
            now = there.state_dict()
            assert gone and all(torch.equal(v, kept[k] if k in gone else part[k])
                                for k, v in now.items())
        # Non-finite expert gradients (those of a step a GradScaler skipped add to the next)
        # are dropped without a step; the next step steps.
        (there(x).sum() * float("nan")).backward()
        with pytest.warns(RuntimeWarning, match="not finite"):
            assert not there.moe.step_experts(0.01)
        assert all(torch.equal(v, now[k]) for k, v in there.state_dict().items())
        there(x).sum().backward()
        assert there.moe.step_experts(0.01)
        assert any(not torch.equal(v, now[k]) for k, v in there.state_dict().items()
                   if ".experts." in k)
        gate = there.moe.layer.gate.w_ED.detach().clone()
        sgd = torch.optim.SGD(there.parameters(), lr=0.1)
        with pytest.raises(TypeError, match="SGD"):
            sgd.step()  # the experts would be trained by another rule: refused, named,
        assert torch.equal(there.moe.layer.gate.w_ED, gate)  # before anything stepped
        there.moe._experts.timeout_s = 1e-6  # a call that misses its deadline names the knob
        with pytest.raises(PeerStuck, match=r"RayExperts\(call_timeout_s=...\)"):
            there.moe.zero_grad_experts()
    finally:
        there.moe.close()
    with pytest.raises(ray.exceptions.RayActorError):  # the actors are gone
        ray.get(actors[0].info.remote(), timeout=30)
    for stopped in (lambda: there(x), there.state_dict, lambda: there.load_state_dict(want),
                    lambda: there.moe.step_experts(0.01), there.moe.zero_grad_experts):
        with pytest.raises(RuntimeError, match="stopped by close"):
            stopped()
