"""bench/kernels.py: the GPU time of profiled steps, by kernel kind, from a Chrome trace."""

import gzip
import json

import kernels
import pytest


def event(name: str, ts: float, dur: float, cat: str, corr: int = 0, **more) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **more,
            "args": {"correlation": corr}}  # fmt: skip


def kernel(name: str, ts: float, dur: float, cat: str = "kernel", corr: int = 0) -> dict:
    return event(name, ts, dur, cat, corr)


def cpu(name: str, ts: float, dur: float, cat: str = "cpu_op", corr: int = 0) -> dict:
    return event(name, ts, dur, cat, corr, tid=1)


def trace() -> list[dict]:
    # two steps; the attention kernel overlaps the copy on another stream; 20 us idle
    return [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#60", "ts": 0, "dur": 200},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#61", "ts": 200, "dur": 200},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#61", "ts": 210, "dur": 190},
        cpu("aten::convolution_backward", 10, 30),
        cpu("aten::contiguous", 12, 10),
        cpu("aten::copy_", 13, 5),
        cpu("cudaLaunchKernel", 14, 1, cat="cuda_runtime", corr=9),
        cpu("cudaLaunchKernel", 25, 1, cat="cuda_runtime", corr=8),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", 0, 100),
        kernel("Memcpy DtoD (Device -> Device)", 50, 100, cat="gpu_memcpy"),
        kernel("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 170, 60),
        kernel("triton_red_fused_native_group_norm_0", 230, 40),
        kernel("triton_poi_fused_add_silu_1", 270, 30),
        kernel("nvjet_tst_128x64_64x4_1x2_h_bz_coopB_TNT", 300, 40),
        kernel("void at::native::vectorized_elementwise_kernel<4>", 340, 20, corr=9),
    ]


def test_kernels_are_summed_by_kind_per_step_with_the_gpu_idle_time(tmp_path):
    path = tmp_path / "run.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": trace()}, f)
    s = kernels.summarize(kernels.load(path))
    assert s["steps"] == 2 and s["kernels_per_step"] == 3.5
    assert s["step_ms"] == pytest.approx(0.180)  # 360 us from first kernel start to last end
    assert s["busy_ms"] == pytest.approx(0.170)  # overlapping kernels count once
    assert s["idle_ms"] == pytest.approx(0.010)  # 150..170 us
    assert s["kinds_ms"] == pytest.approx(
        {
            "attention": 0.05,
            "copy, memset": 0.05,
            "convolution": 0.03,  # cuDNN's implicit GEMM is a convolution, not a matmul
            "inductor, reductions (norms)": 0.02,
            "inductor, pointwise": 0.015,
            "matmul": 0.02,
            "elementwise (eager)": 0.01,
        }
    )
    assert s["top"][0]["name"].startswith("cudnn_generated") and s["top"][0]["calls"] == 0.5
    assert "| attention | 0.1 | 29% |" in kernels.markdown(s)
    # the copy ran inside a convolution's backward: innermost operator first
    assert s["eager_elementwise_by_operator_ms"] == pytest.approx(
        {"aten::copy_ < aten::contiguous < aten::convolution_backward": 0.01}
    )


def test_a_trace_without_device_kernels_is_refused(tmp_path):
    path = tmp_path / "cpu.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": trace()[:7]}))
    with pytest.raises(ValueError, match="no device kernels"):
        kernels.summarize(kernels.load(path))
