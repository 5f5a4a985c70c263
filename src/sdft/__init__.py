"""sdft: fine-tune Stable Diffusion with small adapters, evaluation built in."""

import os

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


def _wandb_mode() -> str:
    # online when the user is logged in (API key or netrc entry), offline otherwise
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read():
        return "online"
    return "offline"


def _launch_dir() -> str:
    # Hydra's runtime.cwd (where train.py was started). `${hydra:runtime.cwd}` cannot be used in
    # paths: a sweep's launcher and sweeper read hydra.sweep.dir (which goes through paths)
    # before Hydra sets HydraConfig, and `python train.py -m ...` stopped with "HydraConfig was
    # not set". Hydra records runtime.cwd as os.getcwd() and never changes directory (chdir:
    # false), so before the jobs start the process's directory is the same folder.
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


if not OmegaConf.has_resolver("wandb_mode"):
    OmegaConf.register_new_resolver("wandb_mode", _wandb_mode)
if not OmegaConf.has_resolver("sdft.launch_dir"):
    OmegaConf.register_new_resolver("sdft.launch_dir", _launch_dir)
