"""`expertpar gpu-check`'s parts that run anywhere: the peak table, the FFN throughput
measure, and the refusal without CUDA."""
from __future__ import annotations

import pytest
import torch

from expertpar.app.bench_moe import ffn_tflops
from expertpar.app.gpu_check import peak_bf16, run_gpu_check


def test_peaks_are_found_by_the_cuda_device_name():
    assert peak_bf16("NVIDIA H200") == 989.4
    assert peak_bf16("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16("Some Future GPU") is None


def test_ffn_throughput_is_flops_over_median_time():
    tflops = ffn_tflops(64, 128, 256, dtype=None, repeats=3)
    assert 0 < tflops < 100  # fp32 on a CPU: far below a GPU's peak, above nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run_gpu_check(tmp_path / "out")
    assert not (tmp_path / "out").exists()
