"""Every file in conf/experiment/ combines with every method and trains: a new experiment is
tested by being there."""

import csv
import math

import hydra
import numpy as np
import pytest
from conftest import ROOT, SAMPLE, TINY_EVAL
from omegaconf import OmegaConf
from PIL import Image

import sdft.train

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
# The tiny form of a run: the tiny model on the CPU, 64 px, 2 steps, small previews.
TINY_RUN = [
    "model=tiny",
    "trainer=cpu",
    "logger=csv",
    "data.resolution=64",
    "data.num_workers=0",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "callbacks.preview.num_inference_steps=2",
    "callbacks.preview.seeds=[0]",
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_leaves_every_method_its_own_settings_and_instantiates(
    make_cfg, experiment, method
):
    cfg = make_cfg(f"+experiment={experiment}", f"method={method}", fast=False)
    alone = make_cfg(f"method={method}", fast=False)
    # no key of the experiment's default method (a LoRA rank, alpha, targets) leaks into
    # another method: `+experiment=scribble method=textual_inversion` must build
    assert OmegaConf.to_container(cfg.method) == OmegaConf.to_container(alone.method)
    built = hydra.utils.instantiate(cfg.method)
    assert type(built).__name__ == cfg.method._target_.rsplit(".", 1)[1]


def test_scribble_keeps_the_papers_lora_rank_4_alpha_4(make_cfg):
    method = make_cfg("+experiment=scribble", fast=False).method
    assert (method.rank, method.alpha, method._target_) == (4, 4, "sdft.adapters.LoRAMethod")


def caption_folder(path):
    """Four real QuickDraw drawings as PNGs with one metadata.jsonl: a style-data stand-in."""
    path.mkdir()
    bitmaps = np.load(SAMPLE / "bitmap" / sorted(p.name for p in (SAMPLE / "bitmap").iterdir())[0])
    lines = []
    for i, bitmap in enumerate(bitmaps[:4]):
        Image.fromarray(255 - bitmap.reshape(28, 28)).convert("RGB").save(path / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "a drawing {i}"}}')
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_two_steps_and_writes_its_adapter(make_cfg, tmp_path, experiment):
    probe = make_cfg(f"+experiment={experiment}", *TINY_RUN, fast=False)
    extra = []
    if probe.data._target_.endswith("CaptionFolderDataModule"):
        extra.append(f"data.path={caption_folder(tmp_path / 'images')}")
    if probe.get("eval") is not None:  # its sweep at its smallest, with offline CLIP models
        extra += [o for o in TINY_EVAL if not o.startswith("+callbacks")]
    cfg = make_cfg(f"+experiment={experiment}", *TINY_RUN, *extra, fast=False)
    result = sdft.train.run(cfg)

    out = result["output_dir"]
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size > 1000
    assert (out / f"{experiment}.safetensors").is_file()  # output_name = task_name
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert max(steps) == 1  # steps 0 and 1: two optimiser steps
    assert math.isfinite(result["metrics"]["train/loss"])
    if probe.get("eval") is not None:  # its evaluation ran: 2 scales x 2 groups x 1 image
        assert result["metrics"]["eval/best_scale"] in (0.0, 1.0)
        assert (
            len(list(csv.DictReader(open(out / "eval" / "step_000002" / "scale_sweep.csv")))) == 2
        )
