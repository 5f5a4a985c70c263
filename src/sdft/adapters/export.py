"""Writing adapters in kohya sd-scripts / A1111 / LyCORIS format (metadata: `metadata.py`).

kohya names a layer by its diffusers module path with "." -> "_", after a prefix for the model
part: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, and for the text
encoder `lora_te_text_model_encoder_layers_0_self_attn_q_proj`. Each layer stores its factors
(`.lora_down.weight` / `.lora_up.weight`, or LyCORIS `.hada_w1_a` ..., `.lokr_w1` ...) and a
scalar `.alpha`; conv layers keep their 4-D shapes. See `sdft.adapters.layers` for the update
rule that readers apply.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from sdft.adapters.layers import LayerWeights
from sdft.files import atomic_path

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# Every file convention (kohya, A1111, ComfyUI, LyCORIS, diffusers) names the CLIP text
# encoder's layers under `text_model.`, as transformers 4 did; transformers 5's CLIPTextModel
# has no such level, so the files add it back whatever the installed version calls them.
TEXT_MODEL = "text_model."
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_save_dtype(save_dtype: str) -> torch.dtype:
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"method.save_dtype={save_dtype!r} must be one of {list(SAVE_DTYPES)}")
    return SAVE_DTYPES[save_dtype]


def file_path(component: str, module_path: str) -> str:
    """A module path as adapter files spell it (`text_model.encoder.layers.0...`)."""
    if component == "text_encoder" and not module_path.startswith(TEXT_MODEL):
        return TEXT_MODEL + module_path
    return module_path


def kohya_name(component: str, module_path: str) -> str:
    return KOHYA_PREFIX[component] + file_path(component, module_path).replace(".", "_")


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


def save_kohya(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a kohya/A1111 safetensors file atomically, with its `sshs_*` hashes."""
    metadata = {**metadata, **safetensors_hashes(tensors, metadata)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
