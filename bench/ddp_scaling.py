"""DDP scaling: the same training on 1 and on 2 GPUs, in one invocation, side by side.

    python bench/ddp_scaling.py --out $OUT            # GPUs: SD1.5 shapes, 512 px, bf16
    python bench/ddp_scaling.py --out /tmp/x --cpu    # the same plumbing on the CPU (gloo, tiny)

Each run is a real `train.py +experiment=scribble trainer=ddp trainer.devices=N` (Lightning's
own launcher), effective batch 32 per GPU (the recipe's 8 x 4; the fast path merges it into one
micro-batch of 32), so 2 GPUs train 64 samples a step at the same learning rate. Samples/s is
steady state, from each run's perf.json (warm-up and compilation excluded). Written to --out:
ddp_scaling.json (both runs, speed-up, loss agreement), ddp_scaling_loss.csv / .png (both loss
curves by step) and each run's log; the run folders stay under --work.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPU = [
    "+experiment=scribble",
    "model=sd15_arch",  # SD1.5's exact shapes, random weights: same FLOPs, no download
    "trainer=ddp",
    "logger=csv",
    "data.num_workers=8",  # per rank
    "data.cache=true",  # latents and text encoded once (by both ranks' shares), reused
    "~callbacks.scale_sweep",
    "callbacks.preview=null",
]
CPU = [  # the same runs at toy size: model=tiny, 64 px, gloo
    "+experiment=scribble",
    "model=tiny",
    "trainer=ddp",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "data.resolution=64",
    "data.num_workers=0",
    "data.num_categories=10",
    "data.per_category=4",
    "data.batch_size=4",
    "trainer.accumulate_grad_batches=1",
    "callbacks.speed.warmup_steps=2",
    "~callbacks.scale_sweep",
    "callbacks.preview=null",
]


def train(devices: int, base: list[str], work: Path, out: Path) -> dict:
    """One `train.py` run on `devices` GPUs; returns its record (speed, losses, or error)."""
    run_dir = work / f"gpu{devices}"
    overrides = [
        *base,
        f"trainer.devices={devices}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    cmd = [sys.executable, "train.py", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    record = {"devices": devices, "command": "python train.py " + " ".join(overrides)}
    print(f"\n== {devices} device(s): {record['command']}", flush=True)
    start = time.perf_counter()
    with open(out / f"gpu{devices}.log", "w") as log:
        # its own session: on a timeout, the DDP processes Lightning started go down with it
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            record["returncode"] = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            record["returncode"] = f"killed after {args.timeout} s"
    record["wall_s"] = round(time.perf_counter() - start, 1)
    if (run_dir / "perf.json").is_file():
        record.update(json.loads((run_dir / "perf.json").read_text()))
    record["loss"] = read_losses(run_dir / "csv" / "metrics.csv")
    print(
        f"   -> rc {record['returncode']}, {record['wall_s']} s, "
        f"{record.get('samples_per_s') or float('nan'):.2f} samples/s",
        flush=True,
    )
    return record


def read_losses(path: Path) -> dict[int, float]:
    """train/loss by optimiser step (with accumulation: the step's last micro-batch; on 2 GPUs
    the mean over both ranks)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        return {int(r["step"]) + 1: float(r["train/loss"]) for r in rows if r.get("train/loss")}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def compare(one: dict, two: dict) -> dict:
    """Speed-up and how closely the two loss curves agree (window means: the loss of one step
    is mostly the noise of its random timesteps)."""
    out: dict = {}
    if one.get("samples_per_s") and two.get("samples_per_s"):
        out["speedup"] = two["samples_per_s"] / one["samples_per_s"]
        out["scaling_efficiency"] = out["speedup"] / 2
    steps = sorted(set(one["loss"]) & set(two["loss"]))
    if len(steps) >= 20:
        w = max(5, len(steps) // 8)
        a, b = [one["loss"][s] for s in steps], [two["loss"][s] for s in steps]
        windows = [(mean(a[i : i + w]), mean(b[i : i + w])) for i in range(0, len(steps), w)]
        out["loss_window_steps"] = w
        out["loss_windows_1gpu"] = [round(x, 4) for x, _ in windows]
        out["loss_windows_2gpu"] = [round(y, 4) for _, y in windows]
        out["loss_first_window"] = windows[0]
        out["loss_last_window"] = windows[-1]
        out["loss_last_window_rel_diff"] = abs(windows[-1][1] - windows[-1][0]) / windows[-1][0]
    return out


def write_curves(one: dict, two: dict, out: Path) -> None:
    steps = sorted(set(one["loss"]) | set(two["loss"]))
    with open(out / "ddp_scaling_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_1gpu", "loss_2gpu"])
        w.writerows([s, one["loss"].get(s, ""), two["loss"].get(s, "")] for s in steps)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for rec, label in ((one, "1 GPU, batch 32/step"), (two, "2 GPUs, batch 64/step")):
        ax.plot(list(rec["loss"]), list(rec["loss"].values()), label=label, lw=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("train/loss")
    ax.legend()
    fig.savefig(out / "ddp_scaling_loss.png", dpi=110)


def main() -> None:
    out = Path(args.out)
    work = Path(args.work) / time.strftime("%Y-%m-%d_%H-%M-%S")  # run folders are never reused
    out.mkdir(parents=True, exist_ok=True)
    base = CPU if args.cpu else GPU
    one = train(1, base, work, out)
    two = train(2, base, work, out)
    result = {"cpu": args.cpu, "steps": args.steps, "runs": [one, two], **compare(one, two)}
    (out / "ddp_scaling.json").write_text(json.dumps(result, indent=1))
    write_curves(one, two, out)
    summary = {k: v for k, v in result.items() if k not in ("runs",) and "windows" not in k}
    print(json.dumps(summary, indent=1))
    if one["returncode"] != 0 or two["returncode"] != 0:
        sys.exit(f"a run failed: see {out}/gpu1.log and {out}/gpu2.log")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/runs/ddp_scaling", help="summary files")
    parser.add_argument("--work", default="/tmp/ddp_scaling", help="the runs' folders")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU, gloo")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, for both runs")
    args = parser.parse_args()
    args.steps = args.steps or (12 if args.cpu else 70)
    main()
