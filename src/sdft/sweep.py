"""Sweeps (`python train.py -m ...`): each trial records its config and its metrics or its
error; each sweep keeps one summary, best trial first.

- `run_trial` wraps a training run: it returns `cfg.optimized_metric` (what Optuna optimises).
  In a sweep, a trial that fails (a bad value, a NaN loss, out of memory) is written down in
  `<trial>/trial.json` with its error and returns None, which Optuna records as a failed
  trial, so the sweep goes on. It also puts every trial of a sweep into one W&B group.
- `SweepSummary`, a Hydra callback (conf/hydra/callbacks/sweep_summary.yaml), rewrites
  `summary.csv`, `summary.md` and `summary.png` (the metric against each swept parameter)
  in the sweep's folder after every trial and at the end of the sweep.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from sdft.files import atomic_path, write_atomic

log = logging.getLogger(__name__)
DIRECTIONS = ("maximize", "minimize")
NO_RECORD = "no trial.json: still running, or the job died (killed, timed out, out of host memory)"


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def objective(metrics: dict[str, float], cfg: DictConfig) -> float:
    """The value of `cfg.optimized_metric` in `metrics`; raises if it is missing or not finite."""
    name = cfg.optimized_metric
    if name not in metrics:
        raise LookupError(
            f"optimized_metric={name!r} was not logged by this run; it logged {sorted(metrics)}"
        )
    value = float(metrics[name])
    if not math.isfinite(value):
        raise FloatingPointError(f"optimized_metric={name!r} is {value}")
    return value


def check_trial_finite(result: dict) -> None:
    """A run that ends on NaN/inf failed, whatever its last logged loss says: the loss of
    the last step is computed before its update, which can leave a blown-up adapter."""
    files = [Path(p) for p in result.get("adapter_files", [])]
    for path in [p for p in files if p.suffix == ".safetensors"]:  # not method=full's config
        for key, t in load_file(path).items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FloatingPointError(
                    f"the trained adapter {path} holds NaN/inf values (tensor {key!r}): "
                    "training diverged (lower optim.lr)"
                )
    for name, value in result["metrics"].items():
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} is {value} at the end of training")


def run_trial(train: Callable[[DictConfig], dict], cfg: DictConfig) -> float | None:
    """`train(cfg)`, returning `cfg.optimized_metric` (None when there is none to return).

    Outside a sweep, errors propagate. In a sweep, the trial's record goes to `trial.json` in
    its folder, and an exception (not KeyboardInterrupt) is recorded rather than raised.
    """
    if cfg.optimized_direction not in DIRECTIONS:
        raise ValueError(f"optimized_direction={cfg.optimized_direction!r}: one of {DIRECTIONS}")
    if not in_sweep():
        result = train(cfg)
        check_trial_finite(result)
        metrics = result["metrics"]
        if cfg.optimized_metric is None or cfg.optimized_metric not in metrics:
            return None
        return objective(metrics, cfg)

    hc = HydraConfig.get()
    group_wandb_runs(cfg, hc)
    record: dict[str, Any] = {
        "job": int(hc.job.num),
        "overrides": list(hc.overrides.task),
        "metric": cfg.optimized_metric,
        "direction": cfg.optimized_direction,
        "output_dir": str(cfg.paths.output_dir),
    }
    start = time.perf_counter()
    try:
        result = train(cfg)
        record["metrics"] = result["metrics"]
        check_trial_finite(result)
        score = objective(result["metrics"], cfg)
        record.update(status="completed", score=score)
    except Exception as e:  # any error of one trial must not end the sweep
        log.exception("trial %s failed; the sweep goes on", hc.job.num)
        record.update(status="failed", score=None, error=f"{type(e).__name__}: {e}")
        score = None
    finally:
        # an OOM trial's traceback holds its tensors: let them go before the next trial
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - start, 1)
    if rank_zero_only.rank == 0:
        write_atomic(Path(cfg.paths.output_dir) / "trial.json", json.dumps(record, indent=1))
    return score


def group_wandb_runs(cfg: DictConfig, hc: DictConfig) -> None:
    """One W&B group per sweep (unless `logger.wandb.group` is set), one run per trial."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if not wandb:
        return
    if wandb.group is None:
        wandb.group = f"{cfg.task_name}/{Path(hc.sweep.dir).name}"
    wandb.name = f"{cfg.task_name}-{hc.job.num}"


# -- the sweep's summary -----------------------------------------------------------------
def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """["method.rank=4", "+x=1"] -> {"method.rank": "4", "x": "1"} (values as typed)."""
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


def load_trials(sweep_dir: Path) -> list[dict]:
    """Every trial folder of the sweep, by job number; one with no record counts as failed."""
    dirs = {p.parent for p in sweep_dir.glob("*/trial.json")}
    dirs |= {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")}
    trials = []
    for d in dirs:
        if (d / "trial.json").is_file():
            t = json.loads((d / "trial.json").read_text())
        else:
            overrides = OmegaConf.to_container(OmegaConf.load(d / ".hydra/overrides.yaml"))
            t = {"job": d.name, "overrides": overrides, "status": "failed", "error": NO_RECORD}
        t["folder"] = d.name
        trials.append(t)
    return sorted(trials, key=lambda t: int(t["job"]) if str(t["job"]).isdigit() else -1)


def swept_keys(trials: list[dict], declared: list[str] = ()) -> list[str]:
    """`declared` (the sweeper's search space) plus every override that differs across trials."""
    params = [parse_overrides(t.get("overrides", [])) for t in trials]
    keys = list(dict.fromkeys(k for p in params for k in p))
    varying = [k for k in keys if len({p.get(k) for p in params}) > 1]
    return list(dict.fromkeys([*declared, *varying]))


def rank_trials(trials: list[dict], direction: str) -> list[dict]:
    """Best first; failed trials last, in job order."""
    done = [t for t in trials if t.get("score") is not None]
    done.sort(key=lambda t: t["score"], reverse=direction == "maximize")
    return done + [t for t in trials if t.get("score") is None]


def summary_rows(trials: list[dict], metric: str, keys: list[str]) -> list[dict]:
    metric_names = sorted({m for t in trials for m in t.get("metrics", {})} - {metric})
    rows = []
    for rank, t in enumerate(trials, 1):
        params = parse_overrides(t.get("overrides", []))
        row = {"rank": rank if t.get("score") is not None else "", "job": t["job"]}
        row["status"] = t["status"]
        row[metric] = t.get("score")
        row.update({k: params.get(k, "") for k in keys})
        row.update({m: t.get("metrics", {}).get(m) for m in metric_names})
        row["error"] = t.get("error", "")
        row["seconds"] = t.get("seconds")
        row["folder"] = t["folder"]
        row["overrides"] = " ".join(t.get("overrides", []))
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v).splitlines()[0] if str(v) else ""
    return (text[:117] + "...") if len(text) > 120 else text.replace("|", "\\|")


def write_summary(sweep_dir: str | Path, metric: str, direction: str, declared=()) -> list[Path]:
    """Write summary.csv / summary.md / summary.png of the sweep in `sweep_dir`."""
    sweep_dir = Path(sweep_dir)
    trials = rank_trials(load_trials(sweep_dir), direction)
    if not trials:
        return []
    keys = swept_keys(trials, list(declared))
    rows = summary_rows(trials, metric, keys)

    csv_path = sweep_dir / "summary.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    failed = sum(t["status"] != "completed" for t in trials)
    shown = [c for c in rows[0] if c != "overrides"]
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{len(trials)} trials, {failed} failed; `{metric}` ({direction}), best first. "
        "Each trial's full config is in `<folder>/config.yaml`.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(_cell(r[c]) for c in shown) + " |" for r in rows]
    write_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")

    paths = [csv_path, sweep_dir / "summary.md"]
    if plot_summary(trials, metric, direction, keys, sweep_dir / "summary.png"):
        paths.append(sweep_dir / "summary.png")
    return paths


def plot_summary(trials, metric: str, direction: str, keys: list[str], out: Path) -> bool:
    """The metric against each swept parameter (one panel each); the best trial starred."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    done = [t for t in trials if t.get("score") is not None]
    if not done:
        return False
    panels = keys or ["job"]
    fig = Figure(figsize=(3.6 * len(panels), 3.2), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        xs = [t["job"] if key == "job" else parse_overrides(t["overrides"]).get(key) for t in done]
        ys = [t["score"] for t in done]
        try:
            xv = [float(x) for x in xs]
            if min(xv) > 0 and max(xv) >= 10 * min(xv):
                ax.set_xscale("log")
            ticks = dict(sorted(zip(xv, map(str, xs), strict=True)))  # the values as typed
            ax.set_xticks(list(ticks), list(ticks.values()), fontsize=7)
        except ValueError:  # categorical: one position per distinct value
            labels = sorted(set(map(str, xs)))
            xv = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        ax.scatter(xv, ys)
        ax.scatter(xv[:1], ys[:1], marker="*", s=200, color="tab:red", label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    failed = len(trials) - len(done)
    fig.suptitle(
        f"{metric} ({direction}): {len(done)} trials" + f", {failed} failed" * bool(failed)
    )
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return True


class SweepSummary(Callback):
    """Hydra callback: keeps the sweep's summary files current, after each trial and at the end."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or rank_zero_only.rank != 0:
            return
        out = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and not (out / "trial.json").exists():
            # raised outside run_trial (e.g. while building the job): record it all the same
            try:
                _ = job_return.return_value  # a failed job's return value re-raises its error
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            record = {"job": int(config.hydra.job.num), "status": "failed", "error": error}
            record["overrides"] = list(config.hydra.overrides.task)
            write_atomic(out / "trial.json", json.dumps(record, indent=1))
        self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = self._write(config)
        if paths:
            log.info("sweep summary: %s", ", ".join(str(p) for p in paths))

    def _write(self, config: DictConfig) -> list[Path]:
        declared = list((config.hydra.sweeper.get("params") or {}).keys())
        try:
            return write_summary(
                config.hydra.sweep.dir,
                config.optimized_metric,
                config.optimized_direction,
                declared,
            )
        except Exception:  # a summary must never fail the sweep itself
            log.exception("could not write the sweep summary")
            return []


def check_trainer_fits_sweep(trainer: L.Trainer) -> None:
    """Refuse what Lightning cannot do: its DDP launcher reruns the command line once per
    GPU, and in a local `-m` sweep that command is the whole sweep (Lightning #11300)."""
    launcher = trainer.strategy.launcher
    if (
        in_sweep()
        and isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and trainer.num_devices > 1
    ):
        raise ValueError(
            "trainer=ddp with several GPUs in a local -m sweep would rerun the whole sweep "
            "once per GPU: add trainer.strategy.start_method=spawn, or launch the sweep on "
            "SLURM (hydra/launcher=slurm), where every trial gets its own processes"
        )
