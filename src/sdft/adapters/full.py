"""Full fine-tuning: every UNet weight trains (`method=full`); no adapter, the UNet itself.

Under bf16 mixed precision the UNet stays in fp32 (the module casts only frozen weights) and
autocast runs its matmuls in bf16, so the optimizer updates fp32 master weights, as the
diffusers full fine-tuning example does. A checkpoint holds the whole UNet and its optimizer
state (16 bytes per weight with AdamW: ~14 GB for SD1.5). The file is the UNet as diffusers
saves it, `unet/config.json` + `unet/diffusion_pytorch_model.safetensors`: load it with
`UNet2DConditionModel.from_pretrained(run_dir, subfolder="unet")` and pass it to the base
pipeline (`StableDiffusionPipeline.from_pretrained(base, unet=unet)`). A LoRA scale means
nothing here: the scale sweep scores scale 1.0 only.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from sdft.adapters import export
from sdft.files import atomic_output, atomic_path

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name


class FullFineTuneMethod:
    """Trains every weight of the UNet; writes it as a diffusers `unet/` folder."""

    name = "full"
    has_lora_b = False  # LoRA+ has no B matrices to scale here
    lora_scale = False  # no adapter for `cross_attention_kwargs={"scale": ...}` to scale

    def __init__(self, save_dtype: str = "float32", output_name: str = "unet"):
        self.save_torch_dtype = export.check_save_dtype(save_dtype)
        self.output_name = output_name

    def describe(self) -> dict:
        return {"name": self.name}

    def apply(self, pipe: StableDiffusionPipeline) -> None:
        pipe.unet.requires_grad_(True)

    def save(
        self, pipe: StableDiffusionPipeline, out_dir: str | Path, metadata: dict | None = None
    ) -> list[Path]:
        """`<output_name>/config.json` and `<output_name>/diffusion_pytorch_model.safetensors`
        (each written atomically; `metadata` in the safetensors header)."""
        folder = Path(out_dir) / self.output_name
        state = {
            k: v.detach().to("cpu", self.save_torch_dtype).contiguous()
            for k, v in pipe.unet.state_dict().items()
        }
        meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
        with atomic_path(folder / WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata=meta)
        with atomic_output(folder / "config.json") as tmp_dir:
            pipe.unet.save_config(tmp_dir)
        return [folder / WEIGHTS, folder / "config.json"]
