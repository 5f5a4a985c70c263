"""DreamBooth-LoRA: LoRA trained on a few images of one subject, named by a rare token in the
instance prompt ("a sks scribble"), with prior preservation.

Loss = instance loss + prior_loss_weight * prior loss, where the prior loss is the same
noise-prediction loss on class images ("a scribble") that the base model generated once
before training (`sdft.data.dreambooth`): the adapter learns the subject without forgetting
what the class looks like. prior_loss_weight = 0 turns it off (and no class images are made).
Files are LoRA files (diffusers and kohya formats).
"""

from __future__ import annotations

from sdft.adapters.lora import LoRAMethod


class DreamBoothLoRAMethod(LoRAMethod):
    """LoRA with DreamBooth's prior-preservation weight (the module reads it for batches
    that carry class images, marked by `is_prior`)."""

    name = "dreambooth_lora"

    def __init__(
        self,
        prior_loss_weight: float = 1.0,
        output_name: str = "dreambooth_lora",
        **lora_options,  # every LoRAMethod option (rank, alpha, ...)
    ):
        if prior_loss_weight < 0:
            raise ValueError(f"method.prior_loss_weight={prior_loss_weight} must be >= 0")
        super().__init__(output_name=output_name, **lora_options)
        self.prior_loss_weight = float(prior_loss_weight)

    def describe(self) -> dict:
        return super().describe() | {"prior_loss_weight": self.prior_loss_weight}
