"""Where a profiled training step spends the GPU's time, from the profiler's Chrome trace.

    python bench/kernels.py RUN_DIR/*.pt.trace.json[.gz] [--md kernels.md] [--json kernels.json]

Sums the device kernels (and copies) of the profiled steps by kind - attention, convolution,
matmul, inductor's fused kernels, torch's own elementwise kernels, the optimiser, layout
changes, copies - per step, and how long the GPU sat idle between them: a step whose kernels
take less time than the step itself is waiting on the CPU (launches, Python, data). Torch's
own elementwise kernels in a compiled step ran outside inductor's fused code: for those, the
operators that launched them (innermost first) say where they come from.
`+profile` rows of `bench/throughput.py` write this beside their numbers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

# first match wins: the cuDNN convolution kernels are "implicit_gemm", so before matmul
KINDS = [
    ("attention", r"sdpa|flash|fmha|attention"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("layout change", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|triton_tem"),
    ("inductor, reductions (norms)", r"^triton_(red|per)_"),
    ("inductor, pointwise", r"^triton_"),
    ("optimiser", r"multi_tensor|adam|Adam"),
    ("norm (eager)", r"group_norm|GroupNorm|layer_norm|LayerNorm|welford|Welford"),
    ("elementwise (eager)", r"elementwise|vectorized|reduce_kernel|at::native"),
    ("copy, memset", r"^Memcpy|^Memset|memcpy|memset"),
]
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def kind_of(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name)), "other")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def union_us(spans: list[tuple[float, float]]) -> float:
    """Time covered by at least one span (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def launchers(events: list[dict]) -> dict[int, str]:
    """The operators (innermost first) around each kernel launch, by correlation id: a sweep
    over each thread's nested operator spans."""
    marks = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime")]
    marks.sort(key=lambda e: (e["tid"], float(e["ts"]), -float(e.get("dur", 0))))
    out: dict[int, str] = {}
    stack: list[dict] = []
    for e in marks:
        while stack and (
            stack[-1]["tid"] != e["tid"]
            or float(stack[-1]["ts"]) + float(stack[-1]["dur"]) < float(e["ts"])
        ):
            stack.pop()
        if e["cat"] == "cpu_op":
            stack.append(e)
        elif "correlation" in e.get("args", {}):
            out[e["args"]["correlation"]] = " < ".join(o["name"] for o in stack[::-1][:4])
    return out


def summarize(events: list[dict]) -> dict:
    # a CUDA trace marks each step twice, on the CPU's timeline and on the GPU's
    steps = len({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})
    kernels = [e for e in events if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"]
    if not kernels or not steps:
        raise ValueError("no device kernels or no ProfilerStep# in this trace (a CPU run?)")
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
    span = max(b for _, b in spans) - min(a for a, _ in spans)
    busy = union_us(spans)
    called_by = launchers(events)
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    eager: dict[str, float] = {}  # torch's own elementwise kernels, by launching operators
    for e in kernels:
        kind, dur = kind_of(e["name"]), float(e["dur"])
        by_kind[kind] = by_kind.get(kind, 0.0) + dur
        n = by_name.setdefault(e["name"], [0.0, 0])
        n[0] += dur
        n[1] += 1
        if kind == "elementwise (eager)":
            who = called_by.get(e.get("args", {}).get("correlation"), "?")
            eager[who] = eager.get(who, 0.0) + dur
    ms = 1e-3 / steps  # us over all steps -> ms per step
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "steps": steps,
        "step_ms": span * ms,  # first kernel to last kernel, per step
        "busy_ms": busy * ms,
        "idle_ms": (span - busy) * ms,
        "kernels_per_step": len(kernels) / steps,
        "kinds_ms": {k: v * ms for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": k, "ms": v[0] * ms, "calls": v[1] / steps} for k, v in top],
        "eager_elementwise_by_operator_ms": {
            k: v * ms for k, v in sorted(eager.items(), key=lambda kv: -kv[1])[:8]
        },
    }


def markdown(s: dict) -> str:
    lines = [
        f"{s['steps']} profiled steps; per step: {s['step_ms']:.1f} ms from the first kernel to "
        f"the last, the GPU busy {s['busy_ms']:.1f} ms and idle {s['idle_ms']:.1f} ms, "
        f"{s['kernels_per_step']:.0f} kernels.",
        "",
        "| kernels | ms per step | share of busy |",
        "|---|---|---|",
    ]
    for kind, v in s["kinds_ms"].items():
        lines.append(f"| {kind} | {v:.1f} | {v / s['busy_ms']:.0%} |")
    lines += ["", "| top kernels | ms per step | calls per step |", "|---|---|---|"]
    for t in s["top"]:
        lines.append(f"| `{t['name'][:90]}` | {t['ms']:.2f} | {t['calls']:.0f} |")
    lines += ["", "| eager elementwise kernels, launched in | ms per step |", "|---|---|"]
    for who, v in s["eager_elementwise_by_operator_ms"].items():
        lines.append(f"| `{who}` | {v:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace", type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    try:
        s = summarize(load(args.trace))
    except ValueError as e:
        raise SystemExit(f"{args.trace}: {e}") from None
    text = markdown(s)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
