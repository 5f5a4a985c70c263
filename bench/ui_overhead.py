"""What the web UI adds to training: the same DreamBooth-LoRA run from `train.py` and from the
UI (driven with gradio_client: Start, watch, Cancel), their samples/s and preview latency.

    python bench/ui_overhead.py --model sd15_arch --steps 300 --out outputs/bench_ui

samples/s: train.py's steady-state rate (perf.json) vs the UI run's last "sdft step N: X
samples/s" line at the same step, just before Cancel. Preview latency: from the preview
file's write to the UI's progress call returning it (the page polls every second). Appends
a markdown table to `<out>/ui_overhead.md` and prints it. Needs a GPU for real numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from sdft.ui import base_overrides
from sdft.ui.form import UI_OVERRIDES, TrainForm, to_overrides
from sdft.ui.jobs import STEP_LINE

ROOT = Path(__file__).resolve().parents[1]
FIELDS_ORDER = [f.name for f in dataclasses.fields(TrainForm)]  # the Start endpoint's inputs


def instance_images(folder: Path, n: int = 4) -> Path:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(np.load(ROOT / "data/quickdraw/bitmap/apple.npy")[:n]):
        Image.fromarray(255 - b.reshape(28, 28)).convert("RGB").save(folder / f"sks_{i}.png")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_run(args, form: TrainForm, out: Path) -> dict:
    """train.py with the form's overrides but without the UI's own (progress lines, csv)."""
    overrides = [o for o in to_overrides(form) if o not in UI_OVERRIDES]
    page = OmegaConf.create({"device": "auto", "train_overrides": args.extra})
    cmd = [sys.executable, str(ROOT / "train.py"), *base_overrides(page, args.model, []),
           *overrides, f"hydra.run.dir={out}"]  # fmt: skip  # what the page runs, less its own
    subprocess.run(cmd, cwd=ROOT, check=True)
    perf = json.loads((out / "perf.json").read_text())
    return {"samples_per_s": perf["samples_per_s"], "steps": perf["steps_done"]}


def ui_run(args, form: TrainForm, workspace: Path) -> dict:
    """Start the run from the UI, poll its progress like the page, cancel at args.steps."""
    from gradio_client import Client

    port = free_port()
    extra = "[" + ",".join(f'"{o}"' for o in args.extra) + "]"
    ui = subprocess.Popen(
        [sys.executable, str(ROOT / "ui.py"), f"model={args.model}", f"port={port}",
         f"workspace={workspace}", f"train_overrides={extra}"],
        cwd=ROOT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )  # fmt: skip
    try:
        client = None
        for _ in range(600):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not up yet
                time.sleep(1)
        values = [getattr(form, k) for k in FIELDS_ORDER]
        values[FIELDS_ORDER.index("steps")] = args.steps + 10_000  # cancelled before the end
        client.predict(*values, api_name="/start")
        latencies, seen, rate, step = [], set(), 0.0, 0
        run_dir = None
        while step < args.steps:
            time.sleep(1.0)  # the page's timer
            status, _, newest, _, log, _ = client.predict(api_name="/progress")
            polled = time.time()
            found = STEP_LINE.findall(log)
            if found:
                step, rate = int(found[-1][0]), float(found[-1][1])
            run_dir = run_dir or next((workspace / "runs").iterdir())
            for png in (run_dir / "previews").glob("*.png"):
                if png.name not in seen and newest:
                    seen.add(png.name)
                    latencies.append(polled - png.stat().st_mtime)
        t0 = time.time()
        message = client.predict(api_name="/cancel")
        return {
            "samples_per_s": rate,
            "steps": step,
            "preview_latency_s": sum(latencies) / max(len(latencies), 1),
            "cancel_s": time.time() - t0,
            "cancel": message,
        }
    finally:
        ui.terminate()
        ui.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15_arch")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--preview-every", type=int, default=100)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_ui")
    p.add_argument("extra", nargs="*", help="more train.py overrides for both runs")
    args = p.parse_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out / stamp
    inst = instance_images(out / "instance")
    form = TrainForm(
        method="dreambooth_lora", data_path=str(inst), steps=args.steps,
        preview_every=args.preview_every, resolution=args.resolution,
    )  # fmt: skip
    cli = cli_run(args, form, out / "cli")
    form.data_source = "folder"  # the UI reads the same images (a folder, not its uploads)
    ui = ui_run(args, form, out / "ui")
    ratio = ui["samples_per_s"] / cli["samples_per_s"]
    table = (
        f"\n### {stamp}: {args.model}, DreamBooth-LoRA, {args.resolution} px, "
        f"{args.steps} steps, preview every {args.preview_every}\n\n"
        "| | samples/s | preview latency | cancel |\n|---|---|---|---|\n"
        f"| train.py | {cli['samples_per_s']:.2f} | - | - |\n"
        f"| web UI | {ui['samples_per_s']:.2f} ({ratio:.3f}x) | "
        f"{ui['preview_latency_s']:.2f} s | {ui['cancel_s']:.1f} s: {ui['cancel']} |\n"
    )
    with open(args.out / "ui_overhead.md", "a") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
