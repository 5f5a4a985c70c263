"""`python train.py ...`: validate the inputs, build each part from the config, fit, export."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from sdft.adapters.metadata import run_metadata
from sdft.checkpoints import AtomicCheckpointIO, load_checkpoint
from sdft.ema import find_ema
from sdft.module import AdapterFineTuner, check_checkpoint
from sdft.optim import check_loraplus, check_optimizer_installed, split_optim_config
from sdft.perf import FastPath
from sdft.progress import StepBoundProgressBar
from sdft.runs import check_fresh_output_dir, find_resume_checkpoint
from sdft.stop import GracefulStop, write_status
from sdft.sweep import check_trainer_fits_sweep

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs):
    """`hydra.utils.instantiate`, but a bad value's own error (which names the key) comes
    out as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, OSError)):
            raise e.__cause__ from None
        raise


def merge_accumulation(cfg: DictConfig, fast_path: FastPath) -> None:
    """batch b x accumulation k -> one micro-batch of b*k on the GPU: the same effective
    batch and gradient (the mean over b*k samples) in k times fewer, fuller steps. Said in
    the log, and in the saved config.yaml (`merged_accumulation`, and the values that ran)."""
    b, k = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if fast_path.merge_accumulation and k > 1 and (on_gpu or fast_path.force):
        change = (
            f"data.batch_size={b} x trainer.accumulate_grad_batches={k} runs as "
            f"data.batch_size={b * k} x trainer.accumulate_grad_batches=1"
        )
        with open_dict(cfg):
            cfg.data.batch_size = b * k
            cfg.trainer.accumulate_grad_batches = 1
            cfg.merged_accumulation = change
        log.warning("perf.merge_accumulation: %s (same effective batch)", change)


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """The checkpoint this run starts from (`ckpt_path`, or `resume` picks one), loaded
    safely, or (None, None). Raises before any model is loaded."""
    if cfg.resume not in (False, True, "warm"):
        raise ValueError(f"resume={cfg.resume!r}: must be false, true or warm")
    if cfg.ckpt_path is not None:
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such file")
        return str(cfg.ckpt_path), load_checkpoint(cfg.ckpt_path)
    if cfg.resume:
        checkpoint, path = find_resume_checkpoint(cfg)
        return str(path), checkpoint
    return None, None


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
    L.seed_everything(cfg.seed, workers=True)

    fast_path = build(cfg.perf)
    merge_accumulation(cfg, fast_path)
    ckpt_path, checkpoint = resolve_checkpoint(cfg)  # settings compared as they will run
    # cheap checks first: the data is validated before any model is loaded
    datamodule: L.LightningDataModule = build(cfg.data)
    datamodule.setup("fit")
    method = build(cfg.method)
    optim_cfg, optim_extra = split_optim_config(cfg.optim)
    check_optimizer_installed(optim_cfg)
    check_loraplus(method, optim_extra["loraplus_ratio"])
    optimizer = build(optim_cfg)
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
        optimizer=optimizer,
        lr_scheduler=build(cfg.lr_scheduler),
        seed=cfg.seed,
        loss=loss,
        fast_path=fast_path,
        loraplus_ratio=optim_extra["loraplus_ratio"],
    )
    if checkpoint is not None:
        check_checkpoint(checkpoint.get("sdft"), module.identity, ckpt_path)
        if cfg.resume == "warm":  # the adapter's weights only: step 0, fresh optimizer
            module.load_state_dict(checkpoint["state_dict"], strict=False)
            log.info("resume=warm: adapter weights from %s, a fresh schedule", ckpt_path)
            ckpt_path = None

    callbacks = [build(c) for c in cfg.get("callbacks", {}).values() if c]
    callbacks += [validation] if validation is not None else []
    callbacks.append(fast_path)
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepBoundProgressBar())
    # Ctrl+C / SIGTERM / the UI's Cancel: adapter + checkpoint saved, status.json "cancelled"
    callbacks.append(GracefulStop(out, metadata=lambda: run_metadata(cfg, out)))
    loggers = [build(lg) for lg in cfg.get("logger", {}).values() if lg]
    profiler = build(cfg.profiler) if cfg.get("profiler") else None
    trainer: L.Trainer = build(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        profiler=profiler,
        plugins=[AtomicCheckpointIO()],
    )
    check_trainer_fits_sweep(trainer)

    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        datamodule.save_split(out)
        for lg in trainer.loggers:  # the whole config of each run (each sweep trial) in W&B
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        started = time.time()  # the files' ss_training_started_at
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        record = run_metadata(cfg, out, trainer, datamodule, started)
        files = module.save_adapter(out, record) if trainer.is_global_zero else []
        if files and (ema := find_ema(trainer)):  # <file>_ema.safetensors beside each file
            files += ema.save_adapter(module, out, record)
        if trainer.is_global_zero:
            write_status(out, "finished", step=trainer.global_step, files=[str(f) for f in files])
    finally:
        finish_wandb(trainer)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print(f"\nsdft: outputs in {out}")
        for f in files:
            print(f"  adapter      {f} ({f.stat().st_size / 1e6:.2f} MB)")
        print(f"  checkpoints  {out / 'checkpoints'}")
    return {"output_dir": out, "adapter_files": files, "metrics": metrics}
