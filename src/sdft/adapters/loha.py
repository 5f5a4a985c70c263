"""LoHa (LyCORIS "LoRA with Hadamard product", FedPara), through peft.

Update rule: W' = W0 + (alpha / r) * (A1 B1) * (A2 B2), an elementwise (Hadamard) product of
two rank-r products, so the update has rank up to r^2 for the parameters of 2 LoRAs of rank r.
A1, B1, A2 start random and B2 at zero (the update starts at zero). Conv layers use flattened
(out, in * k * k) factors as LyCORIS without Tucker. Files: LyCORIS keys (`hada_w1_a`,
`hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`) under kohya layer names, read by A1111,
ComfyUI and the LyCORIS tools; diffusers has no SD1.x LoHa loader (sdft.generate reads them).
"""

from __future__ import annotations

from peft import LoHaConfig

from sdft.adapters.base import PeftMethod


class LoHaMethod(PeftMethod):
    """LoHa adapters on the chosen attention (and, with conv_rank, conv) layers of the UNet."""

    name = "loha"
    network_module = "lycoris.kohya"

    def __init__(
        self,
        rank: int = 8,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        output_name: str = "loha",
        **options,  # the PeftMethod options: alpha, target modules, conv rank, ...
    ):
        super().__init__(rank=rank, output_name=output_name, **options)
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def peft_config(self) -> LoHaConfig:
        rank_pattern, alpha_pattern = self.rank_patterns()
        return LoHaConfig(
            r=self.rank,
            alpha=self.alpha,
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
            target_modules=self.target_regex,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )

    def network_args(self) -> dict:
        return {"algo": "loha", **super().network_args()}
