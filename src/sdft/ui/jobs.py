"""One training at a time, as a `train.py` child process; its progress read from the files
the run writes anyway (the stdout log, `csv/metrics.csv`, `previews/`, `status.json`).

Cancel sends SIGTERM (Lightning stops after the current step and sdft's GracefulStop saves
the adapter and a checkpoint), then SIGINT if the step does not end within `grace_s` (a long
preview or class-image generation: interrupted at once, saved all the same).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdft.stop import read_status

ROOT = Path(__file__).resolve().parents[3]
LOG_FILE = "console.log"  # the child's stdout and stderr
UI_FILE = "ui.json"  # the overrides the UI ran, to resume with
STEP_LINE = re.compile(r"sdft step (\d+): ([0-9.]+) samples/s")
ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt))(?::|$)")
ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")


class JobBusy(RuntimeError):
    """A second Start while a training runs."""


@dataclass
class Job:
    name: str
    run_dir: Path
    overrides: list[str]
    total_steps: int
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    cancel_requested: bool = False
    seen: list[tuple[float, int]] = field(default_factory=list)  # (time, step) for the ETA


def read_log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def error_message(log_text: str) -> str:
    """The exception line of a failed run's log (Hydra prints it last, after the traceback)."""
    for line in reversed(log_text.splitlines()):
        if ERROR_LINE.match(line.strip()):
            return line.strip()
    return ""


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) from the run's metrics.csv."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        (int(float(r["step"])), float(r["train/loss"]))
        for r in rows
        if r.get("train/loss") not in (None, "")
    ]


def adapter_files(run_dir: Path) -> list[Path]:
    """The diffusers file first, then the kohya/A1111 one(s)."""
    files = [run_dir / n for n in ADAPTER_FILES if (run_dir / n).is_file()]
    return files + sorted(p for p in run_dir.glob("*.safetensors") if p not in files)


class JobRunner:
    """Starts `train.py` runs under `runs_dir/<name>`, one at a time."""

    def __init__(self, runs_dir: str | Path, python: str = sys.executable, grace_s: float = 10.0):
        self.runs_dir = Path(runs_dir)
        self.python, self.grace_s = python, grace_s
        self.job: Job | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.process.poll() is None

    def new_run_dir(self, name: str) -> Path:
        base = re.sub(r"[^\w.-]", "_", name, flags=re.ASCII).strip("._") or "run"
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        path, i = self.runs_dir / f"{base}_{stamp}", 1
        while path.exists():
            path, i = self.runs_dir / f"{base}_{stamp}_{i}", i + 1
        return path

    def start(self, name: str, overrides: list[str], total_steps: int) -> Job:
        """Launch `python train.py *overrides` in a fresh run folder; JobBusy if one runs."""
        with self._lock:
            if self.running:
                raise JobBusy(
                    f"a training is running ({self.job.run_dir.name}): "
                    "wait for it or cancel it before starting another"
                )
            run_dir = self.new_run_dir(name)
            run_dir.mkdir(parents=True)
            args = [*overrides, f"hydra.run.dir={run_dir}"]
            (run_dir / UI_FILE).write_text(
                json.dumps({"overrides": overrides, "total_steps": total_steps}, indent=1)
            )
            log = open(run_dir / LOG_FILE, "wb")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            process = subprocess.Popen(
                [self.python, str(ROOT / "train.py"), *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl+C in the UI's terminal is the UI's, not the run's
            )
            log.close()  # the child holds its own copy
            self.job = Job(name, run_dir, overrides, total_steps, process)
            return self.job

    def resume(self, run_dir: str | Path) -> Job:
        """Continue a cancelled run from its checkpoint, in a new run folder."""
        run_dir = Path(run_dir)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{run_dir.name}: no checkpoints/last.ckpt to resume from")
        info = json.loads((run_dir / UI_FILE).read_text())
        overrides = [o for o in info["overrides"] if not o.startswith("ckpt_path=")]
        name = re.sub(r"_\d{4}-\d\d-\d\d_.*$", "", run_dir.name) + "_resumed"
        return self.start(name, [*overrides, f"ckpt_path={ckpt}"], info["total_steps"])

    def cancel(self, wait_s: float = 120.0) -> str:
        """Stop the run gracefully; return where its adapter and checkpoint are."""
        job = self.job
        if job is None or job.process.poll() is not None:
            return "no training is running"
        job.cancel_requested = True
        job.process.send_signal(signal.SIGTERM)  # Lightning: stop after this step
        try:
            job.process.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            job.process.send_signal(signal.SIGINT)  # now, mid-step
            try:
                job.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
                return f"the run did not stop within {wait_s:.0f} s and was killed"
        status = read_status(job.run_dir)
        if status.get("status") != "cancelled":
            return f"cancelled before training started: nothing saved ({job.run_dir})"
        return f"cancelled at step {status['step']}: adapter and checkpoint in {job.run_dir}"

    def progress(self) -> dict:
        """What the page shows: state, step/total, samples/s, ETA, losses, previews, log."""
        job = self.job
        if job is None:
            return {"state": "idle"}
        log_text = read_log_tail(job.run_dir / LOG_FILE, 400)
        steps = STEP_LINE.findall(log_text)
        step, rate = (int(steps[-1][0]), float(steps[-1][1])) if steps else (0, 0.0)
        now = time.time()
        if step and (not job.seen or job.seen[-1][1] != step):
            job.seen.append((now, step))
        eta = None
        if len(job.seen) >= 2:
            (t0, s0), (t1, s1) = job.seen[0], job.seen[-1]
            eta = (job.total_steps - s1) * (t1 - t0) / max(s1 - s0, 1)
        code = job.process.poll()
        status = read_status(job.run_dir)
        if code is None:
            state = "running"
        elif status.get("status") in ("finished", "cancelled"):
            state = status["status"]
        elif job.cancel_requested:
            state = "cancelled"
        else:
            state = "failed"
        error = ""
        if state == "failed":
            error = status.get("error") or error_message(log_text) or f"exit code {code}"
        return {
            "state": state,
            "run_dir": job.run_dir,
            "step": status.get("step", step) if code is not None else step,
            "total": job.total_steps,
            "samples_per_s": rate,
            "eta_s": eta if code is None else 0.0,
            "losses": read_losses(job.run_dir),
            "previews": sorted((job.run_dir / "previews").glob("*.png")),
            "log": "\n".join(log_text.splitlines()[-40:]),
            "error": error,
            "files": adapter_files(job.run_dir) if code is not None else [],
        }

    def shutdown(self) -> None:
        """On the UI's exit: cancel a running job (so its adapter is saved)."""
        if self.running:
            self.cancel(wait_s=30)
