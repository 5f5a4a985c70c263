"""DDP on the CPU: 2 processes (gloo) started by Lightning's own launcher (`train.py trainer=ddp`),
resuming a 1-process checkpoint mid-epoch. Pins the sharding, the resume onto another number of
processes, the loss averaged over ranks, and that only rank 0 writes."""

import atexit
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, ROOT, compose_cfg
from lightning.pytorch.utilities import rank_zero_only

from sdft.train import run

# 7 trained categories x 2 drawings = 14 samples: 7 per rank, batches of 2
COMMON = [
    "data.per_category=2",
    "data.batch_size=2",
    "trainer.accumulate_grad_batches=1",
    "callbacks.checkpoint.every_n_train_steps=3",
    "optimized_metric=train/loss",
]
N = 14


def sample_hash(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


class DDPProbe(L.Callback):
    """On each rank: the drawings of every batch, the rank's own and the logged loss of every
    step, and (with `watch`) every file written under `watch`, seen by a Python audit hook.
    Written to `<out>/rank<r>.json` at the end of fit and again at exit."""

    def __init__(self, out: str, watch: str | None = None):
        self.out, self.rank = Path(out), rank_zero_only.rank
        self.batches: list[dict] = []
        self.steps: list[dict] = []
        self.writes: list[str] = []
        if watch:
            self.watch = str(Path(watch).resolve())
            sys.addaudithook(self._audit)
            atexit.register(self._dump)

    def _audit(self, event: str, args: tuple) -> None:
        if event == "open":  # io.open gives a mode, os.open flags
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR)
        elif event in ("os.rename", "os.mkdir", "os.remove"):
            path, writes = args[1] if event == "os.rename" else args[0], True
        else:
            return
        if writes and isinstance(path, str | Path) and str(path).startswith(self.watch):
            self.writes.append(os.path.relpath(path, self.watch))

    def setup(self, trainer, module, stage) -> None:
        self.rank = trainer.global_rank
        ds = trainer.datamodule.dataset
        self.ids = {
            sample_hash(ds[(i, f)]["pixel_values"]): i for i in range(len(ds)) for f in (0, 1)
        }
        assert len(self.ids) == 2 * len(ds), "two drawings look alike: pick another seed"

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        drawn = [self.ids[sample_hash(x)] for x in batch["pixel_values"]]
        self.batches.append({"epoch": trainer.current_epoch, "samples": drawn})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        own, logged = outputs["loss"].item(), trainer.callback_metrics["train/loss"].item()
        self.steps.append({"step": trainer.global_step, "own": own, "logged": logged})

    def on_fit_end(self, trainer, module) -> None:
        self._dump()

    def _dump(self) -> None:
        record = {"batches": self.batches, "steps": self.steps, "writes": self.writes}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(record))


def probe(out: Path, watch: Path | None = None) -> list[str]:
    return [
        "+callbacks.probe._target_=test_ddp.DDPProbe",
        f"+callbacks.probe.out={out}",
        f"+callbacks.probe.watch={watch}" if watch else "+callbacks.probe.watch=null",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process trains 3 of the 7 steps of epoch 0; 2 DDP processes resume from its
    checkpoint and train to the end of epoch 1 (step 3 + 2 + 4 = 9)."""
    tmp = tmp_path_factory.mktemp("ddp")
    single = tmp / "single"
    run(compose_cfg([*FAST, *COMMON, "trainer.max_steps=3", *probe(tmp / "probe1")], single))

    ddp_out = tmp / "ddp"
    cmd = [
        sys.executable,
        "train.py",
        *FAST,
        *COMMON,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=9",
        "logger=default",  # csv + W&B (offline): each must be written once
        f"ckpt_path={single}/checkpoints/step_000003.ckpt",
        f"hydra.run.dir={ddp_out}",
        *probe(tmp / "probe2", watch=ddp_out),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    load = lambda d, r: json.loads((tmp / d / f"rank{r}.json").read_text())  # noqa: E731
    return {"single": load("probe1", 0), 0: load("probe2", 0), 1: load("probe2", 1), "out": ddp_out}


def seen(record: dict, epoch: int) -> list[int]:
    return [i for b in record["batches"] if b["epoch"] == epoch for i in b["samples"]]


def test_each_rank_trains_its_own_shard_and_together_they_cover_the_epoch(runs):
    rank0, rank1 = seen(runs[0], 1), seen(runs[1], 1)
    assert len(rank0) == len(rank1) == N // 2
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == list(range(N))


def test_resume_on_two_processes_trains_the_rest_of_the_epoch_exactly_once(runs):
    before = seen(runs["single"], 0)
    assert len(before) == 6  # 3 steps of 2 on one process
    after = seen(runs[0], 0) + seen(runs[1], 0)
    assert sorted(before + after) == list(range(N))  # none twice, none missing
    steps = [s["step"] for s in runs[0]["steps"]]
    assert steps == list(range(4, 10))  # the step counter goes on from the checkpoint


def test_logged_loss_is_the_mean_over_ranks_on_every_rank(runs):
    rows = list(csv.DictReader(open(runs["out"] / "csv" / "metrics.csv")))
    in_csv = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert len(runs[0]["steps"]) == len(runs[1]["steps"]) == 6
    for a, b in zip(runs[0]["steps"], runs[1]["steps"], strict=True):
        mean = (a["own"] + b["own"]) / 2
        assert a["own"] != b["own"]  # different shards ...
        assert a["logged"] == pytest.approx(mean) and b["logged"] == pytest.approx(mean)
        assert in_csv[a["step"] - 1] == pytest.approx(mean)  # CSV counts steps from 0


def test_only_rank_zero_writes_outputs_checkpoints_and_wandb(runs):
    out = runs["out"]
    assert runs[1]["writes"] == []
    written = "\n".join(runs[0]["writes"])  # the audit hook does see rank 0 write them
    for name in ("config.yaml", "split.json", "checkpoints", "pytorch_lora_weights.safetensors"):
        assert name in written, name
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (out / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]
    assert len(list((out / "previews").glob("*.png"))) == 1
