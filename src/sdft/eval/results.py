"""A scale sweep's result, and where it goes: CSV, markdown and PNG on disk; tables, line
plots, grids and scalars to W&B; scalars to every other logger."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger
from PIL import Image

GROUPS = {"trained": "", "held_out": "_heldout"}  # category group -> metric-name suffix


def scale_key(scale: float) -> str:
    """0 -> "0.0", 0.3 -> "0.3", 0.25 -> "0.25": the `@{scale}` of metric names."""
    return repr(round(float(scale), 4))


@dataclass
class SweepResult:
    """Per-scale means and spreads, reference scores, grids, and where they came from."""

    rows: list[dict[str, float]]  # one per scale: scale, clip_score, clip_score_std, ...
    reference: dict[str, float]  # clip_score_reference(_heldout)(_std): real drawings
    grids: dict[str, Image.Image]  # group -> categories (rows) x scales (columns)
    models: dict[str, str]  # which CLIP models made the numbers
    categories: dict[str, list[str]]  # group -> the categories prompted
    images: int = 0  # images generated (all ranks)
    seconds: float = 0.0  # wall time of the sweep, ground truth included

    @property
    def scales(self) -> list[float]:
        return [r["scale"] for r in self.rows]

    @property
    def best(self) -> dict[str, float]:
        """The row of the scale with the highest image cosine on trained categories."""
        return max(self.rows, key=lambda r: r["clip_img_cos"])

    def metrics(self) -> dict[str, float]:
        """The logged numbers: `eval/clip_score@0.8`, ..., `eval/best_scale`."""
        out = {}
        for row in self.rows:
            for stem in ("clip_score", "clip_img_cos"):
                for suffix in GROUPS.values():
                    if stem + suffix in row:
                        out[f"eval/{stem}{suffix}@{scale_key(row['scale'])}"] = row[stem + suffix]
        out |= {f"eval/{k}": v for k, v in self.reference.items() if not k.endswith("_std")}
        out["eval/best_scale"] = self.best["scale"]
        out["eval/clip_img_cos_best"] = self.best["clip_img_cos"]
        return out


# metric stem (and file stem) -> (title, y label): the paper's figures 10 and 11
PLOTS = {
    "clip_score": ("CLIP score vs LoRA scale", "CLIP score"),
    "clip_img_cos": ("CLIP image cosine vs LoRA scale", "cosine similarity"),
}
LABELS = {"trained": "trained categories", "held_out": "held-out categories"}


def sweep_columns(result: SweepResult, stem: str | None = None) -> list[str]:
    """`scale`, then mean and std of each metric (or only `stem`) for each group present."""
    columns = ["scale"]
    for s in (stem,) if stem else ("clip_score", "clip_img_cos"):
        for suffix in GROUPS.values():
            if s + suffix in result.rows[0]:
                columns += [s + suffix, s + suffix + "_std"]
    if stem in (None, "clip_score"):
        columns += [k for k in result.reference if not k.endswith("_std")]
    return columns


def table_rows(result: SweepResult, columns: list[str]) -> list[list[float]]:
    return [[{**result.reference, **row}[c] for c in columns] for row in result.rows]


def write_table(columns: list[str], rows: list[list[float]], stem: Path) -> list[Path]:
    """`stem`.csv (full precision) and `stem`.md (4 decimals)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{v:.4f}" for v in row) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return [stem.with_suffix(".csv"), stem.with_suffix(".md")]


def plot_over_scale(result: SweepResult, stem: str, title: str, ylabel: str, path: Path) -> Path:
    """One line (mean, with a +-1 std band) per category group; the reference as dashes."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no window

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    x = result.scales
    for (group, suffix), color in zip(GROUPS.items(), ("tab:blue", "tab:orange"), strict=True):
        if stem + suffix not in result.rows[0]:
            continue
        y = np.array([r[stem + suffix] for r in result.rows])
        sd = np.array([r[stem + suffix + "_std"] for r in result.rows])
        ax.plot(x, y, "o-", color=color, label=LABELS[group])
        ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.15)
        ref = result.reference.get(f"{stem}_reference{suffix}")
        if ref is not None:
            ax.axhline(ref, color=color, ls="--", label=f"real drawings ({LABELS[group]})")
    if stem == "clip_img_cos":
        best = result.best
        ax.axvline(best["scale"], color="grey", ls=":", label=f"best scale {best['scale']:g}")
    ax.set(xlabel="LoRA scale", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_results(result: SweepResult, out_dir: str | Path) -> list[Path]:
    """scale_sweep.csv/.md, clip_score.png, clip_img_cos.png, grid_<group>.png, summary.json."""
    out = Path(out_dir)
    columns = sweep_columns(result)
    files = write_table(columns, table_rows(result, columns), out / "scale_sweep")
    for stem, (title, ylabel) in PLOTS.items():
        files.append(plot_over_scale(result, stem, title, ylabel, out / f"{stem}.png"))
    for group, grid in result.grids.items():
        grid.save(out / f"grid_{group}.png")
        files.append(out / f"grid_{group}.png")
    summary = {
        "metrics": result.metrics(),
        "models": result.models,
        "categories": result.categories,
        "images": result.images,
        "seconds": result.seconds,
        "images_per_s": result.images / result.seconds if result.seconds else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return [*files, out / "summary.json"]


def append_history(path: Path, step: int, metrics: dict[str, float]) -> None:
    """One row per evaluated step: which checkpoint is best by these numbers."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", *metrics])
        writer.writerow([step, *metrics.values()])


def log_results(
    result: SweepResult, loggers: list[Logger], step: int, files: list[Path] = ()
) -> None:
    """Scalars to every logger; the table, line plots, grids and the PNG plots among `files`
    (what `write_results` wrote) to W&B."""
    # the grids' PNGs are not logged again: the grids go from memory, as eval/grid/<group>
    figures = [f for f in files if f.suffix == ".png" and not f.stem.startswith("grid_")]
    metrics = {k: v for k, v in result.metrics().items() if math.isfinite(v)}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):
            _log_wandb(result, logger, step, figures)


def _log_wandb(result: SweepResult, logger: WandbLogger, step: int, figures: list[Path]) -> None:
    import wandb

    columns = sweep_columns(result)
    rows = table_rows(result, columns)
    logger.log_table("eval/scale_sweep", columns=columns, data=rows, step=step)
    plots = {}
    for stem, (title, _) in PLOTS.items():
        keys = [g for g, sfx in GROUPS.items() if stem + sfx in result.rows[0]]
        ys = [[r[stem + GROUPS[g]] for r in result.rows] for g in keys]
        if stem == "clip_score":  # the real drawings' score, flat across scales
            for g in [g for g in keys if f"clip_score_reference{GROUPS[g]}" in result.reference]:
                ys.append([result.reference[f"clip_score_reference{GROUPS[g]}"]] * len(result.rows))
                keys.append(f"{g} real drawings")
        plots[f"eval/plot/{stem}"] = wandb.plot.line_series(
            xs=result.scales, ys=ys, keys=keys, title=title, xname="LoRA scale"
        )
    logger.log_metrics(plots, step=step)
    for group, grid in result.grids.items():  # one key each: W&B wants one size per key
        logger.log_image(f"eval/grid/{group}", [grid], step=step, caption=[LABELS[group]])
    for path in figures:
        logger.log_image(f"eval/figure/{path.stem}", [Image.open(path).convert("RGB")], step=step)
