"""Which SDPA kernel to try first (`perf.attention`): SD1.5's attention shapes at 512 px,
forward + backward, timed per kernel on this GPU and checked against an fp32 reference.

    python bench/attention.py [--batch 32] [--out attention.json] [--choice FILE]

SD1.5 has 8 heads everywhere, so the head dim grows with the channels (40, 80, 160) while the
tokens shrink (64x64 latents: 4096, 1024, 256, 64); each transformer block has a self-attention
and a cross-attention over 77 text tokens. A kernel that cannot take a shape (cuDNN: head dim
> 128) falls through to torch's order, as `perf.attention` does in training. "default" is
what torch picks by itself (`perf.attention=null`), measured, not assumed: on Hopper torch
tries cuDNN first while its nominal order says flash (seen in training profiles, torch 2.11).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdft.perf import ATTENTION_BACKENDS as KERNELS
from sdft.perf import TORCH_ORDER

# the kernels in the order torch tries them, after the one `perf.attention` puts first
FALLBACK = [name for b in TORCH_ORDER for name, k in KERNELS.items() if k == b]
# (query tokens, key tokens, head dim, blocks of SD1.5's UNet with this shape)
SHAPES = [
    (4096, 4096, 40, 5), (4096, 77, 40, 5),
    (1024, 1024, 80, 5), (1024, 77, 80, 5),
    (256, 256, 160, 5), (256, 77, 160, 5),
    (64, 64, 160, 1), (64, 77, 160, 1),
]  # fmt: skip
HEADS = 8


def inputs(batch: int, lq: int, lk: int, d: int, seed: int) -> list[torch.Tensor]:
    """q, k, v laid out as diffusers' attention processor makes them: (B, L, H*d) projections
    viewed as (B, H, L, d), not contiguous."""
    g = torch.Generator("cuda").manual_seed(seed)
    out = []
    for n in (lq, lk, lk):
        x = torch.randn(batch, n, HEADS * d, device="cuda", generator=g, dtype=torch.bfloat16)
        out.append(x.view(batch, n, HEADS, d).transpose(1, 2).requires_grad_())
    return out


def step(q, k, v, grad) -> list[torch.Tensor]:
    out = F.scaled_dot_product_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return [out, dq, dk, dv]


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    pairs = [(g.detach().float(), r.detach()) for g, r in zip(got, ref, strict=True)]
    return max(float((g - r).norm() / r.norm()) for g, r in pairs)


def measure(batch: int) -> list[dict]:
    rows = []
    for i, (lq, lk, d, count) in enumerate(SHAPES):
        q, k, v = inputs(batch, lq, lk, d, seed=i)
        grad = torch.randn_like(q.detach())
        # reference: fp32 math on the first two samples
        small = [t.detach()[:2].float().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel(SDPBackend.MATH):
            ref = [t[:2] for t in step(*small, grad[:2].float())]
        row = {"lq": lq, "lk": lk, "head_dim": d, "count": count}
        for name, kernel in [("default", None), *KERNELS.items()]:
            try:
                with sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
                    got = step(q, k, v, grad)
                    row[f"{name}_err"] = rel_err([t[:2] for t in got], ref)
                    row[f"{name}_ms"] = time_ms(lambda: step(q, k, v, grad))  # noqa: B023
            except RuntimeError as e:  # this kernel cannot take the shape
                row[f"{name}_ms"], row[f"{name}_err"] = None, str(e).splitlines()[0][:80]
        rows.append(row)
        print(row, flush=True)
    return rows


def unet_ms(rows: list[dict], first: str | None) -> float:
    """Attention time of one UNet forward + backward with `first` tried first."""
    if first is None:
        return sum(r["count"] * r["default_ms"] for r in rows)
    total = 0.0
    for r in rows:
        order = [first, *FALLBACK]
        ok = [k for k in order if isinstance(r[f"{k}_ms"], float) and r[f"{k}_err"] < 2e-2]
        total += r["count"] * r[f"{ok[0]}_ms"]
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="attention.json")
    p.add_argument("--choice", help="write the fastest `perf.attention` value here")
    args = p.parse_args()
    rows = measure(args.batch)
    totals = {str(k): unet_ms(rows, k) for k in [None, *KERNELS]}
    best = min(totals, key=totals.get)
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch}, torch {torch.__version__}")
    names = ["default", *KERNELS]
    head = ["q tokens", "k tokens", "head dim", "x"] + [f"{k} ms (rel err)" for k in names]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in rows:
        cells = [str(r[k]) for k in ("lq", "lk", "head_dim", "count")] + [
            f"{r[k + '_ms']:.2f} ({r[k + '_err']:.0e})" if r[k + "_ms"] else "n/a" for k in names
        ]
        print("| " + " | ".join(cells) + " |")
    ms = {k: round(v, 1) for k, v in totals.items()}
    print(f"UNet attention fwd+bwd, ms, by the kernel tried first: {ms}; best: {best}")
    Path(args.out).write_text(json.dumps({"rows": rows, "unet_ms": totals, "best": best}, indent=1))
    if args.choice:
        Path(args.choice).write_text("null" if best == "None" else best)


if __name__ == "__main__":
    main()
