"""Training throughput of sdft against the diffusers LoRA example, on one GPU, in one run.

    python bench/throughput.py run --out $OUT [--variants plain,fast] [--peer-steps 60]
    python bench/throughput.py report $OUT/throughput.json   # appends the table to RESULTS.md

Same data (the scribble split's drawings, rendered once to 512 px PNGs for the peer's
imagefolder), same base architecture (SD1.5 shapes, random weights: same FLOPs), same
resolution, bf16, LoRA rank 4, effective batch 32. Each variant of sdft is a real
`train.py` run; samples/s is steady state (warm-up and compilation excluded).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kernels  # bench/kernels.py, beside this file
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
FLOP_PER_SAMPLE = 1.78e12  # SD1.5 UNet forward + backward with LoRA at 512 px
PEAK_FLOPS = 800e12  # achievable dense bf16 on an H100
DENSE_BF16_PEAK = 989e12  # the H100/H200 SXM datasheet's dense bf16
PEER = ROOT / ".peer" / "diffusers_train_text_to_image_lora.py"
CACHE_REUSED = "latent cache: reusing"  # sdft.data.cache's log line when it finds the cache

REGIONS = ["BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D"]  # SD1.5's
# A variant is a base and `+options`, e.g. "fast+cudnn+profile": train.py overrides on top
# of +experiment=scribble and the shared base ones.
BASES = {
    "plain": ["perf=off", "optim.fused=false"],  # what the peer does: no cache, 8 x 4, eager
    "cache": ["perf=off", "optim.fused=false", "data.cache=true"],
    "fast-eager-nocache": ["perf.compile_unet=false"],  # micro-batch 32 etc.; VAE every step
    "fast-eager": ["data.cache=true", "perf.compile_unet=false"],  # all but compile
    "fast-nocache": [],  # compile, micro-batch 32, fused AdamW; the VAE every step
    "fast": ["data.cache=true"],  # the default GPU path
}
OPTIONS = {
    "cudnn": ["perf.attention=cudnn"],  # cuDNN's fused attention first
    "convbench": ["perf.cudnn_benchmark=true"],  # cuDNN times the convolution algorithms
    "mb8": ["perf.merge_accumulation=false"],  # micro-batch 8 x 4, as the peer
    "grad_ckpt": ["perf.gradient_checkpointing=true"],
    "adamw8bit": ["optim=adamw8bit"],
    # the kernel table of 5 steps, profiled inside the warm-up (compiled: 50 steps), so
    # the timed steps stay unprofiled
    "profile": [
        "profiler=kernels",
        "profiler.schedule.skip_first=20",
        "profiler.export_to_chrome=true",  # bench/kernels.py sums its kernels by kind
    ],
    "mm1x1": ["+perf.inductor.conv_1x1_as_mm=true"],  # inductor: 1x1 convolutions as matmuls
    "cdtune": ["+perf.inductor.coordinate_descent_tuning=true"],  # tunes kernels (longer compile)
    "cudagraphs": ["perf.compile_mode=reduce-overhead"],  # CUDA graphs: no launch gaps
    # one fast-path switch at a time, for its own row
    "cl": ["perf.channels_last=true"],  # off by default since the fourth lease (RESULTS.md)
    "nocl": ["perf.channels_last=false"],  # the default now; named in the earlier rows
    "notf32": ["perf.tf32=false"],
    "unfused": ["optim.fused=false"],
    "cast": ["perf.adapter_input_cast=true"],  # peft's bf16 -> fp32 -> bf16 input round trip
    "constlr": ["lr_scheduler=constant"],  # runs of different lengths share the LR curve
    # the training controls' cost (issue 17): each on top of the default GPU path
    "minsnr": ["loss.snr_gamma=5"],
    "ema": ["callbacks.ema.decay=0.999"],
    "val100": ["val.every_n_steps=100"],  # 200 held-out drawings x 5 timesteps per validation
    # cold start (issue 19): regional compilation, and a compile cache of the row's own, empty
    # at its first run (cold) and filled for a later `+warm` row of the same cache
    "regional": [f"perf.compile_regions=[{','.join(REGIONS)}]"],
    "ccA": ["perf.cache_dir=/tmp/sdft_bench_cache_A"],
    "ccB": ["perf.cache_dir=/tmp/sdft_bench_cache_B"],
    "warm": [],  # the same run again: its cache filled by the row before
    "full": ["method=full"],  # full fine-tuning (issue 20): every UNet weight, its memory row
}


def overrides(name: str) -> list[str]:
    base, *options = name.split("+")
    if base not in BASES or not set(options) <= OPTIONS.keys():
        raise SystemExit(f"unknown variant {name!r}: a base of {list(BASES)} + {list(OPTIONS)}")
    return BASES[base] + [o for opt in options for o in OPTIONS[opt]]


def sh(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            tail = log.read_text()[-1500:]
            raise RuntimeError(
                f"{' '.join(cmd[:4])}... stopped after {timeout} s:\n{tail}"
            ) from None
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{tail}")
    return time.perf_counter() - start


def prepare(
    work: Path, arch: str = "sd15", resolution: int = 512, render: bool = True
) -> tuple[Path, Path, Path]:
    """Save the SD1.5-shaped random pipeline (for the peer and for sdft alike) and render
    the scribble split's training drawings into an imagefolder for the peer (`render`)."""
    import hydra
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from sdft.files import atomic_path
    from sdft.models import build_random_pipeline

    model_dir = work / f"{arch}_arch"
    if not (model_dir / "model_index.json").is_file():
        build_random_pipeline(arch).save_pretrained(model_dir)
    folder = work / "imagefolder"
    if not render:  # no peer in this call: sdft reads the drawings itself
        return model_dir, folder, work
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "+experiment=scribble",
                f"data.path={ROOT}/data/quickdraw",
                "paths.root_dir=.",
                "paths.output_dir=.",
                f"data.resolution={resolution}",
            ],
        )
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "metadata.jsonl"
    if done.is_file() and len(done.read_text().splitlines()) == len(dm.dataset):
        return model_dir, folder, work  # rendered by an earlier call on this machine
    with atomic_path(done) as tmp, tmp.open("w") as meta:  # complete, or not there
        for i in range(len(dm.dataset)):
            item = dm.dataset[(i, False)]
            x = ((item["pixel_values"] * 0.5 + 0.5).clamp(0, 1) * 255).round().byte()
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
            meta.write(json.dumps({"file_name": f"{i:05d}.png", "text": item["caption"]}) + "\n")
    return model_dir, folder, work


def run_peer(model_dir: Path, folder: Path, work: Path, steps: int, warmup: int) -> dict:
    times = work / "peer_times.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "peer_timer.py"),
        str(times),
        str(PEER),
        f"--pretrained_model_name_or_path={model_dir}",
        f"--train_data_dir={folder}",
        "--caption_column=text",
        "--resolution=512",
        "--random_flip",
        "--train_batch_size=8",
        "--gradient_accumulation_steps=4",
        "--rank=4",
        "--learning_rate=1e-4",
        "--lr_scheduler=cosine",
        "--lr_warmup_steps=0",
        "--mixed_precision=bf16",
        f"--max_train_steps={steps}",
        "--seed=1337",
        "--dataloader_num_workers=8",
        f"--output_dir={work / 'peer_out'}",
        "--checkpointing_steps=100000",
        "--report_to=tensorboard",
    ]
    wall = sh(cmd, work / "peer.log")
    t = json.loads(times.read_text())
    ends = t["step_end_times"]
    seconds = ends[-1] - ends[warmup - 1]
    return {
        "samples_per_s": 32 * (len(ends) - warmup) / seconds,
        "peak_mem_gb": t["peak_mem_gb"],
        "timed_steps": len(ends) - warmup,
        "wall_s": wall,
        "micro_batch": 8,
        "launch_to_first_step_s": t.get("launch_to_first_step_s"),
    }


def compiles(name: str) -> bool:
    return not {"perf=off", "perf.compile_unet=false"} & set(overrides(name))


def run_sdft(
    name: str,
    model_dir: Path,
    work: Path,
    steps: int,
    warmup: int,
    extra: list[str],
    out_dir: Path,
    timeout: float | None = None,
) -> dict:
    out = work / f"sdft_{name}_{time.strftime('%H%M%S')}"
    cmd = [
        sys.executable,
        "train.py",
        "+experiment=scribble",
        f"model.pretrained={model_dir}",
        f"data.path={ROOT}/data/quickdraw",
        f"trainer.max_steps={steps}",
        "logger=csv",
        "data.num_workers=8",
        "callbacks.preview=null",  # previews and the CLIP sweep are not training speed
        "callbacks.scale_sweep=null",
        "callbacks.checkpoint.every_n_train_steps=100000",
        "trainer.enable_progress_bar=false",
        f"callbacks.speed.warmup_steps={warmup}",
        "callbacks.speed.print_every_n_steps=25",
        "trainer.log_every_n_steps=5",
        f"hydra.run.dir={out}",
        *overrides(name),
        *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    wall = sh(cmd, out_dir / f"sdft_{name}.log", env, timeout)
    perf = json.loads((out / "perf.json").read_text())
    log = (out_dir / f"sdft_{name}.log").read_text()
    built = re.search(r"latent cache: built .* in ([0-9.]+) s", log)
    tag = name.replace("+", "_")  # in file names
    profile = out / "fit-profile.txt"
    if profile.is_file():  # profiler=kernels: the kernel table, beside the numbers
        shutil.copy(profile, out_dir / f"profile_{tag}.txt")
    for trace in out.glob("*.pt.trace.json"):  # where the GPU's time goes, by kernel kind
        stem = out_dir / f"kernels_{tag}"
        try:
            summary = kernels.summarize(kernels.load(trace))
        except ValueError as e:  # a CPU run has no device kernels
            print(f"{trace}: {e}", flush=True)
            continue
        stem.with_suffix(".md").write_text(kernels.markdown(summary) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        with trace.open("rb") as f, gzip.open(f"{stem}.trace.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
    losses = out_dir / f"loss_{tag}.csv"
    with (out / "csv" / "metrics.csv").open() as f, losses.open("w") as g:
        g.write("step,loss\n")
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                g.write(f"{row['step']},{row['train/loss']}\n")
    micro = OmegaConf.load(out / "config.yaml").data.batch_size  # after merge_accumulation
    return {
        **perf,
        "wall_s": wall,
        "micro_batch": micro,
        "steps": steps,  # asked for; perf.json's steps_done: trained (max_time stops early)
        "cache_build_s": float(built.group(1)) if built else None,
        "cache_reused": CACHE_REUSED in log,
        "run_dir": str(out),
        "loss_csv": losses.name,
    }


# a run outlives its trainer.max_time by loading the model before fit and exporting after
RUN_OUTSIDE_FIT_S = 60


def seconds(max_time: str) -> int:
    """Lightning's "DD:HH:MM:SS" in seconds."""
    days, hours, minutes, secs = (int(part) for part in max_time.split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


def check_args(names: list[str], max_time: dict[str, str], timeout: float | None) -> None:
    """Stop on a typo or a limit that cannot hold before the peer's minutes are spent."""
    for name in names:
        overrides(name)
    for name, limit in max_time.items():
        if name not in names:
            raise SystemExit(f"--max-time: {name!r} is not one of --variants {names}")
        if not re.fullmatch(r"\d+:\d+:\d+:\d+", limit):
            raise SystemExit(f"--max-time: {name}: {limit!r} is not DD:HH:MM:SS")
        if timeout and seconds(limit) + RUN_OUTSIDE_FIT_S > timeout:
            raise SystemExit(
                f"--max-time: {name}: {limit} + about {RUN_OUTSIDE_FIT_S} s of load and export "
                f"exceeds --timeout {timeout:g} s; the timeout would kill the run and lose its row"
            )


def main_run(args: argparse.Namespace) -> None:
    import torch

    names = args.variants.split(",")
    check_args(names, args.max_time, args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    model_dir, folder, work = prepare(work, args.arch, args.resolution, bool(args.peer_steps))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "rows": {},
    }
    if args.peer_steps:
        results["rows"]["diffusers example"] = run_peer(
            model_dir, folder, work, args.peer_steps, args.warmup
        )
        print("peer", results["rows"]["diffusers example"], flush=True)
    for name in names:
        steps = args.steps.get(name, args.default_steps)
        extra = [f"data.resolution={args.resolution}", *args.extra.split()]
        if name in args.max_time:  # a graceful stop: the numbers so far are kept
            extra.append(f"+trainer.max_time={args.max_time[name]}")
        # compiled runs: warm up past both compiles (full micro-batch, the epoch's last one)
        warmup = args.warmup_compiled if compiles(name) else args.warmup
        try:
            row = run_sdft(name, model_dir, work, steps, warmup, extra, out, args.timeout)
        except Exception as e:  # one broken variant must not cost the others' numbers
            row = {"error": str(e)[-2000:]}
        results["rows"][f"sdft {name}"] = row
        print(name, row, flush=True)
        (out / "throughput.json").write_text(json.dumps(results, indent=1))
    (out / "throughput.json").write_text(json.dumps(results, indent=1))
    print(table(results))


PAPER_SAMPLES = 140_000  # the paper's recipe: 2000 drawings x 70 epochs


def steps_done(row: dict) -> int:
    """Optimiser steps a run trained: perf.json's count, else (older runs) the last step of
    its loss curve, else the steps it asked for."""
    if "steps_done" in row:
        return row["steps_done"]
    path = Path(row.get("loss_path", "-"))
    if path.is_file():
        return max(int(x["step"]) for x in csv.DictReader(path.open())) + 1
    return row.get("steps", row.get("timed_steps", 0))


def table(results: dict) -> str:
    rows = results["rows"]
    peer = rows.get("diffusers example", {}).get("samples_per_s")
    lines = [
        f"Device: {results['device']}, {results['date']}. Command: `{results['command']}`",
        "",
        "| run | micro-batch | samples/s | x peer | MFU (800 / 989 TFLOP/s) | peak GPU mem (GB) "
        "| timed | launch to 1st step | cache build | paper recipe (projected) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # a run that reused the cache pays its build in the projection all the same
    built = max((r.get("cache_build_s") or 0 for r in rows.values()), default=0)
    for name, r in rows.items():
        if "error" in r:
            said = r["error"].splitlines()  # the exception's line, not Hydra's epilogue
            said = next((x for x in said[::-1] if re.search(r"\w(Error|Exception)\b", x)), said[-1])
            lines.append(f"| {name} | failed: {said[:100]} ||||||||")
            continue
        sps = r["samples_per_s"]
        if sps is None:  # too few steps after the warm-up: perf.json says why
            lines.append(f"| {name} | no speed: {r.get('reason', '')[:100]} ||||||||")
            continue
        ratio = f"{sps / peer:.2f}x" if peer else "-"
        mfu = sps * FLOP_PER_SAMPLE / PEAK_FLOPS
        mfu_peak = sps * FLOP_PER_SAMPLE / DENSE_BF16_PEAK
        launch = r.get("launch_to_first_step_s")
        launch = f"{launch:.0f} s" if launch else "-"
        timed = r.get("timed_seconds")
        timed = f"{timed:.0f} s" if timed else f"{r.get('timed_steps', '?')} steps"
        cache = f"{r['cache_build_s']:.0f} s" if r.get("cache_build_s") else "-"
        cache = "(reused)" if r.get("cache_reused") else cache
        # the run's own wall time (load, cache, compile, warm-up) + the rest at steady state
        once = r["wall_s"] + (built if r.get("cache_reused") else 0)
        projected = (once + max(PAPER_SAMPLES - 32 * steps_done(r), 0) / sps) / 60
        lines.append(
            f"| {name} | {r['micro_batch']} | {sps:.1f} | {ratio} | {mfu:.1%} / {mfu_peak:.1%} | "
            f"{r.get('peak_mem_gb', 0):.1f} | {timed} | {launch} | {cache} | {projected:.1f} min |"
        )
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """The rows of several `run` calls on one machine, as one table; each row keeps the
    path of its loss curve."""
    merged: dict = {"rows": {}, "commands": []}
    for path in map(Path, paths):
        results = json.loads(path.read_text())
        if merged.setdefault("device", results["device"]) != results["device"]:
            raise SystemExit(f"{path}: ran on {results['device']}, not {merged['device']}")
        merged.setdefault("date", results["date"])
        merged["commands"].append(results["command"])
        for name, row in results["rows"].items():
            if row.get("loss_csv"):
                row["loss_path"] = str(path.parent / row["loss_csv"])
            log = path.parent / f"{name.replace(' ', '_')}.log"  # runs before cache_reused
            if "cache_reused" not in row and log.is_file():
                row["cache_reused"] = CACHE_REUSED in log.read_text()
            merged["rows"][name] = row
    merged["command"] = "`, then `".join(merged["commands"])
    return merged


def plot_losses(results: dict, png: Path, rows: list[str] | None, max_step: int | None) -> None:
    """Training loss by optimiser step of the sdft rows (smoothed over 10 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results["rows"].items():
        path = Path(r.get("loss_path", "-"))
        if not path.is_file() or (rows and name not in rows):
            continue
        points = [(int(x["step"]), float(x["loss"])) for x in csv.DictReader(path.open())]
        points = [p for p in points if max_step is None or p[0] <= max_step]
        loss, k = [p[1] for p in points], 10
        smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1])
                  for i in range(len(loss))]  # fmt: skip
        ax.plot([p[0] for p in points], smooth, label=name)
    ax.set_xlabel("optimiser step (32 samples)")
    ax.set_ylabel("train loss (10-step mean)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/sdft_bench")
    r.add_argument("--variants", default="plain,fast")
    r.add_argument("--peer-steps", type=int, default=60)
    r.add_argument("--default-steps", type=int, default=60)
    r.add_argument("--steps", type=json.loads, default={}, help='{"fast": 600}')
    r.add_argument("--max-time", type=json.loads, default={}, help='{"fast": "00:00:07:00"}')
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--warmup-compiled", type=int, default=50)
    r.add_argument("--timeout", type=float, default=None, help="seconds per sdft run")
    r.add_argument("--arch", default="sd15", help="tiny: a CPU smoke test of this script")
    r.add_argument("--resolution", type=int, default=512)
    r.add_argument("--extra", default="", help="more train.py overrides, space separated")
    rep = sub.add_parser("report")
    rep.add_argument("json", nargs="+", help="throughput.json of one or more runs")
    rep.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    rep.add_argument("--plot", help="a PNG of the loss curves of the sdft rows")
    rep.add_argument("--plot-rows", help="only these rows, comma separated")
    rep.add_argument("--plot-steps", type=int, help="only the first N steps")
    args = p.parse_args()
    if args.cmd == "run":
        main_run(args)
    else:
        results = merge(args.json)
        text = table(results)
        if args.plot:
            rows = args.plot_rows.split(",") if args.plot_rows else None
            plot_losses(results, Path(args.plot), rows, args.plot_steps)
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
        print(text)


if __name__ == "__main__":
    main()
