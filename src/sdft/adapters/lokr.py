"""LoKr (LyCORIS "LoRA with Kronecker product"), through peft.

Update rule: W' = W0 + (alpha / r) * kron(W1, W2), where a layer's (out, in) is factored as
(a * b, c * d) (`decompose_factor`: -1 = near the square root), W1 is (a, c) and W2 (b, d);
W2 (and with `decompose_both` W1) is itself a rank-r product when r is small against its
size, else a full matrix. Tiny files for large updates. W1 starts at zero. When both factors
are full, LyCORIS readers apply no alpha / r: the export bakes that scale into lokr_w1.
Files: LyCORIS keys (`lokr_w1`, `lokr_w2_a`, `lokr_w2_b`, ..., `alpha`) under kohya layer
names, read by A1111, ComfyUI and the LyCORIS tools (and by sdft.generate).
"""

from __future__ import annotations

from peft import LoKrConfig

from sdft.adapters.base import PeftMethod


class LoKrMethod(PeftMethod):
    """LoKr adapters on the chosen attention (and, with conv_rank, conv) layers of the UNet."""

    name = "lokr"
    network_module = "lycoris.kohya"

    def __init__(
        self,
        rank: int = 8,
        decompose_factor: int = -1,
        decompose_both: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        output_name: str = "lokr",
        **options,  # the PeftMethod options: alpha, target modules, conv rank, ...
    ):
        super().__init__(rank=rank, output_name=output_name, **options)
        if decompose_factor == 0 or decompose_factor < -1:
            raise ValueError(f"method.decompose_factor={decompose_factor} must be -1 or > 0")
        if decompose_both and self.conv_rank is not None:
            # LyCORIS guesses a conv layer's shape from w1 and w2; with both decomposed it
            # guesses wrong and cannot load the file (A1111 and ComfyUI can)
            raise ValueError(
                f"method.decompose_both=true with method.conv_rank={self.conv_rank}: LyCORIS "
                "cannot load the LoKr file this would export; drop one of the two"
            )
        self.decompose_factor, self.decompose_both = decompose_factor, decompose_both
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def peft_config(self) -> LoKrConfig:
        rank_pattern, alpha_pattern = self.rank_patterns()
        return LoKrConfig(
            r=self.rank,
            alpha=self.alpha,
            decompose_factor=self.decompose_factor,
            decompose_both=self.decompose_both,
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
            target_modules=self.target_regex,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )

    def describe(self) -> dict:
        return super().describe() | {"decompose_factor": self.decompose_factor}

    def network_args(self) -> dict:
        return {"algo": "lokr", "factor": self.decompose_factor, **super().network_args()}
