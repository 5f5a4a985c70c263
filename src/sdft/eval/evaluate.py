"""`python evaluate.py adapter=...`: the scale sweep of a saved adapter or checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, open_dict
from safetensors import SafetensorError, safe_open

from sdft.adapters.load import (
    check_finite,
    is_embedding,
    load_adapter,
    read_safetensors,
)
from sdft.checkpoints import load_checkpoint
from sdft.eval.results import log_results, write_results
from sdft.generate import load_embedding, resolve_file
from sdft.module import AdapterFineTuner, check_checkpoint
from sdft.run_folder import read_run_config
from sdft.train import build

log = logging.getLogger(__name__)


def run_dir_of(adapter: Path) -> Path:
    """The training run folder an adapter path belongs to (a .ckpt sits in checkpoints/)."""
    if adapter.is_dir():
        return adapter
    return adapter.parent.parent if adapter.suffix == ".ckpt" else adapter.parent


def take_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """Use the run's own model, method and data settings (its resolved config.yaml), so that
    the base model, the resolution and the category split are the ones it was trained with.
    Values only: each part's class must be one of sdft's own options (`read_run_config`)."""
    run_cfg = read_run_config(run_dir)
    if run_cfg is None:
        return
    with open_dict(cfg):
        for group, node in run_cfg.items():
            cfg[group] = node
    log.info("model, method and data settings from %s", run_dir / "config.yaml")


def adapter_step(path: Path) -> int:
    """The training step an adapter was saved at: its `ss_steps` metadata or, for diffusers'
    file (which has none), that of the kohya file saved beside it. Never a checkpoint's
    `global_step`: reading that means unpickling a file that was not asked for."""
    for f in [path, *sorted(path.parent.glob("*.safetensors"))]:
        try:
            with safe_open(str(f), "pt") as st:
                steps = (st.metadata() or {}).get("ss_steps")
        except (SafetensorError, OSError):
            continue
        if steps is not None and steps.isdigit():
            return int(steps)
    log.warning("%s records no training step (ss_steps): logging at step 0", path)
    return 0


def load_adapter_pipeline(cfg: DictConfig) -> tuple[StableDiffusionPipeline, int]:
    """The base pipeline with the adapter loaded (DPM++ 2M), and the adapter's training step.

    A .ckpt goes through the training module (any method; checked against the base model);
    a run folder or .safetensors file of any method goes through generate.py's loader, with
    its checks (format, architecture, shapes, finite values)."""
    path = Path(cfg.adapter).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"adapter={str(path)!r}: no such file or folder")
    if path.suffix == ".ckpt":
        ckpt = load_checkpoint(path)  # weights_only: a file that would run code is refused
        pipe = build(cfg.model)
        module = AdapterFineTuner(pipe, build(cfg.method), optimizer=None, lr_scheduler=None)
        check_checkpoint(ckpt.get("sdft"), module.identity, str(path))
        check_finite(ckpt["state_dict"], str(path))
        unexpected = module.load_state_dict(ckpt["state_dict"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(
                f"adapter={str(path)!r} holds weights this method lacks: {unexpected[:3]}"
            )
        return module.inference_pipeline(), int(ckpt.get("global_step", 0))
    file = resolve_file(path)
    tensors, _ = read_safetensors(file)  # checked before the base model is built
    pipe = build(cfg.model)
    if is_embedding(tensors):
        log.info("embedding %s -> token %s", file, load_embedding(pipe, file))
    else:
        load_adapter(pipe, file, "evaluated")  # not the file's name: `train` is a Module method
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe, adapter_step(file)


def check_split(split: dict, saved: Path) -> None:
    """The data settings must give the run's own split: same trained and held-out categories."""
    if not saved.is_file():
        log.warning("no %s: categories come from the data settings alone", saved)
        return
    run_split = json.loads(saved.read_text())
    for key in ("trained", "held_out"):
        if list(run_split[key]) != list(split[key]):
            raise ValueError(
                f"the data settings give other {key} categories than {saved} "
                f"({split[key][:3]}... vs {run_split[key][:3]}...): evaluate with the run's "
                "data settings (from_run=true, or the same data.* and seed overrides)"
            )


def run(cfg: DictConfig) -> dict:
    """Evaluate `cfg.adapter`; write the results to the output folder and the loggers."""
    out = Path(cfg.paths.output_dir)
    adapter = Path(cfg.adapter).expanduser()
    run_dir = run_dir_of(adapter)
    if cfg.from_run:
        take_run_config(cfg, run_dir)
    datamodule = build(cfg.data)  # checked before any model is loaded
    datamodule.setup("fit")
    check_split(datamodule.split, run_dir / "split.json")
    evaluator = build(cfg.eval)
    evaluator.load_models()

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else default_dtype
    pipe, step = load_adapter_pipeline(cfg)
    pipe.to(device)
    if dtype != pipe.dtype:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)

    result = evaluator.evaluate(pipe, datamodule)
    files = write_results(result, out)
    loggers = [build(lg) for lg in cfg.get("logger", {}).values() if lg]
    log_results(result, loggers, step, files)
    for lg in loggers:
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()  # flush the offline run to disk (`wandb sync` it later)
    metrics = result.metrics()
    print(f"\nsdft: evaluated {adapter} -> {out}")
    print(f"  best scale {metrics['eval/best_scale']:g}: image cosine "
          f"{metrics['eval/clip_img_cos_best']:.4f} ({result.images} images, "
          f"{result.seconds:.1f} s, {result.images / result.seconds:.2f} images/s)")  # fmt: skip
    return {
        "output_dir": out,
        "metrics": metrics,
        "result": result,
        "step": step,
        "pipeline": pipe,  # with the adapter loaded, for more figures
        "evaluator": evaluator,
    }
