"""The file each method's default config exports at SD1.5's shapes: the sizes in the README's
methods table, measured by writing the files.

    python bench/adapter_sizes.py [--model sd15_arch] [--out bench/adapter_sizes.md]

The base model is built by its own config (`conf/model/<model>.yaml`) on PyTorch's meta device:
its ~1.1 billion weights take no memory and no time, and only the adapter tensors (the text
encoder, for Textual Inversion's vocabulary) are made real. A file's tensors depend only on
their shapes and dtypes, so they are what a trained run writes; a trained run's header adds
its training record (`ss_tag_frequency` and the rest: a few KB), which these files lack.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn

CONF = Path(__file__).resolve().parents[1] / "conf"
# (method, overrides): each method's defaults, and the README's LoRA variants
VARIANTS = [
    ("lora", []),
    ("lora", ["method.attention=cross"]),
    ("lora", ["method.train_text_encoder=true"]),
    ("lora", ["method.save_dtype=float16"]),
    ("locon", []),
    ("loha", []),
    ("lokr", []),
    ("textual_inversion", []),
    ("dreambooth_lora", []),
    ("full", []),  # the whole UNet
]


def materialize_trainable(model: nn.Module) -> None:
    """Replace every trainable parameter still on the meta device by zeros on the CPU."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype))


def export_sizes(model: str, variants: list[tuple[str, list[str]]], out_dir: Path) -> list[dict]:
    """Export every variant's files for `model=<model>`; one row per file."""
    rows = []
    for i, (method_name, overrides) in enumerate(variants):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose(
                "train",
                [f"model={model}", f"method={method_name}", "task_name=scribble", *overrides],
            )
        with torch.device("meta"):
            pipe = instantiate(cfg.model)
        pipe.text_encoder.to_empty(device="cpu")  # TI grows its vocabulary: a real matrix
        method = instantiate(cfg.method)
        method.apply(pipe)
        materialize_trainable(pipe.unet)
        folder = out_dir / f"{i:02d}_{method_name}"
        folder.mkdir(parents=True)
        setting = " ".join(overrides) or "defaults"
        for f in method.save(pipe, folder):
            if f.suffix != ".safetensors":
                continue  # method=full's config.json beside its weights
            rows.append(
                {
                    "method": method_name,
                    "setting": setting,
                    "file": f.name,
                    "size": f.stat().st_size,
                }
            )
    return rows


def human(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} KB"


def markdown(rows: list[dict], model: str) -> str:
    lines = [
        f"Adapter files exported by each method's default config, `model={model}` "
        "(`python bench/adapter_sizes.py`; a trained run's files add its training record to the "
        "header, a few KB)",
        "",
        "| method | setting | file | size |",
        "|---|---|---|---|",
    ]
    for r in rows:
        formats = ("pytorch_", "learned_", "diffusion_")  # diffusers' own file names
        file = "kohya/A1111/LyCORIS" if not r["file"].startswith(formats) else ""
        name = f"`{r['file']}`" + (f" ({file})" if file else "")
        lines.append(f"| `{r['method']}` | {r['setting']} | {name} | {human(r['size'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15_arch")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = markdown(export_sizes(args.model, VARIANTS, Path(tmp)), args.model)
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
