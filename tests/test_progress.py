"""What a run reports about itself is true: the progress bar's totals, perf.json's speed, and
a warning when a run ends inside its warm-up."""

import json
import logging
from types import SimpleNamespace

import psutil
import pytest
import torch

from sdft import speed as speed_module
from sdft.data import sampler as sampler_module
from sdft.data.sampler import ResumableLoader, SeededEpochSampler
from sdft.progress import epoch_total, last_epoch
from sdft.speed import SpeedMonitor


def trainer(**kw):
    base = dict(
        num_training_batches=44,
        accumulate_grad_batches=4,
        max_steps=30,
        max_epochs=-1,
        current_epoch=0,
        global_step=0,
    )
    return SimpleNamespace(**{**base, **kw})


def test_progress_bar_totals_count_batches_and_epochs_of_a_max_steps_run():
    # 44 batches x accumulation 4 = 11 steps an epoch; 30 steps end in epoch 2 (0-based)
    assert last_epoch(trainer()) == 2  # Lightning's bar said "Epoch 2/-2"
    assert epoch_total(trainer(current_epoch=0)) == 44
    assert epoch_total(trainer(current_epoch=2)) == 32  # 8 steps left x 4 (Lightning: 8)
    assert last_epoch(trainer(max_epochs=2)) == 1  # max_epochs ends it first
    assert last_epoch(trainer(max_steps=-1, max_epochs=-1)) is None
    assert epoch_total(trainer(max_steps=-1)) == 44


def test_loader_length_is_the_number_of_batches_it_yields_on_one_and_two_ranks(monkeypatch):
    for world in [(0, 1), (1, 2)]:
        monkeypatch.setattr(sampler_module, "world", lambda w=world: w)
        keys = {(i, f): i for i in range(13) for f in (False, True)}  # what the sampler yields
        loader = ResumableLoader(keys, batch_size=4, sampler=SeededEpochSampler(13, seed=0))
        assert len(loader) == len(list(loader)) == (4 if world[1] == 1 else 2)


class Module:
    device = torch.device("cpu")

    def __init__(self):
        self.trainer = SimpleNamespace(global_step=0, world_size=1, is_global_zero=True)
        self.trainer.loggers = []


def drive(monitor: SpeedMonitor, steps: int, seconds_per_step: float, monkeypatch) -> None:
    """Runs the monitor's hooks over `steps` steps of 4 samples on a fake clock."""
    clock = iter(range(10_000))
    monkeypatch.setattr(speed_module.time, "perf_counter", lambda: next(clock) * seconds_per_step)
    module = Module()
    monitor.on_train_start(module.trainer, module)
    for step in range(1, steps + 1):
        module.trainer.global_step = step
        monitor.on_train_batch_end(module.trainer, module, None, {"caption": ["a"] * 4}, step)
    monitor.on_train_end(module.trainer, module)


def test_perf_json_has_no_speed_when_the_run_ends_inside_its_warm_up(tmp_path, monkeypatch, caplog):
    out = tmp_path / "perf.json"
    with caplog.at_level(logging.WARNING):
        drive(SpeedMonitor(warmup_steps=10, out_file=str(out)), 15, 1.0, monkeypatch)
    perf = json.loads(out.read_text())
    assert perf["samples_per_s"] is None and perf["steps_done"] == 15
    assert "only 5 steps after the 10 warm-up steps" in perf["reason"]
    assert "the run ended inside its warm-up, at step 15" in caplog.text
    assert "trainer.max_time" in caplog.text


def test_perf_json_times_only_the_steps_after_the_warm_up(tmp_path, monkeypatch):
    out = tmp_path / "perf.json"
    drive(SpeedMonitor(warmup_steps=10, out_file=str(out)), 30, 0.5, monkeypatch)
    perf = json.loads(out.read_text())
    # 20 timed steps of 4 samples; the fake clock ticks once per reading
    assert perf["timed_samples"] == 80 and "reason" not in perf
    assert perf["samples_per_s"] == 80 / perf["timed_seconds"]


def test_perf_json_times_launch_to_the_end_of_the_first_step(tmp_path, monkeypatch):
    """What a user waits for before training moves: process start (imports, model load,
    compile) to the first optimizer step's end."""
    started = psutil.Process().create_time()
    out = tmp_path / "perf.json"
    monkeypatch.setattr(speed_module.time, "time", lambda: started + 42.0)
    drive(SpeedMonitor(warmup_steps=1, out_file=str(out)), 3, 0.5, monkeypatch)
    assert json.loads(out.read_text())["launch_to_first_step_s"] == pytest.approx(42.0)
