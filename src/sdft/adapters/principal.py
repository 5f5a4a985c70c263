"""PiSSA and OLoRA (`method.init=pissa|olora`) with the base weights left as they are.

peft starts A and B from the base weight's principal part (PiSSA: the top-r singular
vectors; OLoRA: the first r columns of a QR) and subtracts that part from the base,
W_res = W0 - s B0 A0, so that training starts from the base model's output. sdft keeps W0
and subtracts s B0 A0 through a frozen second adapter, `initial` (A = A0, B = -B0), active
beside the trained one. The function and the gradients are peft's, and:
  - LoRA scale 0 is the base model and scale x gives W0 + x s (B A - B0 A0), so the scale
    sweep and `cross_attention_kwargs={"scale": x}` mean what they mean for plain LoRA;
  - the files are plain LoRAs on the original base: both adapters as one of rank 2r,
    A' = [A; A0], B' = [B, -B0] (the form of peft's `path_initial_model_for_weight_conversion`),
    with alpha doubled (x sqrt 2 under rsLoRA) so that the scale stays alpha / r;
  - a resumed run rebuilds `initial` from the base (the SVD and QR are deterministic), then
    loads the trained factors, which are all a checkpoint holds.
peft has no PiSSA/OLoRA for convolutions: LoCon's conv layers start as usual (B = 0) with a
zero `initial`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from sdft.adapters.layers import LayerWeights

INITIAL = "initial"  # the frozen adapter that subtracts the initial principal part
PRINCIPAL_INITS = ("pissa", "olora")


@torch.no_grad()
def add_initial(model: torch.nn.Module, config: LoraConfig, init: str, adapter: str) -> None:
    """Start `adapter`'s factors from each base weight's principal part (peft's own
    `pissa_init` / `olora_init`) and add the frozen `initial` adapter that cancels it."""
    with warnings.catch_warnings():  # "multiple adapters in the model": two, on purpose
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(dataclasses.replace(config, lora_dropout=0.0), adapter_name=INITIAL)
    for layer in model.modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        a0, b0 = layer.lora_A[INITIAL].weight, layer.lora_B[INITIAL].weight
        if isinstance(layer, LoraLinear):
            weight = layer.get_base_layer().weight
            w0 = weight.detach().clone()
            if init == "pissa":
                layer.pissa_init(adapter, "pissa")  # full SVD: the same factors on every run
            else:
                layer.olora_init(adapter)
            weight.data = w0  # peft leaves W0 - s B0 A0 here; the `initial` adapter does that
            a0.copy_(layer.lora_A[adapter].weight)
            b0.copy_(-layer.lora_B[adapter].weight)
        else:
            a0.zero_()
            b0.zero_()
        layer.set_adapter([adapter, INITIAL])


def is_trained(param_name: str, adapter: str) -> bool:
    """Whether a peft parameter belongs to `adapter` (`...lora_A.default.weight`,
    `...hada_w1_a.default`), not to another such as `initial`."""
    return adapter in param_name.split(".")


def exported_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r file: ranks doubled, alphas doubled (x sqrt 2 for rsLoRA,
    whose scale is alpha / sqrt(r)) so that every layer keeps its scale."""
    grow = math.sqrt(2) if config.use_rslora else 2.0
    return dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=grow * config.lora_alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
        init_lora_weights="gaussian",  # the file is a plain LoRA: no principal init to redo
    )


def joined(trained: torch.Tensor, initial: torch.Tensor, factor: str) -> torch.Tensor:
    """One factor of the rank-2r LoRA: A / down (r, in, ...) stacked on rows, B / up
    (out, r, ...) on columns."""
    return torch.cat([trained, initial], dim=0 if factor in ("lora_A", "lora_down") else 1)


def joined_state_dict(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """peft state dicts (`<path>.lora_A.weight`, ...) of the two adapters as one."""
    return {k: joined(v, initial[k], k.split(".")[-2]) for k, v in trained.items()}


def joined_layers(
    trained: dict[str, LayerWeights], initial: dict[str, LayerWeights]
) -> dict[str, LayerWeights]:
    """kohya layers of the two adapters as one: rank 2r, alpha 2 alpha (the same scale)."""
    out = {}
    for path, lw in trained.items():
        tensors = {f: joined(t, initial[path].tensors[f], f) for f, t in lw.tensors.items()}
        out[path] = LayerWeights(lw.kind, tensors, 2 * lw.alpha)
    return out
