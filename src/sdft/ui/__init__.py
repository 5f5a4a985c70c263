"""The web UI (`python ui.py`): forms -> Hydra overrides -> a `train.py` child process."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sdft.ui.form import TrainForm

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def base_overrides(cfg: DictConfig, model_choice: str, model_overrides: list[str]) -> list[str]:
    """What every training started from this page gets before the form's overrides: the
    page's model, the CPU when there is no GPU, the tiny CLIP models for the tiny model."""
    out = [f"model={model_choice}", *model_overrides]
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    out.append("trainer=cpu" if on_cpu else "trainer=gpu")  # gpu: bf16-mixed, as the recipes
    if model_choice == "tiny":
        out.append("eval=tiny")  # the paper's CLIP models are a download; tiny ones are built
    return out + list(cfg.train_overrides)


def default_form(model_choice: str) -> TrainForm:
    """The tiny CPU model trains at 64 px in minutes; real models at 512."""
    if model_choice == "tiny":
        return TrainForm(resolution=64, steps=100, preview_every=25)
    return TrainForm()


def warn_if_exposed(cfg: DictConfig) -> str | None:
    if cfg.share or cfg.host not in LOCAL_HOSTS:
        where = "a public gradio.live link" if cfg.share else f"{cfg.host}:{cfg.port}"
        msg = (
            f"WARNING: the UI is reachable at {where}: anyone with the address can train on "
            "this machine and read the images and adapters in its workspace"
            + ("" if cfg.auth else " (set auth=[user,password])")
        )
        print(msg, flush=True)
        return msg
    return None


def run(cfg: DictConfig) -> None:
    """Build the page from `conf/ui.yaml` and serve it until Ctrl+C."""
    from sdft.generate import prepare_pipeline
    from sdft.ui.actions import App
    from sdft.ui.app import CSS, build

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    hc = HydraConfig.get()
    choice = hc.runtime.choices["model"]
    model_overrides = [
        o for o in hc.overrides.task if o.startswith(("model.", "+model.", "~model."))
    ]
    workspace = Path(cfg.workspace).expanduser().resolve()
    gen_cfg = OmegaConf.create({"model": cfg.model, "device": "auto", "sampler": "dpmpp_2m",
                                "embeddings": [], "merge_to": None})  # fmt: skip
    app = App(
        workspace,
        base_overrides(cfg, choice, model_overrides),
        default_form(choice),
        lambda: prepare_pipeline(gen_cfg),
    )
    atexit.register(app.jobs.shutdown)  # a running training is cancelled (and saved) on exit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM too runs atexit
    warn_if_exposed(cfg)
    page = build(app)
    page.queue(default_concurrency_limit=2).launch(
        server_name=cfg.host,
        server_port=cfg.port,
        share=cfg.share,
        auth=tuple(cfg.auth) if cfg.auth else None,
        allowed_paths=[str(workspace)],
        inbrowser=False,
        css=CSS,
    )
