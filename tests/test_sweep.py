"""Sweeps: `train.py -m` grids and the Optuna search on the tiny model, run as a user runs them;
a failed trial is recorded and the sweep goes on; one summary per sweep, best trial first."""

import csv

import pytest
import yaml
from conftest import LOSS, ROOT, sweep
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from lightning import Trainer
from lightning.pytorch.strategies import DDPStrategy

from sdft.sweep import check_trainer_fits_sweep, run_trial


def final_logged_loss(trial_dir) -> float:
    rows = list(csv.DictReader(open(trial_dir / "csv" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r["train/loss"]][-1]


def test_grid_sweep_records_the_nan_trials_and_summarises_all_best_first(tmp_path):
    out = tmp_path / "grid"
    # lr 1e30 blows the adapter up at the first step: the next loss is not finite
    rows = sweep(
        "method.rank=2,4",
        "optim.lr=1e-3,1e30",
        "logger=default",  # W&B switched off, but its config (the group) still resolved
        "logger.wandb.mode=disabled",
        sweep_dir=out,
    )
    assert len(rows) == 4
    done, failed = rows[:2], rows[2:]
    assert [(r["status"], r["rank"]) for r in done] == [("completed", "1"), ("completed", "2")]
    assert float(done[0]["train/loss"]) <= float(done[1]["train/loss"])  # minimised: best first
    assert {(r["method.rank"], r["optim.lr"]) for r in done} == {("2", "0.001"), ("4", "0.001")}
    for r in done:  # the trial's objective is the loss its run logged last
        assert float(r["train/loss"]) == pytest.approx(final_logged_loss(out / r["folder"]))
    for r in failed:
        assert r["status"] == "failed" and float(r["optim.lr"]) == 1e30 and r["rank"] == ""
        assert r["error"].startswith("FloatingPointError: loss is ")
        assert "stopping (lower optim.lr" in r["error"]

    md = (out / "summary.md").read_text()
    assert "4 trials, 2 failed" in md and md.count("\n| ") == 5  # header + 4 trials
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"

    configs = [yaml.safe_load(open(out / r["folder"] / "config.yaml")) for r in rows]
    wandb = [c["logger"]["wandb"] for c in configs]
    assert {w["group"] for w in wandb} == {f"train/{out.name}"}  # one W&B group per sweep
    assert len({w["name"] for w in wandb}) == 4  # one W&B run per trial


def test_optuna_sweep_goes_on_after_a_broken_trial_and_minimises(tmp_path):
    out = tmp_path / "optuna"
    # the real search space of scribble_optuna, 2 steps per trial instead of its 1000s;
    # trial 0 gets batch_size 0, which the data loader refuses
    rows = sweep(
        "hparams_search=scribble_optuna",
        "hydra.sweeper.n_trials=3",
        "trainer.max_steps=2",
        "data.batch_size=${hydra:job.num}",
        sweep_dir=out,
    )
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    broken = rows[2]
    assert broken["job"] == "0" and broken["error"].startswith("ValueError: batch_size should be")
    best = yaml.safe_load(open(out / "optimization_results.yaml"))
    assert best["best_value"] == pytest.approx(float(rows[0]["train/loss"]))
    assert float(rows[0]["train/loss"]) <= float(rows[1]["train/loss"])
    searched = {"method.rank", "method.alpha", "optim.lr", "method.target_modules"}
    assert searched | {"method.attention"} <= set(rows[0])  # one column per searched parameter
    for r in rows[:2]:  # what Optuna chose is what the trial trained with
        cfg = yaml.safe_load(open(out / r["folder"] / "config.yaml"))
        assert cfg["method"]["rank"] == int(r["method.rank"])
        assert cfg["optim"]["lr"] == pytest.approx(float(r["optim.lr"]))
        assert cfg["trainer"]["max_steps"] == 2
    assert "3 trials, 1 failed" in (out / "summary.md").read_text()
    assert (out / "summary.png").is_file()


def test_scribble_optuna_searches_rank_alpha_lr_steps_and_target_layers(make_cfg):
    sweeper = hydra_node("hparams_search=scribble_optuna").sweeper
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed
    assert set(space) == {
        "method.rank",
        "method.alpha",
        "optim.lr",
        "trainer.max_steps",
        "method.target_modules",
        "method.attention",
    }
    assert "[to_k,to_v]" in space["method.target_modules"].choices  # reaches the trial as a list
    assert type(space["optim.lr"]).__name__ == "LogUniformDistribution"  # optuna 2.10
    assert sweeper.direction == "maximize" and sweeper.max_failure_rate == 1.0
    assert make_cfg("hparams_search=scribble_optuna").optimized_metric == "eval/clip_img_cos_best"


def hydra_node(*overrides: str):
    """The `hydra` part of the composed config (which make_cfg drops)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the paths
    return cfg.hydra


def test_slurm_launcher_config_builds_the_submitit_launcher_one_task_per_gpu():
    hc = hydra_node("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4")
    launcher = instantiate(hc.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["tasks_per_node"] == 4 and launcher.params["gpus_per_node"] == 4


def test_ddp_that_would_rerun_the_sweep_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr("sdft.sweep.in_sweep", lambda: True)
    popen = Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(), logger=False)
    with pytest.raises(ValueError, match="start_method=spawn"):
        check_trainer_fits_sweep(popen)
    spawn = DDPStrategy(start_method="spawn")  # spawned processes do not rerun the command line
    check_trainer_fits_sweep(Trainer(accelerator="cpu", devices=2, strategy=spawn, logger=False))


def test_outside_a_sweep_the_metric_is_returned_and_errors_propagate(make_cfg):
    cfg = make_cfg(*LOSS)

    def boom(cfg):
        raise FloatingPointError("loss is nan")

    assert run_trial(lambda cfg: {"metrics": {"train/loss": 0.25}}, cfg) == 0.25
    assert run_trial(lambda cfg: {"metrics": {}}, cfg) is None  # e.g. no evaluator in this run
    with pytest.raises(FloatingPointError):
        run_trial(boom, cfg)
    with pytest.raises(ValueError, match="optimized_direction='up'"):
        run_trial(boom, make_cfg("optimized_direction=up"))
