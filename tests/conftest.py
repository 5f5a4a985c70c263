import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

import sdft  # noqa: F401  (registers the config resolvers)
from sdft.data.caption_folder import CaptionFolderDataModule

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "quickdraw"
SHARED = ROOT.parent / "shared" / "data" / "quickdraw"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A small, fast run of the real configs: tiny model, 64 px, few drawings, CSV logging.
FAST = [
    "model=tiny",
    "trainer=cpu",
    "logger=csv",
    "data.resolution=64",
    "data.num_workers=0",
    "data.num_categories=10",
    "data.per_category=2",
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.max_epochs=-1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.preview.num_inference_steps=2",
    "callbacks.preview.seeds=[0]",
    "~callbacks.scale_sweep",  # tests that want it add TINY_EVAL
]
# With FAST, the scale-sweep evaluator back, at its smallest: random tiny CLIP models, 2 scales,
# 1 image of 1 category per group and scale.
TINY_EVAL = [
    "+callbacks.scale_sweep=${eval}",
    "eval=tiny",
    "eval.scales=[0.0,1.0]",
    "eval.num_prompts=1",
    "eval.seeds=[0]",
    "eval.num_inference_steps=2",
]


def compose_cfg(overrides: list[str], out_dir: Path, config_name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_root = str(out_dir.parent)
        cfg.paths.output_dir = str(out_dir)
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(*overrides, run="run") -> the composed train config writing to tmp_path/run."""

    def _make(*overrides: str, run: str = "run", fast: bool = True) -> DictConfig:
        return compose_cfg([*(FAST if fast else []), *overrides], tmp_path / run)

    return _make


def unet_out(unet, seed: int = 0) -> torch.Tensor:
    """The tiny UNet's output for fixed random latents, timesteps and text states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)  # (B, 4, h, w)
    text = torch.randn(2, 77, 32, generator=g)  # (B, 77, D)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample


# -- helpers shared by several test files (tests never import each other) ------------
SHORT = ["trainer.max_steps=2", "callbacks.preview=null"]  # each trial: 2 steps, no preview


LOSS = ["optimized_metric=train/loss", "optimized_direction=minimize"]


def sweep(*overrides: str, sweep_dir) -> list[dict]:
    """Run `python train.py -m ...` and return its summary.csv rows."""
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *FAST,
        *SHORT,
        *LOSS,
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return list(csv.DictReader(open(sweep_dir / "summary.csv")))


def save_image(path: Path, width: int, height: int, value: int = 128) -> Path:
    """An RGB image: left half black, right half `value` (so crops and flips show)."""
    a = np.full((height, width, 3), value, np.uint8)
    a[:, : width // 2] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def caption_folder(root: Path, n: int = 4, size=(64, 64)) -> Path:
    """n images with metadata.jsonl, one more image in sub/ with its own metadata.jsonl."""
    for i in range(n):
        save_image(root / f"img{i}.png", *size, value=40 * i)
    write_jsonl(root / "metadata.jsonl", [{"file_name": f"img{i}.png", "text": f"photo {i}"}
                                          for i in range(n)])  # fmt: skip
    save_image(root / "sub" / "x.png", *size)
    write_jsonl(root / "sub" / "metadata.jsonl", [{"file_name": "x.png", "text": "sub photo"}])
    return root


def dm_for(path, **kw) -> CaptionFolderDataModule:
    dm = CaptionFolderDataModule(str(path), **{"resolution": 64, "batch_size": 2, **kw})
    dm.setup()
    return dm


def bucket_folder(root: Path) -> Path:
    sizes = [(128, 128), (256, 128), (128, 256), (192, 128), (128, 128), (400, 200), (70, 300)]
    for i, (w, h) in enumerate(sizes):
        save_image(root / f"{i}.png", w, h)
    return root


def generate_cfg(tmp_path, run, *overrides):
    return compose_cfg(
        [
            "model=tiny",
            "prompts=['a scribble of apple','a scribble of a cat']",
            "negative_prompt=''",
            "steps=2",
            "seeds=[0,1]",
            "batch_size=2",
            "resolution=32",
            "device=cpu",
            f"lora_dir={tmp_path / 'Lora'}",
            f"out_dir={tmp_path / run}",
            *overrides,
        ],
        tmp_path / run,
        config_name="generate",
    )
