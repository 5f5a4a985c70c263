import os
from pathlib import Path

import pytest
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
]


def compose_cfg(overrides: list[str], out_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
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
