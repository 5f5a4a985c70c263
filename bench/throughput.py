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
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
FLOP_PER_SAMPLE = 1.78e12  # SD1.5 UNet forward + backward with LoRA at 512 px
PEAK_FLOPS = 800e12  # achievable dense bf16 on an H100
PEER = ROOT / ".peer" / "diffusers_train_text_to_image_lora.py"

# name -> train.py overrides (on top of +experiment=scribble and the shared base ones)
VARIANTS = {
    "plain": ["perf=off", "optim.fused=false"],  # what the peer does: no cache, 8 x 4, eager
    "cache": ["perf=off", "optim.fused=false", "data.cache=true"],
    "cache+mb32": [
        "perf=off",
        "optim.fused=false",
        "data.cache=true",
        "perf.merge_accumulation=true",
    ],
    "cache+mb32+compile": ["data.cache=true", "perf.channels_last=false", "optim.fused=false"],
    "fast-eager": ["data.cache=true", "perf.compile_unet=false"],  # all but compile
    "fast-nocache": [],  # compile, micro-batch 32, channels_last, fused; VAE every step
    "fast": ["data.cache=true"],  # the default GPU path: all of the above + channels_last, fused
    "fast+profile": ["data.cache=true", "profiler=kernels"],  # + where 5 steps' time goes
    "fast+grad_ckpt": ["data.cache=true", "perf.gradient_checkpointing=true"],
    "fast+adamw8bit": ["data.cache=true", "optim=adamw8bit"],
}


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


def prepare(work: Path, arch: str = "sd15", resolution: int = 512) -> tuple[Path, Path, Path]:
    """Save the SD1.5-shaped random pipeline (for the peer and for sdft alike) and render
    the scribble split's training drawings into an imagefolder for the peer."""
    import hydra
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from sdft.models import build_random_pipeline

    model_dir = work / f"{arch}_arch"
    if not (model_dir / "model_index.json").is_file():
        build_random_pipeline(arch).save_pretrained(model_dir)
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
    folder = work / "imagefolder"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as meta:
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
    }


def compiles(name: str) -> bool:
    return not {"perf=off", "perf.compile_unet=false"} & set(VARIANTS[name])


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
        *VARIANTS[name],
        *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    wall = sh(cmd, out_dir / f"sdft_{name}.log", env, timeout)
    perf = json.loads((out / "perf.json").read_text())
    built = re.search(
        r"latent cache: built .* in ([0-9.]+) s", (out_dir / f"sdft_{name}.log").read_text()
    )
    profile = out / "fit-profile.txt"
    if profile.is_file():  # profiler=kernels: the kernel table, beside the numbers
        shutil.copy(profile, out_dir / f"profile_{name.replace('+', '_')}.txt")
    losses = out_dir / f"loss_{name.replace('+', '_')}.csv"
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
        "steps": steps,
        "cache_build_s": float(built.group(1)) if built else None,
        "run_dir": str(out),
        "loss_csv": losses.name,
    }


def main_run(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    model_dir, folder, work = prepare(work, args.arch, args.resolution)
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
    for name in args.variants.split(","):
        steps = args.steps.get(name, args.default_steps)
        extra = args.extra.split() if args.extra else []
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


def table(results: dict) -> str:
    rows = results["rows"]
    peer = rows.get("diffusers example", {}).get("samples_per_s")
    lines = [
        f"Device: {results['device']}, {results['date']}. Command: `{results['command']}`",
        "",
        "| run | micro-batch | samples/s | x peer | MFU | peak GPU mem (GB) | timed | "
        "cache build | paper recipe (projected) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} |||||||")
            continue
        sps = r["samples_per_s"]
        ratio = f"{sps / peer:.2f}x" if peer else "-"
        mfu = sps * FLOP_PER_SAMPLE / PEAK_FLOPS
        timed = r.get("timed_seconds")
        timed = f"{timed:.0f} s" if timed else f"{r.get('timed_steps', '?')} steps"
        cache = f"{r['cache_build_s']:.0f} s" if r.get("cache_build_s") else "-"
        # the run's own wall time (load, cache, compile, warm-up) + the rest at steady state
        done = 32 * r.get("steps", r.get("timed_steps", 0))
        projected = (r["wall_s"] + max(PAPER_SAMPLES - done, 0) / sps) / 60
        lines.append(
            f"| {name} | {r['micro_batch']} | {sps:.1f} | {ratio} | {mfu:.1%} | "
            f"{r.get('peak_mem_gb', 0):.1f} | {timed} | {cache} | {projected:.1f} min |"
        )
    return "\n".join(lines)


def plot_losses(results: dict, folder: Path, png: Path) -> None:
    """Training loss by optimiser step of every sdft row (smoothed over 10 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results["rows"].items():
        path = folder / r.get("loss_csv", "-")
        if not path.is_file():
            continue
        rows = list(csv.DictReader(path.open()))
        steps = [int(x["step"]) for x in rows]
        loss = [float(x["loss"]) for x in rows]
        k = 10
        smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1])
                  for i in range(len(loss))]  # fmt: skip
        ax.plot(steps, smooth, label=name)
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
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--warmup-compiled", type=int, default=50)
    r.add_argument("--timeout", type=float, default=None, help="seconds per sdft run")
    r.add_argument("--arch", default="sd15", help="tiny: a CPU smoke test of this script")
    r.add_argument("--resolution", type=int, default=512)
    r.add_argument("--extra", default="", help="more train.py overrides, space separated")
    rep = sub.add_parser("report")
    rep.add_argument("json")
    rep.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    rep.add_argument("--plot", help="a PNG of the loss curves of the sdft rows")
    args = p.parse_args()
    if args.cmd == "run":
        main_run(args)
    else:
        results = json.loads(Path(args.json).read_text())
        text = table(results)
        if args.plot:
            plot_losses(results, Path(args.json).parent, Path(args.plot))
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
        print(text)


if __name__ == "__main__":
    main()
