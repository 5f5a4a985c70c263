"""LoRA on the UNet's attention projections (optionally conv layers, and the text encoder),
through peft.

Update rule: h = W0 x + (alpha / r) * B A x, with A (r x in) and B (out x r); B starts at
zero so training starts from the base model exactly; A is Gaussian (as the paper and the
diffusers example) or Kaiming-uniform (peft's default). With `conv_rank` set this is LoCon
(see locon.py): conv layers get a k x k conv down (A) and a 1 x 1 conv up (B).

peft options: `use_rslora` scales by alpha / sqrt(r) instead of alpha / r (rank-stable);
`use_dora` (DoRA) trains a per-output-row magnitude m too:
W' = m * (W0 + s B A) / ||W0 + s B A||_row; `rank_pattern` / `alpha_pattern` (or kohya's
25 `block_dims` / `block_alphas` for SD1.x) give layers their own rank and alpha;
`init=pissa|olora` starts A and B from the base weights' principal part (principal.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from sdft.adapters import export
from sdft.adapters.base import PeftMethod, block_patterns
from sdft.adapters.layers import LayerWeights, adapter_layers
from sdft.adapters.principal import (
    INITIAL,
    PRINCIPAL_INITS,
    add_initial,
    exported_config,
    joined_layers,
    joined_state_dict,
)
from sdft.files import atomic_output

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention
INITS = {"gaussian": "gaussian", "kaiming": True}  # method.init -> peft init_lora_weights


class LoRAMethod(PeftMethod):
    """LoRA adapters on `target_modules` of the chosen attention layers of the UNet."""

    name = "lora"
    has_lora_b = True  # LoRA+ (optim.loraplus_ratio) raises the B matrices' learning rate

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: list[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        attention: str = "all",
        target_regex: str | None = None,
        init: str = "gaussian",
        use_dora: bool = False,
        use_rslora: bool = False,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        block_dims: list[int] | None = None,
        block_alphas: list[float] | None = None,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        train_text_encoder: bool = False,
        init_weights: str | None = None,
        save_dtype: str = "float32",
        output_name: str = "lora",
    ):
        super().__init__(
            rank=rank,
            alpha=alpha,
            target_modules=target_modules,
            attention=attention,
            target_regex=target_regex,
            conv_rank=conv_rank,
            conv_alpha=conv_alpha,
            init_weights=init_weights,
            save_dtype=save_dtype,
            output_name=output_name,
        )
        if init not in (*INITS, *PRINCIPAL_INITS):
            raise ValueError(f"method.init={init!r} must be one of {[*INITS, *PRINCIPAL_INITS]}")
        if init in PRINCIPAL_INITS and (use_dora or init_weights):
            other = "method.use_dora=true" if use_dora else f"method.init_weights={init_weights}"
            raise ValueError(
                f"method.init={init} starts from the base weights' principal part, which "
                f"{other} does not combine with: use one of them"
            )
        self.dropout, self.init, self.train_text_encoder = dropout, init, train_text_encoder
        self.use_dora, self.use_rslora = use_dora, use_rslora
        self.block_dims, self.block_alphas = block_dims, block_alphas
        blocks_r, blocks_a = block_patterns(block_dims, block_alphas)
        # the first matching pattern wins in peft: the user's own first, then the blocks'
        self.user_patterns = (
            {**(rank_pattern or {}), **blocks_r},
            {**(alpha_pattern or {}), **blocks_a},
        )

    def lora_config(self, target_modules: str | list[str] | None = None) -> LoraConfig:
        rank_pattern, alpha_pattern = self.rank_patterns() if target_modules is None else ({}, {})
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights=INITS.get(self.init, "gaussian"),  # pissa/olora: add_adapters
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            target_modules=target_modules or self.target_regex,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )

    def peft_config(self) -> LoraConfig:
        return self.lora_config()

    def text_encoder_config(self) -> LoraConfig:
        return self.lora_config(TEXT_ENCODER_TARGETS)

    def rank_patterns(self) -> tuple[dict, dict]:
        conv_r, conv_a = super().rank_patterns()
        return {**self.user_patterns[0], **conv_r}, {**self.user_patterns[1], **conv_a}

    def describe(self) -> dict:
        peft_options = {
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "rank_pattern": self.user_patterns[0],
            "alpha_pattern": self.user_patterns[1],
        }
        if self.init in PRINCIPAL_INITS:  # the checkpoint's factors are relative to it
            peft_options["init"] = self.init
        changed = {k: v for k, v in peft_options.items() if v}  # old checkpoints still match
        te = {"text_encoder": True} if self.train_text_encoder else {}
        return super().describe() | te | changed

    def trained_components(self, pipe: StableDiffusionPipeline) -> dict:
        te = {"text_encoder": pipe.text_encoder} if self.train_text_encoder else {}
        return {"unet": pipe.unet, **te}

    def add_adapters(self, pipe: StableDiffusionPipeline) -> None:
        super().add_adapters(pipe)
        if self.train_text_encoder:
            pipe.text_encoder.add_adapter(
                self.text_encoder_config(), adapter_name=self.adapter_name
            )
        if self.init in PRINCIPAL_INITS:
            for component, model in self.trained_components(pipe).items():
                add_initial(model, self.component_config(component), self.init, self.adapter_name)

    def component_config(self, component: str) -> LoraConfig:
        return self.peft_config() if component == "unet" else self.text_encoder_config()

    def exported_layers(self, model: torch.nn.Module) -> dict[str, LayerWeights]:
        layers = super().exported_layers(model)
        if self.init in PRINCIPAL_INITS:
            return joined_layers(layers, adapter_layers(model, INITIAL))
        return layers

    def kohya_network(self) -> dict:
        network = super().kohya_network()
        if self.init in PRINCIPAL_INITS:  # the file's rank-2r form (see principal.py)
            network |= {"network_dim": 2 * self.rank, "network_alpha": 2 * self.alpha}
        return network

    def network_args(self) -> dict:
        kohya = {  # kohya / LyCORIS names of the same options
            "train_text_encoder": self.train_text_encoder,
            "dora_wd": self.use_dora,
            "rs_lora": self.use_rslora,
            "block_dims": self.block_dims,
            "block_alphas": self.block_alphas,
        }
        return super().network_args() | {k: v for k, v in kohya.items() if v}

    def diffusers_state_dict(
        self, model: torch.nn.Module, component: str = "unet"
    ) -> dict[str, torch.Tensor]:
        """The adapter weights in diffusers/PEFT naming (what `load_lora_weights` reads), the
        text encoder's under `text_model.` whatever the installed transformers calls them."""
        sd = get_peft_model_state_dict(model, adapter_name=self.adapter_name)
        if self.init in PRINCIPAL_INITS:
            sd = joined_state_dict(sd, get_peft_model_state_dict(model, adapter_name=INITIAL))
        sd = {
            export.file_path(component, k): v.detach().to("cpu", self.save_torch_dtype)
            for k, v in sd.items()
        }
        return convert_state_dict_to_diffusers(sd)

    def file_config(self, component: str) -> LoraConfig:
        """The peft config that diffusers rebuilds the file's layers from."""
        config = self.component_config(component)
        return exported_config(config) if self.init in PRINCIPAL_INITS else config

    def unet_state_dict(self, pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
        return self.diffusers_state_dict(pipe.unet)

    def save(
        self, pipe: StableDiffusionPipeline, out_dir: str | Path, metadata: dict | None = None
    ) -> list[Path]:
        """Write `pytorch_lora_weights.safetensors` (diffusers format) and
        `<output_name>.safetensors` (kohya/A1111 format), each atomically."""
        name = "pytorch_lora_weights.safetensors"
        te = {}
        if self.train_text_encoder:
            te = {
                "text_encoder_lora_layers": self.diffusers_state_dict(
                    pipe.text_encoder, "text_encoder"
                ),
                "text_encoder_lora_adapter_metadata": self.file_config("text_encoder").to_dict(),
            }
        with atomic_output(Path(out_dir) / name) as tmp_dir:
            StableDiffusionPipeline.save_lora_weights(
                tmp_dir,
                unet_lora_layers=self.unet_state_dict(pipe),
                weight_name=name,
                unet_lora_adapter_metadata=self.file_config("unet").to_dict(),
                **te,
            )
        return [Path(out_dir) / name, *super().save(pipe, out_dir, metadata)]
