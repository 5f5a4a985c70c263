"""Sweep trials that go wrong are recorded as failed and the sweep goes on: a trial whose
last step leaves a NaN/inf adapter, and an Optuna search-space value that names no option."""

import csv
import json
import os
import subprocess
import sys

from conftest import FAST, ROOT

SHORT = ["callbacks.preview=null", "optimized_metric=train/loss", "optimized_direction=minimize"]


def sweep(tmp_path, *overrides: str) -> list[dict]:
    """`python train.py -m ...` (tiny, CPU) -> the rows of its summary.csv."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *FAST, *SHORT, *overrides, f"hydra.sweep.dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return list(csv.DictReader(open(out / "summary.csv")))


def test_trial_whose_last_step_blows_up_the_adapter_is_failed(tmp_path):
    # one step: its loss is finite (computed before the update), then lr 1e39 makes the
    # adapter infinite; the trial must not be "completed" with that loss as its score
    rows = sweep(tmp_path, "trainer.max_steps=1", "optim.lr=1e-3,1e39")
    assert [(r["optim.lr"], r["status"]) for r in rows] == [
        ("0.001", "completed"),
        ("1e+39", "failed"),
    ]
    assert rows[1]["error"].startswith("FloatingPointError: the trained adapter ")
    assert "holds NaN/inf values (tensor 'unet." in rows[1]["error"]
    assert rows[1]["train/loss"] == "" and float(rows[0]["train/loss"]) > 0


def test_optuna_value_naming_no_option_is_a_failed_trial_and_the_search_goes_on(tmp_path):
    rows = sweep(
        tmp_path,
        "trainer.max_steps=2",
        "hparams_search=scribble_optuna",
        "hydra.sweeper.n_trials=4",
        "lr_scheduler=choice(cosine,constant,nosuch)",
    )
    assert len(rows) == 4  # the sweep went on past the broken trial
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["lr_scheduler"] == "nosuch" for r in failed)
    assert all("Could not find 'lr_scheduler/nosuch'" in r["error"] for r in failed)
    assert {r["lr_scheduler"] for r in rows if r["status"] == "completed"} <= {"cosine", "constant"}
    md = (tmp_path / "sweep" / "summary.md").read_text()
    assert f"4 trials, {len(failed)} failed" in md
    record = json.loads((tmp_path / "sweep" / failed[0]["folder"] / "trial.json").read_text())
    assert record["status"] == "failed" and "lr_scheduler=nosuch" in record["overrides"]
