import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import sdft  # noqa: F401  (registers the config resolvers)

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
