"""LoRA on the UNet's attention projections, through peft.

Update rule: h = W0 x + (alpha / r) * B A x, with A (r x in) and B (out x r); B starts at
zero so training starts from the base model exactly; A is Gaussian (as the paper and the
diffusers example) or Kaiming-uniform (peft's default).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from sdft.adapters.files import atomic_output

ATTENTION_LAYERS = {"all": "attn1|attn2", "cross": "attn2", "self": "attn1"}


class LoRAMethod:
    """LoRA adapters on `target_modules` of the chosen attention layers of the UNet."""

    name = "lora"
    adapter_name = "default"

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: list[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        attention: str = "all",
        target_regex: str | None = None,
        init: str = "gaussian",
    ):
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"method.rank={rank!r} must be a positive integer")
        if attention not in ATTENTION_LAYERS:
            raise ValueError(
                f"method.attention={attention!r} must be one of {list(ATTENTION_LAYERS)}"
            )
        if init not in ("gaussian", "kaiming"):
            raise ValueError(f"method.init={init!r} must be 'gaussian' or 'kaiming'")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.dropout = dropout
        self.init = init
        names = "|".join(re.escape(m) for m in target_modules)
        self.target_regex = target_regex or rf".*\.({ATTENTION_LAYERS[attention]})\.({names})"

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian" if self.init == "gaussian" else True,
            target_modules=self.target_regex,
        )

    def describe(self) -> dict:
        """What a checkpoint must match to be resumed with this method."""
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_regex": self.target_regex,
        }

    def apply(self, pipe: StableDiffusionPipeline) -> None:
        """Add the adapter layers; afterwards exactly the LoRA weights require grad."""
        matched = [n for n, _ in pipe.unet.named_modules() if re.fullmatch(self.target_regex, n)]
        if not matched:
            raise ValueError(f"method.target_regex={self.target_regex!r} matches no UNet layer")
        pipe.unet.add_adapter(self.lora_config(), adapter_name=self.adapter_name)
        for n, p in pipe.unet.named_parameters():
            p.requires_grad_("lora_" in n)

    def unet_state_dict(self, pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
        """The adapter weights in diffusers/PEFT naming (what `load_lora_weights` reads)."""
        sd = get_peft_model_state_dict(pipe.unet, adapter_name=self.adapter_name)
        return convert_state_dict_to_diffusers({k: v.detach().float().cpu() for k, v in sd.items()})

    def save(self, pipe: StableDiffusionPipeline, out_dir: str | Path) -> list[Path]:
        """Write `pytorch_lora_weights.safetensors` (diffusers format) atomically."""
        name = "pytorch_lora_weights.safetensors"
        with atomic_output(Path(out_dir) / name) as tmp_dir:
            StableDiffusionPipeline.save_lora_weights(
                tmp_dir,
                unet_lora_layers=self.unet_state_dict(pipe),
                weight_name=name,
                unet_lora_adapter_metadata=self.lora_config().to_dict(),
            )
        return [Path(out_dir) / name]
