"""The Ray path with expert actors on a CUDA GPU equals the in-process layer on the GPU."""
import dataclasses

import pytest
import torch

from expertpar.app.bench_moe import LayerSpec, _inputs
from expertpar.moe import MoELayer, RouteContext

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_expert_actors_on_the_gpu_match_the_in_process_layer():
    import ray

    from expertpar.distributed.actors import start_moe_actors
    from expertpar.distributed.bridge import RayBackend

    spec = LayerSpec(dim=64, hidden=128, experts=4, top_k=2, tokens=512, actors=2)
    cfg = spec.config()
    cfg = dataclasses.replace(cfg, experts=dataclasses.replace(cfg.experts, gpus_per_actor=0.5))
    ray.init(address="local", include_dashboard=False)
    try:
        moe = start_moe_actors(cfg)
        try:
            assert all(info["device"] == "cuda" for info in moe.infos)
            layer = RayBackend(moe.router).build_layer(0, spec.dim, cfg.model.moe, 0)
            ref = MoELayer(spec.dim, cfg.model.moe, 0, seed=0).cuda()
            x, g, modality = _inputs(spec, device="cuda")
            xr, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            out_r, out_l = layer(xr, modality, RouteContext(0, 0)), ref(xl, modality,
                                                                        RouteContext(0, 0))
            assert out_r.y_TD.device.type == "cuda"
            torch.testing.assert_close(out_r.y_TD, out_l.y_TD, rtol=1e-4, atol=1e-5)
            (out_r.y_TD * g).sum().backward()
            (out_l.y_TD * g).sum().backward()
            torch.testing.assert_close(xr.grad, xl.grad, rtol=1e-4, atol=1e-5)
        finally:
            moe.shutdown()
    finally:
        ray.shutdown()
