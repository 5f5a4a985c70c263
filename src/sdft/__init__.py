"""sdft: fine-tune Stable Diffusion with small adapters, evaluation built in."""

import os

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


if not OmegaConf.has_resolver("wandb_mode"):
    OmegaConf.register_new_resolver("wandb_mode", _wandb_mode)
