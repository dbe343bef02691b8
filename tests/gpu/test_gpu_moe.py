"""GPU checks: skipped (with the reason) where CUDA is absent."""
import pytest
import torch

from expertpar.config import MoEConfig
from expertpar.moe import MoELayer, RouteContext

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_moe_layer_on_cuda_matches_cpu():
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=128, capacity_factor=1.0)
    cpu = MoELayer(64, cfg, 0, seed=3)
    gpu = MoELayer(64, cfg, 0, seed=3).cuda()
    x = torch.randn(512, 64)
    modality = (torch.arange(512) >= 384).long()
    out_c = cpu(x, modality, RouteContext(0, 0))
    out_g = gpu(x.cuda(), modality.cuda(), RouteContext(0, 0))
    torch.testing.assert_close(out_g.y_TD.cpu(), out_c.y_TD, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_g.aux_loss.cpu(), out_c.aux_loss, rtol=1e-4, atol=1e-6)
