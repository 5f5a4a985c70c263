"""Reading adapter files made anywhere (sdft, kohya sd-scripts, LyCORIS, A1111, diffusers):
check that one fits a pipeline, load it for generation, merge it into the base weights
(W' = W + scale * dW), or start training from it.

Formats, told apart by their keys:
  kohya / A1111 / LyCORIS  `lora_unet_<path with _>.lora_down.weight`, `.hada_w1_a`, `.lokr_w1`,
                           `.alpha`; text encoder `lora_te_text_model_...` (`lora_te1_` read the
                           same; also without `text_model`, as sdft wrote it under transformers 5)
  diffusers / PEFT         `unet.<path>.lora_A.weight` / `.lora.down.weight` (older), alpha in
                           the `lora_adapter_metadata` header (else scale 1)
  embedding                one (n, D) tensor, or kohya/A1111 `emb_params`
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import (
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
    recurse_remove_peft_layers,
)
from peft import LoHaConfig, LoKrConfig, LoraConfig, set_peft_model_state_dict
from peft.tuners.lokr.layer import factorization
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from torch import nn

from sdft.adapters.export import TEXT_MODEL, file_path
from sdft.adapters.layers import (
    ADAPTER_PARAMS,
    LYCORIS_NAMES,
    LayerWeights,
    kind_of,
    peft_factor,
    peft_layer_weights,
)

COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
SHOW = 3  # mismatches named in an error message
DORA_SCALE = "dora_scale"  # DoRA's magnitude in kohya/LyCORIS files: (out, 1[, 1, 1])


class AdapterMismatchError(ValueError):
    """An adapter file that does not fit the pipeline (other architecture, wrong ranks)."""


@dataclass
class AdapterFile:
    """An adapter file read into layers keyed by (component, module path)."""

    path: Path
    format: str  # kohya | diffusers | embedding
    layers: dict[tuple[str, str], LayerWeights] = field(default_factory=dict)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # the file's layer names
    unknown: list[str] = field(default_factory=list)  # layer names no module of the pipe has
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def kinds(self) -> set[str]:
        return {lw.kind for lw in self.layers.values()}

    @property
    def dora_layers(self) -> int:
        return sum(DORA_SCALE in lw.tensors for lw in self.layers.values())


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(
            f"{path}: not a safetensors file ({e}). sdft reads .safetensors only "
            "(pickled .pt/.ckpt/.bin files can run code when loaded)"
        ) from None
    check_finite(tensors, str(path))
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/inf weights: they give black images, and metrics that look like results."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{source}: tensor {key!r} holds NaN or infinite values; refused")


def module_paths(model: nn.Module) -> set[str]:
    """Paths of the Linear/Conv2d layers of `model`, as if no peft layers were injected."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and not any(
            part.startswith(ADAPTER_PARAMS) for part in name.split(".")
        ):
            out.add(name.replace(".base_layer", ""))
    return out


def model_path(pipe: StableDiffusionPipeline, component: str, path: str) -> str:
    """A file's module path as `pipe` names it: text-encoder paths with or without the
    `text_model.` level, whichever the installed transformers has."""
    if component != "text_encoder":
        return path
    path = path.removeprefix(TEXT_MODEL)
    return TEXT_MODEL + path if hasattr(pipe.text_encoder, "text_model") else path


def base_module(pipe: StableDiffusionPipeline, component: str, path: str) -> nn.Module | None:
    try:
        module = getattr(pipe, component).get_submodule(path)
    except AttributeError:
        return None
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def is_embedding(tensors: dict[str, torch.Tensor]) -> bool:
    """A textual-inversion file: kohya/A1111 `emb_params`, or one (n, D) tensor."""
    if "emb_params" in tensors:
        return True
    return (
        len(tensors) == 1
        and next(iter(tensors.values())).dim() <= 2
        and not any(re.search(r"lora|hada|lokr", k) for k in tensors)
    )


def _read_kohya(adapter: AdapterFile, tensors: dict, pipe: StableDiffusionPipeline) -> None:
    index = {
        prefix + name.replace(".", "_"): (component, path)
        for prefix, component in KOHYA_PREFIXES.items()
        for path in module_paths(getattr(pipe, component))
        for name in (path, file_path(component, path))  # both text-encoder spellings
    }
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix.removesuffix(".weight")] = t
    for name, parts in grouped.items():
        alpha = parts.pop("alpha", None)
        kinds = {kind_of(s) for s in parts if s != DORA_SCALE}
        if None in kinds or len(kinds) != 1 or (DORA_SCALE in parts and kinds != {"lora"}):
            odd = [s for s in parts if kind_of(s) is None] or sorted(parts)
            raise ValueError(f"{adapter.path}: layer {name} has unsupported keys {odd}")
        if name not in index:
            adapter.unknown.append(name)
            continue
        lw = LayerWeights(kinds.pop(), parts, None if alpha is None else float(alpha))
        adapter.layers[index[name]] = lw
        adapter.keys[index[name]] = name


def _read_diffusers(adapter: AdapterFile, tensors: dict, pipe: StableDiffusionPipeline) -> None:
    config = json.loads(adapter.metadata.get("lora_adapter_metadata", "{}"))
    for component in COMPONENTS:
        sd = {
            k[len(component) + 1 :]: v for k, v in tensors.items() if k.startswith(component + ".")
        }
        if not sd:
            continue
        if component == "unet":  # older diffusers names (`.lora.down`, `to_q_lora`) -> PEFT's
            sd = convert_unet_state_dict_to_peft(sd)
        elif not all(re.search(r"\.(lora_A|lora_B|alpha)\b", k) for k in sd):
            sd = convert_state_dict_to_peft(sd)
        cfg = {
            k[len(component) + 1 :]: v for k, v in config.items() if k.startswith(component + ".")
        }
        alpha_pattern = cfg.get("alpha_pattern") or {}
        alphas = {k.removesuffix(".alpha"): float(v) for k, v in sd.items() if k.endswith(".alpha")}
        by_path: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in sd.items():
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(\w+)", key)
            path, factor = (m[1], m[2]) if m[1] else (m[3], m[4])
            if factor == "alpha":
                continue
            factor = LYCORIS_NAMES.get(factor, factor)
            if kind_of(factor) is None:
                raise ValueError(f"{adapter.path}: unsupported key {component}.{key}")
            by_path.setdefault(path, {})[factor] = t
        for path, parts in by_path.items():
            alpha = alphas.get(path)
            if alpha is None and "lora_alpha" in cfg:
                pattern = get_pattern_key(list(alpha_pattern), path)
                alpha = float(alpha_pattern.get(pattern, cfg["lora_alpha"]))
            key = (component, model_path(pipe, component, path))
            adapter.layers[key] = LayerWeights(kind_of(next(iter(parts))), parts, alpha)
            adapter.keys[key] = f"{component}.{path}"


def read_adapter(path: str | Path, pipe: StableDiffusionPipeline) -> AdapterFile:
    """Read an adapter file of any supported format, naming its layers after `pipe`'s."""
    tensors, metadata = read_safetensors(path)
    adapter = AdapterFile(Path(path).expanduser(), "embedding", metadata=metadata)
    if is_embedding(tensors):
        return adapter
    if all(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors):
        adapter.format = "kohya"
        _read_kohya(adapter, tensors, pipe)
    elif all(k.startswith(tuple(f"{c}." for c in COMPONENTS)) for k in tensors):
        adapter.format = "diffusers"
        _read_diffusers(adapter, tensors, pipe)
    else:
        odd = [k for k in tensors if not k.startswith(("lora_", "unet.", "text_encoder."))]
        raise AdapterMismatchError(
            f"{adapter.path}: not an SD1.x/2.x adapter file: keys such as {odd[:SHOW]} are neither "
            "kohya/LyCORIS (lora_unet_..., lora_te_...) nor diffusers (unet..., text_encoder...)"
        )
    return adapter


def check_fits(adapter: AdapterFile, pipe: StableDiffusionPipeline) -> None:
    """Raise AdapterMismatchError naming the first layers that `pipe` lacks or whose weight
    shape the file's factors do not make (another architecture, a rank that does not fit)."""
    problems = [f"{name}: no layer of this model has that name" for name in adapter.unknown]
    for (component, path), lw in adapter.layers.items():
        module = base_module(pipe, component, path)
        problem = "no such layer" if module is None else lw.check_fits(module.weight.shape)
        if problem:
            problems.append(f"{adapter.keys[(component, path)]}: {problem}")
    if problems:
        total = len(adapter.layers) + len(adapter.unknown)
        raise AdapterMismatchError(
            f"{adapter.path} does not fit base model {pipe.name_or_path!r} "
            f"({len(problems)} of {total} layers; a file for another architecture such as "
            f"SDXL?): " + "; ".join(problems[:SHOW]) + (" ..." if len(problems) > SHOW else "")
        )


def read_checked(path: str | Path, pipe: StableDiffusionPipeline) -> AdapterFile:
    adapter = read_adapter(path, pipe)
    if adapter.format != "embedding":
        check_fits(adapter, pipe)
    return adapter


@torch.no_grad()
def merge_adapter(pipe: StableDiffusionPipeline, path: str | Path, scale: float = 1.0) -> None:
    """W' = W + scale * dW for every layer of the adapter file, in place (DoRA: W' = m (W +
    scale dW) / ||W + scale dW||): the file is loaded as peft layers, peft merges each into
    its base weight, and the layers go again."""
    adapter = read_checked(path, pipe)
    if adapter.format == "embedding":
        raise ValueError(f"{path}: a textual-inversion embedding has no weights to merge")
    name = "sdft_merge"
    load_adapter(pipe, path, name)
    for component in sorted({c for c, _ in adapter.layers}):
        model = getattr(pipe, component)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and holds(module, name):
                module.scaling[name] *= scale
                module.merge(adapter_names=[name])  # peft's: DoRA's row norms included
                module.merged_adapters.remove(name)  # now part of the base weight for good
                module.delete_adapter(name)
        model.peft_config.pop(name, None)
        if not model.peft_config:  # no other adapter: back to the plain layers
            recurse_remove_peft_layers(model)
            del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = False


def holds(layer: BaseTunerLayer, name: str) -> bool:
    return any(name in getattr(layer, n) for n in layer.adapter_layer_names)


def adapter_name_for(path: str | Path) -> str:
    """A peft adapter name from a file name (peft names may not hold dots, and peft sets the
    name as a module attribute: `train.safetensors`, the default task's kohya file, would
    collide with `nn.Module.train`)."""
    name = re.sub(r"[^0-9A-Za-z_-]", "_", Path(path).stem)
    return f"{name}_adapter" if hasattr(torch.nn.Module, name) else name


def lokr_factor(layers: dict[str, LayerWeights], shapes: dict[str, torch.Size]) -> int:
    """The `decompose_factor` that splits every layer as the file's W1 does: (out, in) =
    (a * b, c * d) with W1 (a, c); -1 (near the square root) or a fixed side a."""
    w1 = {}
    for path, lw in layers.items():
        t = lw.tensors
        w1[path] = (
            t["lokr_w1"].shape
            if "lokr_w1" in t
            else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        )
    for factor in [-1, *sorted({a for a, _ in w1.values()})]:
        if all(
            (factorization(shapes[p][0], factor)[0], factorization(shapes[p][1], factor)[0])
            == tuple(w1[p])
            for p in layers
        ):
            return factor
    raise AdapterMismatchError(
        f"LoKr factors {sorted(set(map(tuple, w1.values())))[:SHOW]} that no single "
        "decompose_factor makes"
    )


def lycoris_config(
    kind: str, layers: dict[str, LayerWeights], shapes: dict[str, torch.Size]
) -> LoHaConfig | LoKrConfig:
    """The peft config that makes exactly the file's layers: each layer's rank and alpha as
    patterns (peft's scaling = alpha / r = the file's scale), CP/Tucker conv factors if the
    file has them, and for LoKr the factor sides and which factors are decomposed."""
    ranks, alphas = {}, {}
    for path, lw in layers.items():
        # LoKr with both factors full has no rank (scale 1): any rank that keeps them full
        r = lw.rank or max(d for t in lw.tensors.values() for d in t.shape[:2])
        ranks[re.escape(path)], alphas[re.escape(path)] = r, r * lw.scale
    factors = {f for lw in layers.values() for f in lw.tensors}
    common = dict(
        r=1,
        alpha=1,
        target_modules=sorted(layers),
        rank_pattern=ranks,
        alpha_pattern=alphas,
        use_effective_conv2d=bool(factors & {"hada_t1", "lokr_t2"}),
    )
    if kind == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(
        **common,
        decompose_both="lokr_w1_a" in factors,
        decompose_factor=lokr_factor(layers, shapes),
    )


def inject_lycoris(pipe: StableDiffusionPipeline, adapter: AdapterFile, name: str) -> None:
    """Add a LoHa/LoKr file's layers as peft adapter `name` (so `set_adapters` weighs it):
    peft builds the layers from a config made from the file, then loads its factors."""
    (kind,) = adapter.kinds
    for component in sorted({c for c, _ in adapter.layers}):
        model = getattr(pipe, component)
        layers = {p: lw for (c, p), lw in adapter.layers.items() if c == component}
        shapes = {p: base_module(pipe, component, p).weight.shape[:2] for p in layers}  # (out, in)
        model.add_adapter(lycoris_config(kind, layers, shapes), adapter_name=name)
        wrong = []  # a layer whose factors peft makes otherwise (structure the config cannot say)
        for path, lw in layers.items():
            layer = model.get_submodule(path)
            made = {
                n: tuple(getattr(layer, n)[name].shape)
                for n in layer.adapter_layer_names
                if name in getattr(layer, n)
            }
            want = {f: tuple(t.shape) for f, t in lw.tensors.items()}
            if made != want:
                key = adapter.keys[(component, path)]
                wrong.append(f"{key}: the file has {want}, peft makes {made}")
        if wrong:
            raise AdapterMismatchError(f"{adapter.path}: " + "; ".join(wrong[:SHOW]))
        state = {f"{p}.{f}": t for p, lw in layers.items() for f, t in lw.tensors.items()}
        set_peft_model_state_dict(model, state, adapter_name=name)


@torch.no_grad()
def inject_dora(pipe: StableDiffusionPipeline, adapter: AdapterFile, name: str) -> None:
    """Add a kohya/LyCORIS LoRA file with `dora_scale` keys (sdft's, LyCORIS', OneTrainer's)
    as peft DoRA adapter `name`: diffusers' loader drops `dora_scale` from SD1.x kohya files,
    which would give plain LoRA's output without a word."""
    if adapter.dora_layers != len(adapter.layers):
        raise ValueError(
            f"{adapter.path}: {adapter.dora_layers} of {len(adapter.layers)} layers have "
            f"{DORA_SCALE}: a DoRA file has it on every layer"
        )
    for component in sorted({c for c, _ in adapter.layers}):
        model = getattr(pipe, component)
        layers = {p: lw for (c, p), lw in adapter.layers.items() if c == component}
        ranks = {re.escape(p): lw.rank for p, lw in layers.items()}
        alphas = {re.escape(p): lw.rank * lw.scale for p, lw in layers.items()}
        config = LoraConfig(
            r=1, lora_alpha=1, target_modules=sorted(layers), rank_pattern=ranks,
            alpha_pattern=alphas, use_dora=True,
        )  # fmt: skip
        model.add_adapter(config, adapter_name=name)
        for path, lw in layers.items():
            layer = model.get_submodule(path)
            for factor in ("lora_down", "lora_up"):
                peft_factor(layer, factor, name).copy_(lw.tensors[factor])
            magnitude = layer.lora_magnitude_vector[name].weight  # (out,) or (1, out, 1, 1)
            magnitude.copy_(lw.tensors[DORA_SCALE].reshape(magnitude.shape))


def load_adapter(pipe: StableDiffusionPipeline, path: str | Path, name: str) -> None:
    """Load an adapter file as peft adapter `name` (diffusers' loader for LoRA/LoCon in
    either format, peft LoHa/LoKr layers for LyCORIS files), after checking it fits."""
    adapter = read_checked(path, pipe)
    if adapter.format == "embedding":
        raise ValueError(f"{path} is a textual-inversion embedding: list it under embeddings")
    if adapter.dora_layers:
        inject_dora(pipe, adapter, name)
    elif adapter.kinds == {"lora"}:
        pipe.load_lora_weights(str(adapter.path), adapter_name=name)
    elif len(adapter.kinds) == 1:
        inject_lycoris(pipe, adapter, name)
    else:
        raise ValueError(f"{path} mixes {sorted(adapter.kinds)} layers; merge it instead")


@torch.no_grad()
def init_from_file(
    pipe: StableDiffusionPipeline, path: str | Path, models: dict[str, nn.Module], method: str
) -> None:
    """Start the method's adapter ("default") from a file's factors, rescaled so that each
    layer's update equals the file's; layers the file lacks keep their initialisation."""
    adapter = read_checked(path, pipe)
    problems = []
    for key, lw in adapter.layers.items():
        component, module_path = key
        layer = models[component].get_submodule(module_path) if component in models else None
        if not isinstance(layer, BaseTunerLayer):
            problems.append(f"{adapter.keys[key]}: method={method} trains no such layer")
            continue
        ours = peft_layer_weights(layer, "default")
        mine = {k: tuple(v.shape) for k, v in ours.tensors.items()}
        theirs = {k: tuple(v.shape) for k, v in lw.tensors.items()}
        if ours.kind != lw.kind or mine != theirs:
            problems.append(
                f"{adapter.keys[key]}: the file has {lw.kind} {theirs}, "
                f"method={method} makes {ours.kind} {mine}"
            )
            continue
        for factor, t in lw.tensors.items():
            peft_factor(layer, factor, "default").copy_(t)
        # the update is linear in each factor: rescale one (not DoRA's magnitude, a norm)
        first = next(f for f in lw.tensors if f != DORA_SCALE)
        peft_factor(layer, first, "default").mul_(lw.scale / layer.scaling["default"])
    if problems:
        raise AdapterMismatchError(
            f"method.init_weights={str(path)!r} does not fit method={method} "
            f"({len(problems)} layers): " + "; ".join(problems[:SHOW])
        )
