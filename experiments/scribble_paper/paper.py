"""Reproduce Guo & Cao's scribble-LoRA study (their figures 5-11) into results/.

    python experiments/scribble_paper/paper.py                  # model=tiny: offline, CPU
    python experiments/scribble_paper/paper.py model=sd15       # the paper's setup, on a GPU
    python experiments/scribble_paper/paper.py adapter=outputs/scribble/<run>   # no training
    python experiments/scribble_paper/paper.py results_dir=/tmp/r work_dir=/tmp/w
        trainer.max_steps=10 eval.scales=[0.0,1.0] eval.num_prompts=1 ...   # (one line) smaller

(`make paper` runs the first, `make paper ARGS="model=sd15"` the second.) `work_dir` holds
the training run and the evaluation's own outputs (default outputs/scribble_paper/<time>/),
`results_dir` what is committed (default results/ beside this file). It composes the same
configs and calls the same code as
    python train.py +experiment=scribble <profile> <overrides> callbacks.scale_sweep=null
    python evaluate.py adapter=<that run> <eval/logger overrides>
then draws the qualitative grids with the adapter it evaluated, and writes the tables, plots
and a README comparing the numbers with the paper's findings. Other key=value arguments are
Hydra overrides of the training config; those of eval.*, logger, device and dtype also go to
the evaluation (which takes model, method and data from the run itself).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import sdft.eval.evaluate
import sdft.train
from sdft.eval.results import SweepResult, plot_over_scale, sweep_columns, table_rows, write_table

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
# model=tiny: the recipe at toy size, offline on the CPU (as `make train`), random tiny CLIPs
TINY = [
    "trainer=cpu",
    "data.resolution=64",
    "data.num_workers=0",
    "trainer.max_steps=100",
    "callbacks.checkpoint.every_n_train_steps=50",
    "eval=tiny",
]
EVAL_KEYS = ("eval", "logger", "device", "dtype")  # the overrides evaluate.py takes too
FIGURE_COLUMNS = 6  # grid columns: every other of the 11 scales (0.0, 0.2, ..., 1.0) stays legible
FIGURE_SEEDS = [0, 1, 2, 3]  # figure 5's rows
FIGURE_CATEGORIES = 4  # rows of figures 6 and 7
# Figures 8-9: prompts beyond one category, with and without "a scribble of" (ours: the
# paper does not list its prompts)
COMPLEX_PROMPTS = [
    "a cat sitting on a chair",
    "a house with a tree and the sun",
    "a man riding a bicycle",
    "a dog wearing a hat",
]


def compose_config(name: str, overrides: list[str], out_dir: Path) -> DictConfig:
    """conf/<name>.yaml with `overrides`, writing to `out_dir` (no Hydra app needed)."""
    paths = [f"paths.root_dir={ROOT}", f"paths.output_dir={out_dir}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=[*overrides, *paths])


def shown(path: str | Path) -> str:
    """`path` relative to the repository when it is inside it: README lines that run anywhere."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """`model=`, `adapter=`, `results_dir=` and `work_dir=` (the training run and the
    evaluation's own outputs) for this script; the rest are overrides."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    ours = {
        "model": "tiny",
        "adapter": None,
        "results_dir": str(RESULTS),
        "work_dir": str(ROOT / "outputs" / "scribble_paper" / stamp),
    }
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ours:
            ours[key] = value
        else:
            overrides.append(arg)
    profile = TINY if ours["model"] == "tiny" else []
    return ours, [f"model={ours['model']}", *profile, *overrides]


def figures(run: dict, out: Path) -> dict[str, Path]:
    """The paper's qualitative grids (figures 5-9): rows of prompts, columns of LoRA scales."""
    pipe, evaluator, cats = run["pipeline"], run["evaluator"], run["result"].categories
    scales = evaluator.scales[:: -(-len(evaluator.scales) // FIGURE_COLUMNS)]
    specs = {
        "fig5_apple_seeds_x_scales": (["a scribble of apple"], FIGURE_SEEDS, "seeds x scales"),
        "fig6_trained_categories": (
            [evaluator.prompt(c) for c in cats["trained"][:FIGURE_CATEGORIES]],
            [0],
            "trained categories",
        ),
        "fig7_heldout_categories": (
            [evaluator.prompt(c) for c in cats.get("held_out", [])[:FIGURE_CATEGORIES]],
            [0],
            "held-out categories (never trained on)",
        ),
        "fig8_complex_prompts": (COMPLEX_PROMPTS, [0], "complex prompts"),
        "fig9_complex_prompts_scribble": (
            [f"a scribble of {p}" for p in COMPLEX_PROMPTS],
            [0],
            'complex prompts with "a scribble of"',
        ),
    }
    files = {}
    for name, (prompts, seeds, title) in specs.items():
        if prompts:
            grid = evaluator.scale_grid(pipe, prompts, seeds, scales, title=title)
            grid.save(out / f"{name}.png")
            files[name] = out / f"{name}.png"
    return files


def tables(result: SweepResult, out: Path) -> list[Path]:
    """Figure 10 (CLIP score) and figure 11 (image cosine): CSV, markdown and PNG each."""
    files = []
    for name, stem, title, ylabel in (
        ("fig10_clip_score", "clip_score", "Figure 10: CLIP score vs LoRA scale", "CLIP score"),
        ("fig11_image_cosine", "clip_img_cos", "Figure 11: CLIP image cosine vs LoRA scale",
         "cosine similarity to real drawings"),
    ):  # fmt: skip
        columns = sweep_columns(result, stem)
        files += write_table(columns, table_rows(result, columns), out / name)
        files.append(plot_over_scale(result, stem, title, ylabel, out / f"{name}.png"))
    return files


def trend(scales: list[float], values: list[float]) -> str:
    """'falls', 'rises' or 'is flat' (least-squares slope against the values' spread)."""
    slope = np.polyfit(scales, values, 1)[0]
    if abs(slope) * (max(scales) - min(scales)) <= 1e-6 + 0.05 * np.std(values):
        return "is flat"
    return "falls" if slope < 0 else "rises"


def compare(result: SweepResult) -> list[str]:
    """Our numbers against the paper's two findings, one sentence each."""
    rows, scales = result.rows, result.scales
    lines = []
    for suffix, group in (("", "trained"), ("_heldout", "held-out")):
        key = "clip_score" + suffix
        if key in rows[0]:
            values = [r[key] for r in rows]
            t = trend(scales, values)
            lines.append(
                f"- CLIP score, {group} categories: {t} with the scale ({values[0]:.2f} at "
                f"{scales[0]:g} -> {values[-1]:.2f} at {scales[-1]:g}). Paper: it falls as the "
                f"scale rises. {'Agrees.' if t == 'falls' else 'Does not agree.'}"
            )
    best = result.best
    near = abs(best["scale"] - 0.8) <= 0.1
    lines.append(
        f"- CLIP image cosine, trained categories: highest at scale {best['scale']:g} "
        f"({best['clip_img_cos']:.4f}; {rows[0]['clip_img_cos']:.4f} at {scales[0]:g}, "
        f"{rows[-1]['clip_img_cos']:.4f} at {scales[-1]:g}). Paper: it peaks near 0.8. "
        f"{'Agrees.' if near else 'Does not agree.'}"
    )
    return lines


def readme(info: dict, result: SweepResult, out: Path) -> Path:
    """results/README.md: provenance, the two tables, the comparison, the figures."""
    tiny = info["model"] == "tiny"
    caveat = (
        "**These numbers come from `model=tiny`: a Stable-Diffusion-shaped model with random "
        "weights, trained briefly on the CPU at 64 px, and scored by randomly "
        f"initialised tiny CLIP models** ({result.models['clip_score']}, "
        f"{result.models['image_cosine']}). They exercise the pipeline (training, the scale "
        "sweep, the tables, plots and grids) end to end offline; they say nothing about image "
        "quality, and agreement or not with the paper is chance. A random CLIP gives "
        "image-text cosines near 0, hence a CLIP score (torchmetrics: the mean of 100 x cosine, "
        "floored at 0) of 0 at most scales, and the grids show noise-like images.\n\n"
        'The real numbers need `make paper ARGS="model=sd15"` on a GPU with the SD1.5 weights '
        "(`stable-diffusion-v1-5/stable-diffusion-v1-5`) and the CLIP weights "
        "(`openai/clip-vit-base-patch16`, `openai/clip-vit-large-patch14`) reachable from the "
        "Hugging Face hub or its local cache; the offline environment that made these files "
        "cannot download them."
        if tiny
        else f"Base model `{info['model']}`; CLIP score by `{result.models['clip_score']}`, "
        f"image cosine by `{result.models['image_cosine']}`."
    )
    lines = [
        "# Scribble LoRA: our figures 5-11 of Guo & Cao",
        "",
        f"Made by `{info['command']}` on {info['date']} ({info['seconds'] / 60:.1f} min). "
        f"Adapter: `{info['adapter']}` ({info['steps']} steps; not in git). Equivalent commands:",
        "",
        "```bash",
        *info["commands"],
        "```",
        "",
        caveat,
        "",
        f"Prompts `{info['prompt']}` for {len(result.categories['trained'])} trained and "
        f"{len(result.categories.get('held_out', []))} held-out categories x "
        f"{info['seeds']} seeds at each scale ({result.images} images, "
        f"{result.seconds:.0f} s); means over images, `_std` their standard deviation.",
        "",
        "## Against the paper",
        "",
        *compare(result),
        "",
        "## Figure 10: CLIP score vs LoRA scale",
        "",
        "`clip_score_reference*`: real drawings of the same categories with their captions.",
        "",
        (out / "fig10_clip_score.md").read_text(),
        "![figure 10](fig10_clip_score.png)",
        "",
        "## Figure 11: CLIP image cosine vs LoRA scale",
        "",
        "Mean cosine between each generated image and the real drawings of its category.",
        "",
        (out / "fig11_image_cosine.md").read_text(),
        "![figure 11](fig11_image_cosine.png)",
        "",
        "## Figures 5-9: LoRA scale grids",
        "",
    ]
    for name in info["figures"]:
        lines += [f"![{name}]({name}.png)", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    ours, overrides = parse(argv)
    work = Path(ours["work_dir"])
    commands = []
    if ours["adapter"] is None:
        train_overrides = ["+experiment=scribble", *overrides, "callbacks.scale_sweep=null"]
        commands.append("python train.py " + " ".join(train_overrides))
        cfg = compose_config("train", train_overrides, work / "train")
        ours["adapter"] = str(sdft.train.run(cfg)["output_dir"])
    eval_overrides = [
        o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in EVAL_KEYS
    ]
    adapter = ours["adapter"]
    commands.append(" ".join(["python evaluate.py", f"adapter={shown(adapter)}", *eval_overrides]))
    cfg = compose_config("evaluate", [f"adapter={adapter}", *eval_overrides], work / "eval")
    run = sdft.eval.evaluate.run(cfg)

    out = Path(ours["results_dir"])
    out.mkdir(parents=True, exist_ok=True)
    files = tables(run["result"], out)
    made = figures(run, out)
    info = {
        "command": "make paper" + (f' ARGS="{" ".join(argv)}"' if argv else ""),
        "commands": commands,
        "date": datetime.now().strftime("%Y-%m-%d"),
        "model": ours["model"],
        "adapter": shown(adapter),
        "steps": run["step"],
        "prompt": run["evaluator"].prompt_template,
        "seeds": len(run["evaluator"].seeds),
        "figures": list(made),
        "metrics": run["metrics"],
        "models": run["result"].models,
        "categories": run["result"].categories,
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(info, indent=1))
    files += [*made.values(), out / "summary.json", readme(info, run["result"], out)]
    print(f"\nsdft: paper results in {out} ({info['seconds'] / 60:.1f} min)")
    return {"results_dir": out, "files": files, "metrics": run["metrics"]}


if __name__ == "__main__":
    main(sys.argv[1:])
