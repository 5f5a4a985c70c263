"""What an exported file says about its training run, as kohya sd-scripts writes it.

Two families of safetensors header keys, every value a string:
  `modelspec.*`  Stability AI's ModelSpec, which kohya writes first: architecture
                 (`stable-diffusion-v1/lora`, also for LyCORIS files, as kohya's train_network
                 does), implementation, title, resolution (`512x512`), date, prediction type.
  `ss_*`         kohya's training record, which A1111's LoRA card shows: base model, network
                 (module, dim, alpha, args as a JSON object of strings), steps, epoch, batch,
                 learning rate, optimiser, schedule, precision, images and their tags.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

from diffusers import StableDiffusionPipeline
from omegaconf import DictConfig
from torch.utils.data import Dataset

MODELSPEC_VERSION = "1.0.1"  # the ModelSpec version kohya writes
ARCHITECTURES = {  # ss_base_model_version -> modelspec.architecture
    "sd_v1": "stable-diffusion-v1",
    "sd_v2_512": "stable-diffusion-v2-512",
    "sd_v2_768_v": "stable-diffusion-v2-768-v",
}
# kohya's ss_mixed_precision from Lightning's precision
MIXED_PRECISION = {"bf16-mixed": "bf16", "16-mixed": "fp16", "bf16-true": "bf16", "16-true": "fp16"}


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def base_model_version(pipe: StableDiffusionPipeline) -> str:
    """kohya's `ss_base_model_version`: SD2 has a 1024-wide text encoder (v-prediction at 768)."""
    if pipe.unet.config.cross_attention_dim != 1024:
        return "sd_v1"
    v = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    return "sd_v2_768_v" if v else "sd_v2_512"


def modelspec(
    pipe: StableDiffusionPipeline, title: str, textual_inversion: bool, run: dict
) -> dict[str, str]:
    """The `modelspec.*` keys kohya writes for an SD1.x/2.x LoRA or embedding."""
    v = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    adapter = "textual-inversion" if textual_inversion else "lora"
    res = run.get("resolution") or (768 if v else 512)
    finished = float(run.get("training_finished_at") or time.time())
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{ARCHITECTURES[base_model_version(pipe)]}/{adapter}",
        # kohya: diffusers-named keys for SD1/2 LoRA; embeddings are Stability's format
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models"
            if textual_inversion
            else "diffusers"
        ),
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }


def kohya_metadata(
    pipe: StableDiffusionPipeline, network: dict[str, object], run: dict | None
) -> dict[str, str]:
    """`modelspec.*` and `ss_*` keys as kohya sd-scripts writes them (strings only), from the
    method's `network` description and the run's record (`run_metadata`, base model, steps)."""
    run = run or {}
    version = base_model_version(pipe)
    res = run.get("resolution")
    args = network.get("network_args")
    network = {
        **network,  # kohya parses network args from "key=value" strings: values are strings
        "network_args": None if args is None else {k: str(v) for k, v in args.items()},
    }
    textual_inversion = network.get("network_module") == "textual_inversion"
    meta = {
        **modelspec(pipe, str(network.get("output_name")), textual_inversion, run),
        "ss_base_model_version": version,
        "ss_v2": str(version != "sd_v1"),
        "ss_sd_model_name": str(run.get("base_model", pipe.name_or_path)),
        "ss_resolution": f"({res}, {res})" if res else None,
        "ss_steps": run.get("steps"),
        "ss_training_comment": "trained with sdft",
        **{f"ss_{k}": v for k, v in run.items() if k not in ("base_model", "resolution", "steps")},
        **{f"ss_{k}": v for k, v in network.items()},
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None}


def training_captions(datamodule: object) -> tuple[list[str], str]:
    """The caption of every training image (as the first epoch sees it) and the name of
    the folder they come from (kohya's dataset directory)."""
    hp = getattr(datamodule, "hparams", {})
    folder = Path(str(hp.get("path") or hp.get("instance_dir") or "data")).name
    dataset = getattr(datamodule, "dataset", None)
    if isinstance(dataset, Dataset):
        return [dataset.caption((i, False)) for i in range(len(dataset))], folder
    instance = getattr(datamodule, "instance", None) or []  # DreamBooth: one prompt
    return [hp.get("instance_prompt", "")] * len(instance), folder


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's tag count: each caption split at commas, every tag counted once per image."""
    counts = Counter(t for c in captions for t in {s.strip() for s in c.split(",")} if t)
    return dict(counts.most_common())


def optimizer_name(optim: DictConfig) -> str:
    """kohya's `ss_optimizer`: the class and its arguments other than the learning rate."""
    args = ",".join(f"{k}={v}" for k, v in optim.items() if not k.startswith("_") and k != "lr")
    return f"{optim._target_}({args})"


def scheduler_name(lr_scheduler: DictConfig) -> str:
    """kohya's `ss_lr_scheduler`: `cosine`, `constant_with_warmup`, ..."""
    if "name" in lr_scheduler:
        return str(lr_scheduler.name)
    return re.sub(r"^get_|_schedule.*$", "", lr_scheduler._target_.rsplit(".", 1)[-1])


def epochs_seen(trainer: object | None, total_batch: int | None, images: int) -> int | None:
    """kohya's `ss_epoch`: the epoch training ended in, counting from 1 (a partial one too)."""
    if trainer is None or not total_batch or not images:
        return None
    return max(1, math.ceil(trainer.global_step * total_batch / images))


def run_metadata(
    cfg: DictConfig,
    out_dir: Path,
    trainer: object | None = None,
    datamodule: object | None = None,
    started_at: float | None = None,
) -> dict:
    """What a run's adapter files record about it, beside the base model and step count
    (which the module knows): settings from the config, the data, times and the epoch."""
    captions, folder = training_captions(datamodule) if datamodule else ([], "data")
    world = getattr(trainer, "world_size", 1)
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    batch = cfg.data.get("batch_size")
    precision = str(cfg.trainer.get("precision"))
    total = None if batch is None else batch * accumulate * world
    return {
        "resolution": cfg.data.get("resolution"),
        "max_train_steps": cfg.trainer.get("max_steps"),
        "seed": cfg.get("seed"),
        "dataset_hash": file_sha256(Path(out_dir) / "split.json"),
        "training_started_at": None if started_at is None else str(started_at),
        "training_finished_at": str(time.time()),
        "num_train_images": len(captions) if datamodule else None,
        "tag_frequency": {folder: tag_frequency(captions)} if datamodule else None,
        "dataset_dirs": {folder: {"n_repeats": 1, "img_count": len(captions)}}
        if datamodule
        else None,
        "learning_rate": str(cfg.optim.get("lr")),
        "optimizer": optimizer_name(cfg.optim),
        "lr_scheduler": scheduler_name(cfg.lr_scheduler),
        "mixed_precision": MIXED_PRECISION.get(precision, "no"),
        "epoch": epochs_seen(trainer, total, len(captions)),
        "clip_skip": "None",  # sdft uses the text encoder's last layer; kohya writes "None"
        "total_batch_size": total,
    }
