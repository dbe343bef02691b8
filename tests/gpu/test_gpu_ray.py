"""The Ray path with expert actors on a CUDA GPU equals the in-process layer on the GPU; with
the router on the GPU too, the tokens never leave it."""
import dataclasses

import pytest
import ray
import torch

from expertpar.app.bench_moe import LayerSpec, _inputs
from expertpar.moe import MoELayer, RouteContext

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ray_gpu():
    ray.init(address="local", include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("router_gpus", [0.0, 0.2])
def test_expert_actors_on_the_gpu_match_the_in_process_layer(ray_gpu, router_gpus):
    from expertpar.distributed.actors import start_moe_actors
    from expertpar.distributed.bridge import RayBackend

    spec = LayerSpec(dim=64, hidden=128, experts=4, top_k=2, tokens=512, actors=2)
    cfg = spec.config()
    cfg = dataclasses.replace(cfg, experts=dataclasses.replace(
        cfg.experts, gpus_per_actor=0.4, router_gpus=router_gpus))
    moe = start_moe_actors(cfg)
    try:
        assert all(info["device"] == "cuda" for info in moe.infos)
        assert moe.router_device == ("cuda" if router_gpus else "cpu")
        backend = RayBackend(moe.router, device="cuda")
        layer = backend.build_layer(0, spec.dim, cfg.model.moe, 0)
        ref = MoELayer(spec.dim, cfg.model.moe, 0, seed=0).cuda()
        x, g, modality = _inputs(spec, device="cuda")
        xr, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_r, out_l = layer(xr, modality, RouteContext(0, 0)), ref(xl, modality,
                                                                    RouteContext(0, 0))
        assert out_r.y_TD.device.type == "cuda"
        torch.testing.assert_close(out_r.y_TD, out_l.y_TD, rtol=1e-4, atol=1e-5)
        assert torch.equal(out_r.stats.routed_ME, out_l.stats.routed_ME.cpu())
        (out_r.y_TD * g).sum().backward()
        (out_l.y_TD * g).sum().backward()
        torch.testing.assert_close(xr.grad, xl.grad, rtol=1e-4, atol=1e-5)
        worker = backend.links.meter.take()
        experts = ray.get(moe.router.transport.remote())
        if router_gpus:  # every byte stayed on the GPU, both hops, both directions
            assert worker["gpu_bytes"] == worker["bytes"] > 0
            assert experts["gpu_bytes"] == experts["bytes"] > 0
        else:
            assert worker["gpu_bytes"] == experts["gpu_bytes"] == 0
    finally:
        moe.shutdown()
