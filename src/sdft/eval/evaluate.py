"""`python evaluate.py adapter=...`: the scale sweep of a saved adapter or checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from sdft.eval.results import log_results, write_results
from sdft.module import AdapterFineTuner, check_checkpoint
from sdft.train import build

log = logging.getLogger(__name__)
LORA_FILE = "pytorch_lora_weights.safetensors"


def run_dir_of(adapter: Path) -> Path:
    """The training run folder an adapter path belongs to (a .ckpt sits in checkpoints/)."""
    if adapter.is_dir():
        return adapter
    return adapter.parent.parent if adapter.suffix == ".ckpt" else adapter.parent


def take_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """Use the run's own model, method and data settings (its resolved config.yaml), so that
    the base model, the resolution and the category split are the ones it was trained with."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    run_cfg = OmegaConf.load(saved)
    with open_dict(cfg):
        for group in ("model", "method", "data"):
            if group in run_cfg:
                cfg[group] = run_cfg[group]
    log.info("model, method and data settings from %s", saved)


def load_adapter_pipeline(cfg: DictConfig) -> tuple[StableDiffusionPipeline, int]:
    """The base pipeline with the adapter loaded (DPM++ 2M), and the adapter's training step.

    A .ckpt goes through the training module (any method; checked against the base model);
    a folder or .safetensors file is diffusers' LoRA format, read by `load_lora_weights`."""
    path = Path(cfg.adapter).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"adapter={str(path)!r}: no such file or folder")
    pipe = build(cfg.model)
    if path.suffix == ".ckpt":
        module = AdapterFineTuner(pipe, build(cfg.method), optimizer=None, lr_scheduler=None)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        check_checkpoint(ckpt.get("sdft"), module.identity, str(path))
        unexpected = module.load_state_dict(ckpt["state_dict"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(
                f"adapter={str(path)!r} holds weights this method lacks: {unexpected[:3]}"
            )
        return module.inference_pipeline(), int(ckpt.get("global_step", 0))
    folder, name = (path, LORA_FILE) if path.is_dir() else (path.parent, path.name)
    pipe.load_lora_weights(str(folder), weight_name=name)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    last = run_dir_of(path) / "checkpoints" / "last.ckpt"  # the step the adapter was saved at
    step = (
        torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        if last.is_file()
        else 0
    )
    return pipe, int(step)


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
