"""`python train.py ...`: validate the inputs, build each part from the config, fit, export."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from sdft.adapters.export import run_metadata
from sdft.module import AdapterFineTuner, check_checkpoint
from sdft.perf import FastPath
from sdft.sweep import check_trainer_fits_sweep

log = logging.getLogger(__name__)
RUN_ARTIFACTS = ("checkpoints", "pytorch_lora_weights.safetensors", "split.json", "csv", "previews")


def build(node: DictConfig, **kwargs):
    """`hydra.utils.instantiate`, but a bad value's own error (which names the key) comes
    out as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, OSError)):
            raise e.__cause__ from None
        raise


def check_fresh_output_dir(out: Path) -> None:
    taken = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if taken:
        raise FileExistsError(
            f"output directory {out} already holds a run ({', '.join(taken)}); "
            "refusing to overwrite it: pick another hydra.run.dir"
        )


def find_latest_checkpoint(runs_dir: Path) -> Path:
    ckpts = sorted(runs_dir.glob("*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(f"resume=true but no checkpoint under {runs_dir}/*/checkpoints/")
    return ckpts[-1]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    if cfg.resume and cfg.ckpt_path is None:
        return str(find_latest_checkpoint(Path(cfg.paths.output_root) / cfg.task_name))
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such file")
    return cfg.ckpt_path


def merge_accumulation(cfg: DictConfig, fast_path: FastPath) -> None:
    """batch b x accumulation k -> one micro-batch of b*k on the GPU: the same effective
    batch and gradient (the mean over b*k samples) in k times fewer, fuller steps."""
    k = cfg.trainer.accumulate_grad_batches
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if fast_path.merge_accumulation and k > 1 and (on_gpu or fast_path.force):
        with open_dict(cfg):
            cfg.data.batch_size = cfg.data.batch_size * k
            cfg.trainer.accumulate_grad_batches = 1
        log.info("fast path: micro-batch %d without accumulation", cfg.data.batch_size)


def finish_wandb(trainer: L.Trainer) -> None:
    """Close this run's W&B run, failed or not: the next run in this process (a sweep's next
    trial, an evaluation) must start its own rather than log into this one."""
    if trainer.is_global_zero and any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def run(cfg: DictConfig) -> dict:
    """Train an adapter as `cfg` says; return the run's output paths and final metrics."""
    out = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:  # DDP ranks > 0 start after rank 0 has written here
        check_fresh_output_dir(out)
    ckpt_path = resolve_ckpt_path(cfg)
    L.seed_everything(cfg.seed, workers=True)

    fast_path = build(cfg.perf)
    merge_accumulation(cfg, fast_path)
    # cheap checks first: the data is validated before any model is loaded
    datamodule: L.LightningDataModule = build(cfg.data)
    datamodule.setup("fit")
    method = build(cfg.method)
    loss = build(cfg.loss)
    validation = build(cfg.val) if cfg.get("val") else None
    schedule = build(cfg.model, _target_="sdft.models.pipeline.training_schedule")
    if schedule is not None:  # the model's timesteps, read without its weights
        loss.check(schedule)
        if validation is not None:
            validation.check(schedule.config.num_train_timesteps)

    log.info("loading base model %s", cfg.model.get("pretrained", cfg.model.get("arch")))
    pipeline = build(cfg.model)
    if hasattr(datamodule, "prepare_cache"):  # data.cache=true: encoded once, inside fit
        datamodule.prepare_cache(pipeline)
    module = AdapterFineTuner(
        pipeline=pipeline,
        method=method,
        optimizer=build(cfg.optim),
        lr_scheduler=build(cfg.lr_scheduler),
        seed=cfg.seed,
        loss=loss,
        fast_path=fast_path,
    )
    if ckpt_path:
        meta = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("sdft")
        check_checkpoint(meta, module.identity, ckpt_path)

    callbacks = [build(c) for c in cfg.get("callbacks", {}).values() if c]
    callbacks += [validation] if validation is not None else []
    loggers = [build(lg) for lg in cfg.get("logger", {}).values() if lg]
    profiler = build(cfg.profiler) if cfg.get("profiler") else None
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers, profiler=profiler)
    check_trainer_fits_sweep(trainer)

    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        datamodule.save_split(out)
        for lg in trainer.loggers:  # the whole config of each run (each sweep trial) in W&B
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        files = module.save_adapter(out, run_metadata(cfg, out)) if trainer.is_global_zero else []
    finally:
        finish_wandb(trainer)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print(f"\nsdft: outputs in {out}")
        for f in files:
            print(f"  adapter      {f} ({f.stat().st_size / 1e6:.2f} MB)")
        print(f"  checkpoints  {out / 'checkpoints'}")
    return {"output_dir": out, "adapter_files": files, "metrics": metrics}
