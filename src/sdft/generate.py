"""Generate with any number of adapters at any weights: `python generate.py ...`.

Adapters come from the config (`lora=[a.safetensors:0.8, outputs/run:0.5]`) and from A1111
prompt syntax (`"a scribble of apple <lora:scribble:0.8>"`, looked up as `scribble.safetensors`
in `lora_dir`). Each file loads once as a peft adapter, in any format sdft reads (diffusers,
kohya, LyCORIS LoHa/LoKr); per prompt, diffusers' `set_adapters` weighs them, so they
compose as W' = W + sum_i w_i dW_i. Textual-inversion files add their tokens to the prompts'
vocabulary. `merge_to` writes the base with the config's adapters merged in, as a diffusers
pipeline.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from omegaconf import DictConfig
from PIL import Image

from sdft.adapters.load import (
    adapter_name_for,
    is_embedding,
    load_adapter,
    merge_adapter,
    read_safetensors,
)
from sdft.eval.grids import image_grid

log = logging.getLogger(__name__)
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^>]*))?>")
SAMPLERS = {  # name -> (scheduler class, options); A1111's names in the comments
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),  # DPM++ 2M
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),  # DPM++ 2M Karras
    "euler_a": (EulerAncestralDiscreteScheduler, {}),  # Euler a
    "euler": (EulerDiscreteScheduler, {}),  # Euler
    "ddim": (DDIMScheduler, {}),  # DDIM
}
DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    weight: float = 1.0


def resolve_file(path: str | Path) -> Path:
    """An adapter file, or the one in an sdft run folder (the diffusers file first)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in DIFFUSERS_FILES:
            if (path / name).is_file():
                return path / name
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: expected one adapter .safetensors, found {files}")
        return files[0]
    if not path.is_file():
        raise FileNotFoundError(f"adapter {str(path)!r}: no such file or folder")
    return path


def parse_weight(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: weight {text!r} is not a number") from None


def parse_adapter(spec: str) -> AdapterSpec:
    """'path[:weight]' (weight 1 when left out) -> AdapterSpec."""
    path, sep, weight = str(spec).rpartition(":")
    if not sep or not re.fullmatch(r"[-+]?[0-9]*\.?[0-9]+(e[-+]?\d+)?", weight):
        return AdapterSpec(resolve_file(spec))
    return AdapterSpec(resolve_file(path), parse_weight(weight, f"lora {spec!r}"))


def known_adapters(lora_dir: Path) -> dict[str, Path]:
    """A1111's lookup: every .safetensors under the folder, by file name without suffix."""
    return {p.stem: p for p in sorted(lora_dir.rglob("*.safetensors"))} if lora_dir.is_dir() else {}


def parse_prompt(prompt: str, lora_dir: str | Path) -> tuple[str, list[AdapterSpec]]:
    """Strip A1111 `<lora:name:weight>` tags from a prompt; return it and their adapters."""
    known = None
    specs = []
    for name, weight in LORA_TAG.findall(prompt):
        known = known if known is not None else known_adapters(Path(lora_dir).expanduser())
        if name not in known:
            raise FileNotFoundError(
                f"<lora:{name}> in prompt {prompt!r}: no {name}.safetensors in lora_dir="
                f"{str(lora_dir)!r}; it knows {sorted(known) or 'none'}"
            )
        w = parse_weight(weight, f"<lora:{name}:{weight}>") if weight else 1.0
        specs.append(AdapterSpec(known[name], w))
    return re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip(" ,"), specs


def set_sampler(pipe: StableDiffusionPipeline, sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} must be one of {list(SAMPLERS)}")
    cls, options = SAMPLERS[sampler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)


def load_embedding(pipe: StableDiffusionPipeline, path: str | Path) -> str:
    """Add a textual-inversion file's tokens; its token is the file's key (diffusers format)
    or, for kohya/A1111 files, the file name, as A1111 does."""
    path = resolve_file(path)
    tensors, _ = read_safetensors(path)
    if not is_embedding(tensors):
        raise ValueError(f"embeddings: {path} is not a textual-inversion file (an adapter?)")
    token = path.stem if "emb_params" in tensors else next(iter(tensors))
    pipe.load_textual_inversion(tensors, token=token)  # the state dict, not a second read
    return token


class AdapterSet:
    """The adapters loaded into one pipeline, by file; weighs them per prompt."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.names: dict[Path, str] = {}

    def load(self, specs: list[AdapterSpec]) -> None:
        for spec in specs:
            path = spec.path.resolve()
            if path not in self.names:
                name = adapter_name_for(path)
                while name in self.names.values():
                    name += "_"
                load_adapter(self.pipe, path, name)
                self.names[path] = name

    def activate(self, specs: list[AdapterSpec]) -> dict[str, float]:
        """Weigh every loaded adapter: the sum of its weights in `specs`, 0 if absent."""
        weights = {name: 0.0 for name in self.names.values()}
        for spec in specs:
            weights[self.names[spec.path.resolve()]] += spec.weight
        if weights:
            self.pipe.set_adapters(list(weights), list(weights.values()))
        return weights


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    adapters: list[AdapterSpec] = (),
    lora_dir: str | Path = "models/Lora",
    negative_prompt: str = "",
    steps: int = 25,
    guidance_scale: float = 7.0,
    seeds: list[int] = (0,),
    batch_size: int = 4,
    resolution: int | None = None,
    adapter_set: AdapterSet | None = None,
) -> tuple[list[list[Image.Image]], list[dict]]:
    """Images (one row per prompt, one per seed) and what made each row. Pass the same
    `adapter_set` to later calls on the same pipeline: files already loaded are reused."""
    adapter_set = adapter_set or AdapterSet(pipe)
    parsed = [parse_prompt(p, lora_dir) for p in prompts]
    adapter_set.load([*adapters, *(s for _, specs in parsed for s in specs)])
    device = pipe._execution_device
    rows, info = [], []
    for (text, tagged), raw in zip(parsed, prompts, strict=True):
        weights = adapter_set.activate([*adapters, *tagged])
        row = []
        for i in range(0, len(seeds), batch_size):
            chunk = list(seeds)[i : i + batch_size]
            row += pipe(
                [text] * len(chunk),
                negative_prompt=[negative_prompt] * len(chunk),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator(device).manual_seed(s) for s in chunk],
                height=resolution,
                width=resolution,
            ).images
        rows.append(row)
        info.append({"prompt": raw, "text": text, "adapter_weights": weights, "seeds": list(seeds)})
    return rows, info


def prepare_pipeline(cfg: DictConfig) -> StableDiffusionPipeline:
    """The base model on the device, with the sampler, embeddings and (merged) adapters."""
    from sdft.train import build

    pipe: StableDiffusionPipeline = build(cfg.model)
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    pipe.to(device)
    if device.startswith("cuda"):
        pipe.to(dtype=torch.bfloat16)  # bf16, not fp16: the SD VAE can overflow in fp16
    pipe.set_progress_bar_config(disable=True)
    set_sampler(pipe, cfg.sampler)
    for path in cfg.embeddings:
        log.info("embedding %s -> token %s", path, load_embedding(pipe, path))
    if cfg.merge_to:
        for spec in map(parse_adapter, cfg.lora):
            merge_adapter(pipe, spec.path, spec.weight)
        pipe.save_pretrained(cfg.merge_to)
        print(f"sdft: merged pipeline written to {cfg.merge_to}")
    return pipe


def run(cfg: DictConfig) -> dict:
    """Generate as `cfg` says; write each image and a prompts x seeds grid."""
    out = Path(cfg.out_dir)
    pipe = prepare_pipeline(cfg)
    if not cfg.prompts:  # prompts=[] merge_to=...: only write the merged pipeline
        return {"output_dir": out, "grid": None, "rows": [], "info": []}
    adapters = [] if cfg.merge_to else [parse_adapter(s) for s in cfg.lora]
    rows, info = generate(
        pipe,
        list(cfg.prompts),
        adapters,
        lora_dir=cfg.lora_dir,
        negative_prompt=cfg.negative_prompt,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        seeds=list(cfg.seeds),
        batch_size=cfg.batch_size,
        resolution=cfg.resolution,
    )
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r, (row, seeds) in enumerate(zip(rows, [i["seeds"] for i in info], strict=True)):
        for image, seed in zip(row, seeds, strict=True):
            image.save(out / "images" / f"{r:02d}_seed{seed}.png")
    grid = image_grid([im for row in rows for im in row], rows=len(rows))
    grid.save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps(info, indent=1))
    print(f"sdft: {sum(map(len, rows))} images and grid.png in {out}")
    return {"output_dir": out, "grid": out / "grid.png", "rows": rows, "info": info}
