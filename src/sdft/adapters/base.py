"""What the peft-based methods (LoRA, LoCon, LoHa, LoKr, DreamBooth-LoRA) share: which UNet
layers get adapters, making exactly those trainable, starting from a file, and writing the
kohya/LyCORIS file (plus, for LoRA-type methods, the diffusers one).

A method is any object with `name`, `describe()` (what a resumed checkpoint must match),
`apply(pipe)` (add the trainable layers) and `save(pipe, out_dir, metadata) -> [paths]`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import PeftConfig

from sdft.adapters import export
from sdft.adapters.layers import ADAPTER_PARAMS, LayerWeights, adapter_layers
from sdft.adapters.load import init_from_file
from sdft.adapters.metadata import kohya_metadata
from sdft.adapters.principal import is_trained

ATTENTION_LAYERS = {"all": "attn1|attn2", "cross": "attn2", "self": "attn1"}
# kohya / LyCORIS "conv" layers: the ResNet blocks' convolutions and the down/up samplers.
# 3x3 kernels take the conv rank; the 1x1 conv_shortcut takes the linear rank, as in kohya.
CONV_LAYERS = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(downsamplers|upsamplers)\.0\.conv)"
CONV_3X3 = r"resnets\.\d+\.(conv1|conv2)|(downsamplers|upsamplers)\.0\.conv"


# kohya's 25 SD1.x blocks (networks/lora.py get_block_index): IN00-IN11, MID, OUT00-OUT11.
# IN k = down_blocks.i's attention/resnet j with k = 3 i + j + 1 (IN00, conv_in, has no LoRA),
# OUT k = up_blocks.i's j with k = 3 i + j; block_dims set the attention and 1x1 layers' rank.
NUM_BLOCKS = 25
BLOCK_LINEAR = r"to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\..+"  # a block's non-conv layers


def block_patterns(dims: list[int] | None, alphas: list[float] | None) -> tuple[dict, dict]:
    """kohya `block_dims` / `block_alphas` as peft rank_pattern / alpha_pattern."""
    for key, values in (("block_dims", dims), ("block_alphas", alphas)):
        if values is not None and len(values) != NUM_BLOCKS:
            raise ValueError(
                f"method.{key} has {len(values)} values: give {NUM_BLOCKS} "
                "(IN00-IN11, MID, OUT00-OUT11, as kohya)"
            )
    if dims is None:
        if alphas is not None:
            raise ValueError("method.block_alphas needs method.block_dims")
        return {}, {}
    for d in dims:
        check_rank("block_dims[...]", d)
    ranks, alpha_of = {}, {}
    for k in range(NUM_BLOCKS):
        if k == 0:
            continue  # IN00 is conv_in: kohya puts no LoRA there
        if k < 12:
            part = rf"down_blocks\.{(k - 1) // 3}\.(attentions|resnets)\.{(k - 1) % 3}"
        elif k == 12:
            part = r"mid_block\.(attentions|resnets)\.\d+"
        else:
            part = rf"up_blocks\.{(k - 13) // 3}\.(attentions|resnets)\.{(k - 13) % 3}"
        pattern = rf"{part}\.(.+\.({BLOCK_LINEAR})|conv_shortcut)"
        ranks[pattern] = dims[k]
        alpha_of[pattern] = float(alphas[k] if alphas is not None else dims[k])
    return ranks, alpha_of


def check_rank(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"method.{key}={value!r} must be a positive integer")


class PeftMethod(ABC):
    """Adapters from a peft config on the UNet's attention (and optionally conv) layers."""

    name: str  # the method's config name: lora, locon, ...
    adapter_name = "default"
    network_module = "networks.lora"  # kohya's ss_network_module

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: list[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        attention: str = "all",
        target_regex: str | None = None,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        init_weights: str | None = None,
        save_dtype: str = "float32",
        output_name: str = "adapter",
        use_dora: bool = False,  # only LoRAMethod handles it: any other method refuses it
    ):
        if use_dora:
            raise ValueError(
                f"method.use_dora=true: DoRA decomposes a LoRA update, use method=lora or "
                f"locon (method={self.name} has no DoRA form)"
            )
        check_rank("rank", rank)
        if conv_rank is not None:
            check_rank("conv_rank", conv_rank)
        if attention not in ATTENTION_LAYERS:
            raise ValueError(
                f"method.attention={attention!r} must be one of {list(ATTENTION_LAYERS)}"
            )
        self.save_torch_dtype = export.check_save_dtype(save_dtype)
        if init_weights is not None and not Path(init_weights).expanduser().is_file():
            raise FileNotFoundError(f"method.init_weights={init_weights!r}: no such file")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.conv_rank = conv_rank
        self.conv_alpha = float(conv_alpha if conv_alpha is not None else conv_rank or 1)
        self.init_weights, self.output_name = init_weights, output_name
        names = "|".join(re.escape(m) for m in target_modules)
        attn = rf".*\.({ATTENTION_LAYERS[attention]})\.({names})"
        self.target_regex = target_regex or (
            attn if conv_rank is None else f"(?:{attn})|(?:{CONV_LAYERS})"
        )

    # -- what subclasses define ----------------------------------------------------------
    @abstractmethod
    def peft_config(self) -> PeftConfig:
        """The peft LoraConfig / LoHaConfig / LoKrConfig of the UNet's adapter."""

    def rank_patterns(self) -> tuple[dict, dict]:
        """peft rank_pattern / alpha_pattern: the conv rank for 3x3 convolutions."""
        if self.conv_rank is None:
            return {}, {}
        return {CONV_3X3: self.conv_rank}, {CONV_3X3: self.conv_alpha}

    def network_args(self) -> dict:
        """kohya's ss_network_args."""
        if self.conv_rank is None:
            return {}
        return {"conv_dim": self.conv_rank, "conv_alpha": self.conv_alpha}

    # -- the method interface --------------------------------------------------------------
    def describe(self) -> dict:
        """What a checkpoint must match to be resumed with this method."""
        out = {"name": self.name, "rank": self.rank, "alpha": self.alpha}
        if self.conv_rank is not None:
            out |= {"conv_rank": self.conv_rank, "conv_alpha": self.conv_alpha}
        return out | {"target_regex": self.target_regex}

    def trained_components(self, pipe: StableDiffusionPipeline) -> dict:
        return {"unet": pipe.unet}

    def add_adapters(self, pipe: StableDiffusionPipeline) -> None:
        pipe.unet.add_adapter(self.peft_config(), adapter_name=self.adapter_name)

    def apply(self, pipe: StableDiffusionPipeline) -> None:
        """Add the adapter layers (from `init_weights` if given); afterwards exactly the
        adapter weights require grad."""
        matched = [n for n, _ in pipe.unet.named_modules() if re.fullmatch(self.target_regex, n)]
        if not matched:
            raise ValueError(f"method.target_regex={self.target_regex!r} matches no UNet layer")
        self.add_adapters(pipe)
        for model in self.trained_components(pipe).values():
            for n, p in model.named_parameters():
                trained = any(m in n for m in ADAPTER_PARAMS) and is_trained(n, self.adapter_name)
                p.requires_grad_(trained)
        if self.init_weights:
            init_from_file(pipe, self.init_weights, self.trained_components(pipe), self.name)

    def exported_layers(self, model: torch.nn.Module) -> dict[str, LayerWeights]:
        """The kohya file's layers of one trained model: its adapter's factors."""
        return adapter_layers(model, self.adapter_name)

    def kohya_network(self) -> dict:
        return {
            "network_module": self.network_module,
            "network_dim": self.rank,
            "network_alpha": self.alpha,
            "network_args": self.network_args(),
            "output_name": self.output_name,
        }

    def save(
        self, pipe: StableDiffusionPipeline, out_dir: str | Path, metadata: dict | None = None
    ) -> list[Path]:
        """Write the kohya/LyCORIS file `<output_name>.safetensors` (with `ss_*` metadata)."""
        layers = {c: self.exported_layers(m) for c, m in self.trained_components(pipe).items()}
        tensors = export.kohya_state_dict(layers, self.save_torch_dtype)
        meta = kohya_metadata(pipe, self.kohya_network(), metadata)
        path = Path(out_dir) / f"{self.output_name}.safetensors"
        return [export.save_kohya(tensors, path, meta)]
