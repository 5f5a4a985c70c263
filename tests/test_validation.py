"""Validation loss: fixed timesteps, fixed noise, held-out data; logged, deterministic, and
usable as the checkpoint monitor and the sweep's objective."""

import csv

import lightning as L
import pytest
import yaml
from conftest import FAST, caption_folder, dm_for, sweep

from sdft.checkpoints import load_checkpoint
from sdft.eval.validation import ValidationLoss
from sdft.module import AdapterFineTuner
from sdft.optim import split_optim_config
from sdft.train import build, run

TIMESTEPS = [100, 300, 500, 700, 900]
PER_T = [f"val/loss_t{t}" for t in TIMESTEPS]


def logged(out) -> list[dict]:
    (metrics,) = out.rglob("metrics.csv")
    return list(csv.DictReader(metrics.open()))


def val_rows(out, key="val/loss") -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in logged(out) if r.get(key)}


def test_val_loss_is_logged_every_n_steps_and_at_the_end_per_timestep_and_split(make_cfg):
    cfg = make_cfg("val.every_n_steps=2", "trainer.max_steps=5", "optim.lr=1e-2")
    result = run(cfg)
    held_out, trained = (
        val_rows(result["output_dir"]),
        val_rows(result["output_dir"], "val/loss_trained"),
    )
    assert sorted(held_out) == sorted(trained) == [2, 4, 5]
    row = next(r for r in logged(result["output_dir"]) if r.get("val/loss") and r["step"] == "5")
    per_t = [float(row[k]) for k in PER_T]
    assert float(row["val/loss"]) == pytest.approx(sum(per_t) / 5)
    assert all(float(row[k.replace("loss", "loss_trained")]) > 0 for k in PER_T)
    assert len(set(held_out.values())) == 3  # the weights changed, so did the number
    assert result["metrics"]["val/loss"] == pytest.approx(held_out[5])


def test_same_weights_give_the_same_val_loss_twice_and_from_a_fresh_callback(make_cfg):
    cfg = make_cfg("trainer.max_steps=2", "optim.lr=1e-2")
    datamodule = build(cfg.data)
    optimizer = build(split_optim_config(cfg.optim)[0])  # loraplus_ratio is the module's
    module = AdapterFineTuner(build(cfg.model), build(cfg.method), optimizer,
                              build(cfg.lr_scheduler), loss=build(cfg.loss))  # fmt: skip
    val = build(cfg.val)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[val], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    at_end = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    first, second = val.evaluate(trainer, module), val.evaluate(trainer, module)
    fresh = ValidationLoss(timesteps=TIMESTEPS, seed=0, batch_size=4).evaluate(trainer, module)
    assert first == second == fresh
    assert at_end == pytest.approx(first, rel=1e-6)  # callback_metrics hold float32 tensors
    assert {"val/loss", "val/loss_trained", *PER_T} <= set(first)
    other_noise = ValidationLoss(timesteps=TIMESTEPS, seed=1, batch_size=4)
    assert other_noise.evaluate(trainer, module)["val/loss"] != first["val/loss"]
    # the held-out slice of the trained categories never overlaps the training drawings
    train_keys = {(d.source, d.index) for d in datamodule.dataset.drawings}
    assert not train_keys & {(d.source, d.index) for d in datamodule.val_trained}
    assert len(datamodule.val_trained) == 2 * len(datamodule.split["trained"])


def test_checkpoint_monitor_on_val_loss_keeps_the_best_adapter(make_cfg):
    cfg = make_cfg(
        "trainer.max_steps=5",
        "optim.lr=3e-2",
        "callbacks.checkpoint.every_n_train_steps=1",  # validated at each: val.every_n_steps=0
        "callbacks.checkpoint.monitor=val/loss",
        "callbacks.checkpoint.save_top_k=1",
    )
    out = run(cfg)["output_dir"]
    losses = val_rows(out)
    best_step = min(losses, key=losses.get)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*.ckpt"))
    assert kept == [f"step_{best_step:06d}.ckpt"], (losses, kept)
    ckpt = load_checkpoint(out / "checkpoints" / kept[0])
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("StepCheckpoint")]
    assert state["best_model_score"].item() == pytest.approx(losses[best_step])  # this step's


def test_optuna_sweep_minimises_val_loss(tmp_path):
    out = tmp_path / "optuna"
    rows = sweep(
        "hparams_search=scribble_optuna",
        "hydra.sweeper.n_trials=2",
        "optimized_metric=val/loss",
        "optimized_direction=minimize",
        sweep_dir=out,
    )
    assert [r["status"] for r in rows] == ["completed", "completed"]
    values = sorted(float(r["val/loss"]) for r in rows)
    best = yaml.safe_load(open(out / "optimization_results.yaml"))
    assert best["best_value"] == pytest.approx(values[0])


def test_caption_folder_val_fraction_holds_out_a_seeded_share(tmp_path):
    root = caption_folder(tmp_path / "imgs", n=6)  # 7 images with the one in sub/
    dm = dm_for(root, val_fraction=0.3)
    held = dm.val_datasets()["held_out"]
    assert len(held) == 2 and len(dm.dataset) == 5  # round(0.3 x 7)
    assert not set(held.images) & set(dm.dataset.images)
    assert held.images == dm_for(root, val_fraction=0.3).val_datasets()["held_out"].images
    assert dm_for(root).val_datasets() == {}


def test_caption_folder_val_path_validates_on_another_folder(tmp_path):
    root, other = caption_folder(tmp_path / "a", n=3), caption_folder(tmp_path / "b", n=2)
    dm = dm_for(root, val_path=str(other))
    held = dm.val_datasets()["held_out"]
    assert len(dm.dataset) == 4 and len(held) == 3
    assert all(p.startswith(str(other)) for p in held.images)
    assert held.caption((0, False)) in {"photo 0", "photo 1", "sub photo"}


# -- bad input: clear errors before the model loads ----------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("sdft.models.build_random_pipeline", refuse)


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.type=l1", "loss.type='l1' must be one of"),
        ("loss.timestep_sampling=cosmap", "loss.timestep_sampling='cosmap' must be one of"),
        ("loss.timestep_min=600", "loss.timestep_min=600 must be >= 0 and below"),
        ("loss.snr_gamma=0", "loss.snr_gamma=0 must be > 0"),
        ("loss.timestep_max=1001", "loss.timestep_max=1001 is past the scheduler's"),
        ("val.timesteps=[100,1000]", r"val.timesteps \[1000\] are outside the scheduler's range"),
        ("val.timesteps=[-1]", "val.timesteps=.-1. must be non-negative"),
    ],
)
def test_bad_loss_and_val_settings_fail_before_the_model_loads(
    make_cfg, no_model_load, override, message
):
    extra = ["loss.timestep_max=500"] if "timestep_min" in override else []
    with pytest.raises(ValueError, match=message):
        run(make_cfg(override, *extra))


def test_val_fraction_leaving_no_training_images_fails_before_the_model_loads(
    make_cfg, no_model_load, tmp_path
):
    root = caption_folder(tmp_path / "imgs", n=1)  # 2 images
    not_quickdraw = [o for o in FAST if not o.startswith("data.")]
    cfg = make_cfg("data=caption_jsonl", f"data.path={root}", "data.val_fraction=0.9",
                   "data.resolution=64", *not_quickdraw, fast=False)  # fmt: skip
    with pytest.raises(ValueError, match="data.val_fraction=0.9 of 2 images .* leaves no training"):
        run(cfg)
