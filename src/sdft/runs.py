"""Run folders, by one set of rules: each run gets a folder of its own, an existing run is
never written over, and `resume=true` continues only a run trained with the same settings.

`RunFolder` (a Hydra callback, `conf/train.yaml`) claims the folder before Hydra writes
anything into it (Hydra's `on_run_start` comes before its `.hydra/` files and its log).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, read_write

from sdft.checkpoints import is_partial, newest_intact, remove_partial_files

log = logging.getLogger(__name__)
RUN_ARTIFACTS = (
    "config.yaml",
    "checkpoints",
    "pytorch_lora_weights.safetensors",
    "split.json",
    "csv",
    "previews",
)
# What must match for `resume=true` to continue a run: the seed, the data and its split,
# the method, the base model and the schedule. Dotted prefixes of the saved config.yaml.
RESUME_SETTINGS = (
    "seed",
    "model",
    "method",
    "data",
    "optim",
    "lr_scheduler",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.accumulate_grad_batches",
)
# ...except these, which change how the data is read, not what is trained
RESUME_IGNORED = ("data.num_workers", "data.cache", "data.cache_dir")


def check_fresh_output_dir(out: Path, hydra_wrote_it: bool = True) -> None:
    """Refuse a folder that holds a run. `hydra_wrote_it`: its `.hydra/` is this run's own
    (train.run, after Hydra started the job), else another run's (RunFolder, before)."""
    names = RUN_ARTIFACTS if hydra_wrote_it else (".hydra", *RUN_ARTIFACTS)
    if taken := [name for name in names if (out / name).exists()]:
        raise FileExistsError(
            f"output directory {out} already holds a run ({', '.join(taken)}); "
            "refusing to overwrite it: pick another hydra.run.dir"
        )


def claim_run_dir(path: Path, explicit: bool) -> Path:
    """Create this run's folder exclusively and return it. A folder the user named
    (`hydra.run.dir=...`) may exist if it holds no run; a default (timestamped) one that
    another run created in the same second gets a suffix: `<time>_1`, `<time>_2`, ..."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if explicit:
        check_fresh_output_dir(path, hydra_wrote_it=False)
        path.mkdir(exist_ok=True)
        return path
    for n in range(1000):
        candidate = path if n == 0 else path.with_name(f"{path.name}_{n}")
        try:
            candidate.mkdir()  # atomic: exactly one process creates it
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: 1000 runs already started in this second")


class RunFolder(Callback):
    """Claims `hydra.run.dir` before Hydra writes into it (see `claim_run_dir`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # a DDP process that rank 0 started, in rank 0's folder
            return
        HydraConfig.instance().set_config(config)  # for ${hydra:runtime.cwd} in the path
        explicit = any(o.startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        wanted = Path(str(config.hydra.run.dir)).absolute()
        try:
            claimed = claim_run_dir(wanted, explicit)
        except FileExistsError as e:  # Hydra turns a callback's Exception into a warning
            raise SystemExit(f"Error: {e}") from None
        if claimed != wanted:
            log.warning("%s is another run's (same second): this run writes %s", wanted, claimed)
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(claimed)


def flat_settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config's RESUME_SETTINGS as {dotted key: value}."""
    node = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, DictConfig):
            for k in value:
                walk(value[k], f"{key}.{k}")
        elif key not in RESUME_IGNORED:
            got = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            out[key] = got

    for prefix in RESUME_SETTINGS:
        walk(OmegaConf.select(node, prefix), prefix)
    return out


def first_difference(saved: dict, current: dict) -> str | None:
    for key in [*saved, *(k for k in current if k not in saved)]:  # RESUME_SETTINGS' order
        if saved.get(key) != current.get(key):
            return f"{key}={saved.get(key)!r} there, {key}={current.get(key)!r} here"
    return None


def find_resume_checkpoint(cfg: DictConfig) -> tuple[dict, Path]:
    """For `resume=true`: the newest intact checkpoint of the newest run of this task whose
    training settings equal this run's; for `resume=warm`, of any run of the task.

    Raises FileNotFoundError (no checkpoint) or ValueError naming the first setting that
    differs in the newest run."""
    runs_dir = Path(cfg.paths.output_root) / cfg.task_name
    here = Path(cfg.paths.output_dir).absolute()
    runs = [p.parent.parent for p in runs_dir.glob("*/checkpoints/*.ckpt")]
    runs = sorted({r for r in runs if r.absolute() != here}, key=newest_write, reverse=True)
    if not runs:
        raise FileNotFoundError(f"resume={cfg.resume} but no checkpoint under {runs_dir}/*/")
    mismatches = []
    for run in runs:
        if cfg.resume != "warm":
            if not (run / "config.yaml").is_file():
                mismatches.append(f"{run}: no config.yaml to compare")
                continue
            saved = flat_settings(OmegaConf.load(run / "config.yaml"))
            if diff := first_difference(saved, flat_settings(cfg)):
                mismatches.append(f"{run}: {diff}")
                continue
        remove_partial_files(run / "checkpoints")
        ckpts = [p for p in (run / "checkpoints").glob("*.ckpt") if not is_partial(p)]
        checkpoint, path = newest_intact(ckpts)
        log.info("resume=%s: continuing from %s", cfg.resume, path)
        return checkpoint, path
    raise ValueError(
        f"resume=true: no run of task {cfg.task_name!r} was trained with these settings "
        f"(seed, data, method, base model, schedule); the newest differs in "
        f"{mismatches[0]}. Pass ckpt_path=<file> for that checkpoint, or resume=warm to "
        "start from the newest run's adapter weights with a fresh schedule."
    )


def newest_write(run: Path) -> float:
    return max(p.stat().st_mtime for p in (run / "checkpoints").glob("*.ckpt"))
