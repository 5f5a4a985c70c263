"""LoCon (LyCORIS "LoRA for convolution"): LoRA on the attention projections and on the conv
layers of the ResNet blocks and the down/up samplers.

Update rule, per layer: W' = W0 + (alpha / r) * B A. For a k x k conv, A is a k x k conv
(in -> r channels) and B a 1 x 1 conv (r -> out), so dW = B A reshaped to (out, in, k, k);
3x3 convs use `conv_rank` / `conv_alpha` (LyCORIS conv_dim / conv_alpha), attention and 1x1
convs `rank` / `alpha`. Files are kohya `networks.lora` files with conv_dim, which A1111,
ComfyUI and diffusers' `load_lora_weights` read, and the diffusers format.
"""

from __future__ import annotations

from sdft.adapters.lora import LoRAMethod


class LoConMethod(LoRAMethod):
    """LoRA on attention + ResNet/sampler convolutions, with a separate conv rank and alpha."""

    name = "locon"

    def __init__(
        self,
        conv_rank: int | None = 4,
        conv_alpha: float | None = 1.0,
        output_name: str = "locon",
        **lora_options,  # every other LoRAMethod option (rank, alpha, ...)
    ):
        if conv_rank is None:
            raise ValueError(
                "method.conv_rank=None: LoCon needs a conv rank (else use method=lora)"
            )
        super().__init__(
            conv_rank=conv_rank, conv_alpha=conv_alpha, output_name=output_name, **lora_options
        )
