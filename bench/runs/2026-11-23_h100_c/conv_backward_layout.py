"""Layout copies inside cuDNN's convolution backward under torch.compile, on a UNet-like stack
(GroupNorm, SiLU, 3x3 and 1x1 convolutions, channels_last, frozen bf16 weights, a trainable
Linear in between, autocast): the step time, the convolution backwards per step, and the
time of torch's own copy kernels (inside them: inductor's fused code has none). The second
measurement adds inductor's layout constraint to the traced strides for convolution_backward
(torch 2.11 already registers it: same result).

The script as it ran on the H100 of the third lease (twice: the second time with inductor's
FX graph cache off, so that the second measurement compiled afresh); its output is
conv_backward_layout.log beside it.

    python bench/runs/2026-11-23_h100_c/conv_backward_layout.py
"""

import time

import torch
import torch._inductor.kernel.conv as kconv
import torch._inductor.lowering as low
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

print(
    "torch",
    torch.__version__,
    "has constrain_conv_bwd_to_fx_strides:",
    hasattr(kconv, "constrain_conv_bwd_to_fx_strides"),
    "conv bwd constraint registered:",
    torch.ops.aten.convolution_backward.default in getattr(low, "_maybe_layout_constraints", {})
    or torch.ops.aten.convolution_backward in getattr(low, "_maybe_layout_constraints", {}),
    flush=True,
)


class Block(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.n1, s.c1 = nn.GroupNorm(32, c), nn.Conv2d(c, c, 3, padding=1)
        s.n2, s.c2 = nn.GroupNorm(32, c), nn.Conv2d(c, c, 3, padding=1)
        s.p = nn.Conv2d(c, c, 1)
        s.lin = nn.Linear(c, c)  # the trainable part, between frozen convs

    def forward(s, x):
        h = s.c1(F.silu(s.n1(x)))
        h = s.p(h)
        b, c, hh, ww = h.shape
        t = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        h = h + s.lin(t).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        return x + s.c2(F.silu(s.n2(h)))


def build():
    torch.manual_seed(0)
    m = nn.Sequential(*[Block(320) for _ in range(4)]).cuda()
    for n, p in m.named_parameters():
        if "lin" not in n:
            p.requires_grad_(False)
            p.data = p.data.to(torch.bfloat16)
    return m.to(memory_format=torch.channels_last)


x = torch.randn(32, 320, 64, 64, device="cuda").to(memory_format=torch.channels_last)


def run(m, n):
    for _ in range(n):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()


def measure(tag):
    m = build()
    m.compile()
    t0 = time.time()
    run(m, 3)
    torch.cuda.synchronize()
    comp = time.time() - t0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    run(m, 20)
    b.record()
    torch.cuda.synchronize()
    step = a.elapsed_time(b) / 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(m, 3)
        torch.cuda.synchronize()
    ev = {e.key: e for e in prof.key_averages()}

    def n(k):
        return ev[k].count // 3 if k in ev else 0

    copy_us = (
        sum(
            e.device_time_total
            for e in prof.key_averages()
            if "elementwise_kernel" in e.key or "copy_kernel" in e.key
        )
        / 3
    )
    print(
        f"{tag}: step {step:.2f} ms (compile+3 {comp:.0f} s); per step: "
        f"convolution_backward {n('aten::convolution_backward')}, "
        f"contiguous {n('aten::contiguous')}, _to_copy {n('aten::_to_copy')}, "
        f"copy_ {n('aten::copy_')}, eager copy kernels {copy_us / 1000:.2f} ms",
        flush=True,
    )
    return [p.grad.float().clone() for p in m.parameters() if p.requires_grad]


if not hasattr(low, "add_layout_constraint") or not hasattr(low, "constrain_to_fx_strides"):
    print("no add_layout_constraint/constrain_to_fx_strides here")
g0 = measure("as is")
torch._dynamo.reset()
low.add_layout_constraint(torch.ops.aten.convolution_backward, low.constrain_to_fx_strides)
g1 = measure("conv bwd constrained to traced strides")
print(
    "same grads:",
    all(torch.allclose(a, b, rtol=1e-2, atol=1e-4) for a, b in zip(g0, g1, strict=True)),
    max(float((a - b).abs().max()) for a, b in zip(g0, g1, strict=True)),
)
