"""One adapted layer as kohya / A1111 / LyCORIS files store it, and the update it makes.

Every reader of these files (A1111, ComfyUI, LyCORIS, diffusers) applies
W' = W + weight * scale * dW, with scale = alpha / rank and
  LoRA  dW = lora_up @ lora_down                 (conv: k x k down (r, in, k, k), 1 x 1 up)
  LoHa  dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)     (elementwise product;
        with hada_t1/t2, each product is a CP (Tucker) reconstruction over the kernel)
  LoKr  dW = kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, same for w2 (or a CP
        reconstruction from lokr_t2). The rank is that of a decomposed factor; with both
        factors full there is no rank and the scale is 1 (alpha is ignored).
A file without alpha (diffusers/PEFT convention) has scale 1.
sdft applies these updates through peft's layers only (generation, merging: `load.py`); here
they give the shape a file's factors make, and `tests/test_export.py` keeps the formula as
the oracle that peft's layers are checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

FACTORS = {
    "lora": ("lora_down", "lora_up"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
# peft's parameter names for the same factors (LyCORIS names are peft's, except LoRA's)
PEFT_NAMES = {"lora_down": "lora_A", "lora_up": "lora_B"}
LYCORIS_NAMES = {v: k for k, v in PEFT_NAMES.items()}
ADAPTER_PARAMS = ("lora_", "hada_", "lokr_")  # what peft's adapter parameter names start with


def kind_of(suffix: str) -> str | None:
    """'lora', 'loha' or 'lokr' for a factor name, None for anything else."""
    return next((k for k, names in FACTORS.items() if suffix in names), None)


@dataclass
class LayerWeights:
    """The factors of one layer under their LyCORIS names, and its alpha (None: none stored)."""

    kind: str  # lora | loha | lokr
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        # A1111 and LyCORIS read the rank from w2's factors if decomposed, else from w1's
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in t:
                return t[name].shape[0]
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def update_shape(self) -> tuple[int, ...]:
        """The shape of this layer's update dW, from its factors' shapes: the layer's weight
        shape, or (out, in * k * k) for conv factors stored flattened (LyCORIS without
        Tucker). ValueError if the factors do not combine."""
        s = {k: tuple(v.shape) for k, v in self.tensors.items()}

        def product(a: str, b: str) -> tuple[int, ...]:  # (m, r) @ (r, n)
            if s[a][1] != s[b][0]:
                raise ValueError
            return s[a][0], s[b][1]

        def cp(t: str, a: str, b: str) -> tuple[int, ...]:  # core (r, r, k, k), (r, out), (r, in)
            if s[t][:2] != (s[a][0], s[b][0]):
                raise ValueError
            return s[a][1], s[b][1], *s[t][2:]

        if self.kind == "lora":
            if s["lora_up"][1] != s["lora_down"][0]:
                raise ValueError
            return s["lora_up"][0], *s["lora_down"][1:]
        if self.kind == "loha":
            w1, w2 = (
                cp(f"hada_t{i}", f"hada_w{i}_a", f"hada_w{i}_b")
                if "hada_t1" in s
                else product(f"hada_w{i}_a", f"hada_w{i}_b")
                for i in (1, 2)
            )
            if w1 != w2:  # an elementwise product
                raise ValueError
            return w1
        w1 = s["lokr_w1"] if "lokr_w1" in s else product("lokr_w1_a", "lokr_w1_b")
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
        elif "lokr_t2" in s:
            w2 = cp("lokr_t2", "lokr_w2_a", "lokr_w2_b")
        else:
            w2 = product("lokr_w2_a", "lokr_w2_b")
        w1 = (*w1, 1, 1)[: len(w2)]  # a conv's kernel sits in W2
        return tuple(x * y for x, y in zip(w1, w2, strict=True))  # kron(W1, W2)

    def check_fits(self, weight_shape: torch.Size) -> str | None:
        """None if this update fits a layer of weight `weight_shape`, else what is wrong."""
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.tensors.items())
        try:
            natural = self.update_shape()
        except (ValueError, KeyError):
            return f"its factors do not combine ({shapes})"
        flat = (weight_shape[0], math.prod(weight_shape[1:]))
        if natural == tuple(weight_shape) or (len(natural) == 2 and natural == flat):
            return None
        return (
            f"its factors ({shapes}) make a {natural} update for a weight of {tuple(weight_shape)}"
        )


def peft_factor(layer: BaseTunerLayer, factor: str, adapter: str) -> torch.Tensor:
    """The tensor of a peft layer's factor, named as LyCORIS names it (a view: writing to it
    writes the layer's weight)."""
    if factor == "dora_scale":  # peft: (out,) linear, (1, out, 1, 1) conv; LyCORIS (out, 1[, 1, 1])
        up = peft_factor(layer, "lora_up", adapter)  # (out, r[, 1, 1])
        m = layer.lora_magnitude_vector[adapter].weight
        return m.view(up.shape[0], *[1] * (up.dim() - 1))
    value = getattr(layer, PEFT_NAMES.get(factor, factor))[adapter]
    return value.weight if isinstance(value, torch.nn.Module) else value


def peft_layer_weights(layer: BaseTunerLayer, adapter: str) -> LayerWeights:
    """A trained peft LoRA / LoHa / LoKr layer's factors under LyCORIS names, with the alpha
    that makes a reader's alpha / rank equal to the layer's scaling."""
    kind = {"lora_A": "lora", "hada_w1_a": "loha", "lokr_w1": "lokr"}[layer.adapter_layer_names[0]]
    tensors = {}
    for name in FACTORS[kind]:
        if adapter in getattr(layer, PEFT_NAMES.get(name, name)):
            tensors[name] = peft_factor(layer, name, adapter).detach()
    weights = LayerWeights(kind, tensors)
    if adapter in getattr(layer, "lora_magnitude_vector", {}):  # DoRA: one norm per output row
        tensors["dora_scale"] = peft_factor(layer, "dora_scale", adapter).detach()
    scaling = float(layer.scaling[adapter])
    if weights.rank is None:  # full LoKr factors: readers apply no scale, so bake it into w1
        tensors["lokr_w1"] = tensors["lokr_w1"] * scaling
        weights.alpha = float(layer.r[adapter])
    else:
        weights.alpha = scaling * weights.rank
    return weights


def adapter_layers(model: torch.nn.Module, adapter: str) -> dict[str, LayerWeights]:
    """Module path -> factors of every peft layer of `model` that holds `adapter`."""
    return {
        name: peft_layer_weights(module, adapter)
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
        and any(adapter in getattr(module, n) for n in module.adapter_layer_names)
    }
