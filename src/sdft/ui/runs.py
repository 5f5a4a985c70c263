"""Past runs in the workspace: settings, status, metrics, files, evaluation plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from sdft.stop import read_status
from sdft.ui.jobs import LOG_FILE, ROOT, adapter_files, error_message, read_log_tail, read_losses

EVAL_DIR = "evaluate"  # <run>/evaluate/: evaluate.py's outputs when started from the UI


def run_state(run_dir: Path) -> str:
    """finished | cancelled | failed | running (a run without status.json that left an
    error in its log failed before training started)."""
    status = read_status(run_dir).get("status")
    if status:
        return status
    return "failed" if error_message(read_log_tail(run_dir / LOG_FILE)) else "unknown"


def list_runs(runs_dir: str | Path) -> list[list]:
    """Rows of the Runs table, newest first: name, status, method, steps, last loss."""
    rows = []
    runs_dir = Path(runs_dir)
    dirs = [p for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.is_dir() else []
    for run in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True):
        cfg = run / "config.yaml"
        method = OmegaConf.load(cfg).method._target_.rsplit(".", 1)[-1] if cfg.is_file() else ""
        losses = read_losses(run)
        step = read_status(run).get("step", losses[-1][0] if losses else 0)
        loss = f"{losses[-1][1]:.4f}" if losses else ""
        rows.append([run.name, run_state(run), method, step, loss])
    return rows


def run_details(run_dir: Path) -> dict:
    """Settings (config.yaml), status, final metrics, files and evaluation plots."""
    status = read_status(run_dir)
    cfg = run_dir / "config.yaml"
    log = read_log_tail(run_dir / LOG_FILE)
    plots = sorted((run_dir / EVAL_DIR).rglob("*.png")) + sorted(run_dir.glob("eval/**/*.png"))
    return {
        "status": status.get("status") or run_state(run_dir),
        "error": status.get("error") or error_message(log),
        "config": cfg.read_text() if cfg.is_file() else "",
        "losses": read_losses(run_dir),
        "files": adapter_files(run_dir),
        "plots": plots,
        "previews": sorted((run_dir / "previews").glob("*.png")),
    }


def start_evaluation(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """`python evaluate.py adapter=<run>` into <run>/evaluate/, logging to evaluate.log."""
    out = run_dir / EVAL_DIR
    with open(run_dir / "evaluate.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "evaluate.py"), f"adapter={run_dir}", *overrides,
             f"hydra.run.dir={out}"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
