"""Writing adapters in kohya sd-scripts / A1111 / LyCORIS format, with kohya's `ss_*` metadata.

kohya names a layer by its diffusers module path with "." -> "_", after a prefix for the model
part: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, and for the text
encoder `lora_te_text_model_encoder_layers_0_self_attn_q_proj`. Each layer stores its factors
(`.lora_down.weight` / `.lora_up.weight`, or LyCORIS `.hada_w1_a` ..., `.lokr_w1` ...) and a
scalar `.alpha`; conv layers keep their 4-D shapes. See `sdft.adapters.layers` for the update
rule that readers apply.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from omegaconf import DictConfig
from safetensors.torch import save, save_file

from sdft.adapters.layers import LayerWeights
from sdft.files import atomic_path

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_save_dtype(save_dtype: str) -> torch.dtype:
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"method.save_dtype={save_dtype!r} must be one of {list(SAVE_DTYPES)}")
    return SAVE_DTYPES[save_dtype]


def kohya_name(component: str, module_path: str) -> str:
    return KOHYA_PREFIX[component] + module_path.replace(".", "_")


def kohya_state_dict(
    layers: dict[str, dict[str, LayerWeights]], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """{component: {module path: factors}} -> kohya/LyCORIS keys (alpha stored in `dtype` too,
    as kohya does)."""
    out = {}
    for component, by_path in layers.items():
        for path, lw in by_path.items():
            name = kohya_name(component, path)
            for factor, t in lw.tensors.items():
                plain = lw.kind != "lora" or factor == "dora_scale"  # DoRA: no .weight
                key = f"{name}.{factor}" if plain else f"{name}.{factor}.weight"
                out[key] = t.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(lw.alpha), dtype=dtype)
    return out


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """kohya's `sshs_model_hash` (sha256 of the tensor data, what A1111 shows as the LoRA
    hash) and `sshs_legacy_hash`, computed on the bytes the file will hold."""
    data = save(tensors, metadata)
    header_len = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + header_len :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


def base_model_version(pipe: StableDiffusionPipeline) -> str:
    """kohya's `ss_base_model_version`: SD2 has a 1024-wide text encoder (v-prediction at 768)."""
    if pipe.unet.config.cross_attention_dim != 1024:
        return "sd_v1"
    v = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    return "sd_v2_768_v" if v else "sd_v2_512"


def kohya_metadata(
    pipe: StableDiffusionPipeline, network: dict[str, object], run: dict | None
) -> dict[str, str]:
    """`ss_*` keys as kohya sd-scripts writes them (strings only), from the method's
    `network` description and the run's metadata (base model, steps, resolution, ...)."""
    run = run or {}
    version = base_model_version(pipe)
    res = run.get("resolution")
    meta = {
        "ss_base_model_version": version,
        "ss_v2": str(version != "sd_v1"),
        "ss_sd_model_name": str(run.get("base_model", pipe.name_or_path)),
        "ss_resolution": f"({res}, {res})" if res else None,
        "ss_steps": run.get("steps"),
        "ss_max_train_steps": run.get("max_steps"),
        "ss_seed": run.get("seed"),
        "ss_dataset_hash": run.get("dataset_hash"),
        "ss_training_comment": "trained with sdft",
        **{f"ss_{k}": v for k, v in network.items()},
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None}


def save_kohya(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a kohya/A1111 safetensors file atomically, with its `sshs_*` hashes."""
    metadata = {**metadata, **safetensors_hashes(tensors, metadata)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_metadata(cfg: DictConfig, out_dir: Path) -> dict:
    """What a run's adapter files record about it, beside the base model and step count
    (which the module knows): resolution, planned steps, seed, and a hash of the data split."""
    return {
        "resolution": cfg.data.get("resolution"),
        "max_steps": cfg.trainer.get("max_steps"),
        "seed": cfg.get("seed"),
        "dataset_hash": file_sha256(Path(out_dir) / "split.json"),
    }
