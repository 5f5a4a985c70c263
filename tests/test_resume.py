"""Resume, checkpoints and run folders: a killed run resumes exactly (twice), only a
checkpoint trained with the same settings is resumed, checkpoints are written whole and
loaded without running code, and every run gets a folder of its own."""

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, ROOT, compose_cfg
from lightning.fabric.utilities.types import _Stateful
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from sdft.checkpoints import (
    AtomicCheckpointIO,
    CheckpointLoadError,
    StepCheckpoint,
    load_checkpoint,
)
from sdft.data import sampler as sampler_module
from sdft.data.sampler import ResumableLoader, SeededEpochSampler
from sdft.runs import RunFolder, claim_run_dir, find_resume_checkpoint
from sdft.train import run


def task_cfg(tmp_path: Path, run_name: str, *overrides: str):
    """A FAST config whose run folder is tmp_path/train/<run_name>: `resume=true` looks in
    tmp_path/train/*/ (outputs/<task_name>/)."""
    cfg = compose_cfg([*FAST, *overrides], tmp_path / "train" / run_name)
    with open_dict(cfg):
        cfg.paths.output_root = str(tmp_path)
    return cfg


# -- kill, resume, kill, resume == uninterrupted -------------------------------------------
class KillAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt  # as if the job were killed


def killed_at(step, monkeypatch):
    from sdft.train import build as real

    def instantiate(node, *args, **kwargs):
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [*kwargs["callbacks"], KillAt(step)]
        return real(node, *args, **kwargs)

    monkeypatch.setattr("sdft.train.build", instantiate)


def ckpt_names(cfg) -> list[str]:
    return sorted(p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir())


def test_kill_resume_kill_resume_under_accumulation_equals_uninterrupted(tmp_path, monkeypatch):
    common = [
        "data.per_category=4",
        "data.batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=8",
        "callbacks.checkpoint.every_n_train_steps=2",
        "optim.lr=1e-2",
        "~callbacks.preview",
    ]  # 28 drawings / (2 x 2) = 7 steps an epoch: both kills are mid-epoch and mid-window
    full = run(task_cfg(tmp_path, "a_full", *common))

    first = task_cfg(tmp_path, "b_killed", *common)
    killed_at(3, monkeypatch)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(first)
    monkeypatch.undo()
    step2 = Path(first.paths.output_dir) / "checkpoints" / "step_000002.ckpt"
    second = task_cfg(tmp_path, "c_resumed", *common, f"ckpt_path={step2}")
    killed_at(5, monkeypatch)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(second)
    monkeypatch.undo()
    # the first micro-batch after the resume is mid-window: no second step_000002 there
    assert ckpt_names(second) == ["last.ckpt", "step_000004.ckpt"]
    state = load_checkpoint(Path(second.paths.output_dir) / "checkpoints" / "step_000004.ckpt")
    # 4 steps x 2 micro-batches x 2 drawings trained, as the sampler's state says
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "done": 16, "world_size": 1}
    ]
    # resume=true picks the newest run with these settings: the second one, at step 4
    third = task_cfg(tmp_path, "d_resumed", *common, "resume=true")
    resumed = run(third)

    a = load_file(full["output_dir"] / "pytorch_lora_weights.safetensors")
    b = load_file(resumed["output_dir"] / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # bit-identical on CPU up to float reassociation
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


class InterruptMidWindow(L.Callback):
    """Ctrl+C after the first micro-batch of the window that would make step `step`."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step - 1 and batch_idx % 2 == 0:
            raise KeyboardInterrupt


def test_ctrl_c_inside_an_accumulation_window_saves_a_checkpoint_that_resumes_exactly(
    tmp_path, monkeypatch
):
    common = [
        "data.per_category=4",
        "data.batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=6",
        "callbacks.checkpoint.every_n_train_steps=100",
        "optim.lr=1e-2",
        "~callbacks.preview",
    ]
    full = run(task_cfg(tmp_path, "a_full", *common))

    from sdft.train import build as real

    def instantiate(node, *args, **kwargs):
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [*kwargs["callbacks"], InterruptMidWindow(4)]
        return real(node, *args, **kwargs)

    monkeypatch.setattr("sdft.train.build", instantiate)
    cancelled = task_cfg(tmp_path, "b_cancelled", *common)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(cancelled)
    monkeypatch.undo()
    last = Path(cancelled.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = load_checkpoint(last)
    assert state["global_step"] == 3
    # 3 steps x 2 micro-batches x 2 drawings: the half window's micro-batch is not recorded
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "done": 12, "world_size": 1}
    ]
    resumed = run(task_cfg(tmp_path, "c_resumed", *common, f"ckpt_path={last}"))
    a = load_file(full["output_dir"] / "pytorch_lora_weights.safetensors")
    b = load_file(resumed["output_dir"] / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


# -- the sampler's state -------------------------------------------------------------------
def test_sampler_state_resumes_the_epoch_where_training_stopped_on_any_number_of_ranks(
    monkeypatch,
):
    whole = list(SeededEpochSampler(10, seed=5))
    s = SeededEpochSampler(10, seed=5)
    loader = ResumableLoader(range(10), batch_size=2, sampler=s)
    assert isinstance(loader, _Stateful)  # what Lightning saves in checkpoints
    for _ in range(3):  # 3 batches of 2 trained
        s.batch_trained(2)
    state = loader.state_dict()
    assert state == {"epoch": 0, "done": 6, "world_size": 1}

    again = SeededEpochSampler(10, seed=5)
    again.load_state_dict(state)
    again.set_epoch(0)  # Lightning sets the restored epoch again: the position stays
    assert list(again) == whole[6:]
    assert list(again) == whole  # one resume, then whole epochs

    monkeypatch.setattr(sampler_module, "world", lambda: (1, 2))  # resumed on 2 ranks
    rank1 = SeededEpochSampler(10, seed=5)
    rank1.load_state_dict(state)  # rank 1 takes every second sample after the first 6
    assert list(rank1) == whole[1::2][3:]
    assert rank1.units_trained() == 3

    later = SeededEpochSampler(10, seed=5)
    later.load_state_dict(state)
    later.set_epoch(1)  # a checkpoint at the epoch's end: the next epoch is whole
    assert len(list(later)) == 5 and later.units_trained() == 0


# -- which checkpoint resume=true takes ----------------------------------------------------
def fake_run(tmp_path: Path, name: str, *overrides: str, ckpts=("last.ckpt",)) -> Path:
    """A finished run's folder: its config.yaml and small checkpoints."""
    cfg = task_cfg(tmp_path, name, *overrides)
    out = Path(cfg.paths.output_dir)
    (out / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    for i, ckpt in enumerate(ckpts):
        torch.save({"global_step": i + 1, "sdft": {"method": "lora"}}, out / "checkpoints" / ckpt)
        os.utime(out / "checkpoints" / ckpt, (1000 + i, 1000 + i))
    return out


def test_resume_refuses_a_run_with_other_settings_naming_the_difference(tmp_path):
    fake_run(tmp_path, "old", "seed=1", "optim.lr=1e-4")
    with pytest.raises(ValueError, match=r"seed=1 there, seed=7 here.*resume=warm"):
        find_resume_checkpoint(task_cfg(tmp_path, "new", "seed=7", "optim.lr=1e-4", "resume=true"))
    with pytest.raises(ValueError, match=r"optim.lr=0.0001 there, optim.lr=0.001 here"):
        find_resume_checkpoint(task_cfg(tmp_path, "new", "seed=1", "optim.lr=1e-3", "resume=true"))
    # the same settings (num_workers aside): resumed; a warm start takes it whatever they are
    same = task_cfg(tmp_path, "new", "seed=1", "optim.lr=1e-4", "data.num_workers=1", "resume=true")
    assert find_resume_checkpoint(same)[1].parent.parent.name == "old"
    warm = task_cfg(tmp_path, "new", "seed=7", "resume=warm")
    assert find_resume_checkpoint(warm)[0]["global_step"] == 1


def test_resume_falls_back_from_a_broken_checkpoint_and_removes_partial_writes(tmp_path, caplog):
    out = fake_run(tmp_path, "old", ckpts=("step_000002.ckpt", "last.ckpt"))
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:40])  # a kill in the middle of the write
    os.utime(last, (2000, 2000))  # the newest
    orphan = out / "checkpoints" / ".step_000004.ckpt.partial-123"
    orphan.write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        checkpoint, path = find_resume_checkpoint(task_cfg(tmp_path, "new", "resume=true"))
    assert path.name == "step_000002.ckpt" and checkpoint["global_step"] == 1
    assert f"{last}: not a readable checkpoint" in caplog.text
    assert not orphan.exists() and "never finished" in caplog.text


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left


# -- loading never runs code ---------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling it would create the marker file
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_a_pickle_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "sdft": Payload(marker)}, evil)
    with pytest.raises(CheckpointLoadError, match=r"evil.ckpt: refused to load.*could run code"):
        load_checkpoint(evil)
    cfg = compose_cfg([*FAST, f"ckpt_path={evil}"], tmp_path / "run")
    with pytest.raises(CheckpointLoadError, match="evil.ckpt: refused"):
        run(cfg)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the guard is load_checkpoint's, not luck
        torch.load(evil, weights_only=True)
    assert not marker.exists()


# -- checkpoints only between steps, never non-finite -------------------------------------
class FakeTrainer:
    is_global_zero, loggers = True, []

    def __init__(self, module, step):
        self.lightning_module, self.global_step = module, step

    def save_checkpoint(self, path, weights_only=False):
        Path(path).write_bytes(b"checkpoint")


def test_step_checkpoint_saves_only_after_an_optimizer_step_with_finite_weights(tmp_path, caplog):
    module = torch.nn.Linear(2, 2)
    cb = StepCheckpoint(dirpath=tmp_path)
    trainer = FakeTrainer(module, step=2)
    cb._at_step_boundary = False  # a micro-batch that ended without an optimizer step
    cb._save_checkpoint(trainer, str(tmp_path / "mid.ckpt"))
    cb._at_step_boundary = True
    cb._save_checkpoint(trainer, str(tmp_path / "step2.ckpt"))
    trainer.global_step = 3
    cb._save_checkpoint(trainer, str(tmp_path / "step3.ckpt"))
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    trainer.global_step = 4
    with caplog.at_level(logging.WARNING):
        cb._save_checkpoint(trainer, str(tmp_path / "nan.ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2.ckpt", "step3.ckpt"]
    assert "nan.ckpt: the weights after step 4 are not finite" in caplog.text
    # the run stops on a NaN loss at step 3: the weights saved at step 3 gave it
    trainer.global_step = 3
    cb.on_exception(trainer, module, FloatingPointError("loss is nan"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2.ckpt"]


def test_a_run_stopped_by_a_nan_loss_keeps_no_checkpoint_of_the_blown_up_weights(tmp_path):
    # lr 1e6: step 1 is finite but moves every weight by ~1e6; step 2's loss is NaN
    cfg = task_cfg(tmp_path, "nan", "optim.lr=1e6", "callbacks.checkpoint.every_n_train_steps=1")
    with pytest.raises(FloatingPointError, match="loss is nan"):
        run(cfg)
    assert ckpt_names(cfg) == []  # step_000001 and last.ckpt held the weights that gave it
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_resume_checkpoint(task_cfg(tmp_path, "again", "resume=true"))


# -- run folders ---------------------------------------------------------------------------
def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    same_second = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00"
    first = claim_run_dir(same_second, explicit=False)
    second = claim_run_dir(same_second, explicit=False)
    assert (first.name, second.name) == ("2026-01-01_00-00-00", "2026-01-01_00-00-00_1")
    assert first.is_dir() and second.is_dir()
    # a folder the user names is theirs: used as named (if it holds no run), no suffix
    hydra_cfg = compose_hydra(f"hydra.run.dir={tmp_path / 'named'}")
    RunFolder().on_run_start(hydra_cfg)
    assert hydra_cfg.hydra.run.dir == str(tmp_path / "named") and (tmp_path / "named").is_dir()


def compose_hydra(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_an_existing_run_folder_is_refused_before_hydra_writes_into_it(tmp_path):
    old = tmp_path / "old_run"
    (old / ".hydra").mkdir(parents=True)
    record = {}
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (old / ".hydra" / name).write_text(f"the old run's {name}\n")
        record[name] = (old / ".hydra" / name).read_bytes()
    (old / "pytorch_lora_weights.safetensors").write_bytes(b"old adapter")
    cmd = [sys.executable, "train.py", "model=tiny", "trainer=cpu", f"hydra.run.dir={old}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "refusing to overwrite" in proc.stderr + proc.stdout
    for name, before in record.items():
        assert (old / ".hydra" / name).read_bytes() == before
    assert sorted(p.name for p in old.iterdir()) == [".hydra", "pytorch_lora_weights.safetensors"]
