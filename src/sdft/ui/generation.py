"""The Generate tab: one base pipeline kept loaded, adapters by file at weights, through
`sdft.generate` (the same code as `generate.py`)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdft.adapters.load import is_embedding, read_safetensors
from sdft.eval.grids import image_grid
from sdft.generate import (
    AdapterSet,
    AdapterSpec,
    generate,
    load_embedding,
    parse_adapter,
    set_sampler,
)

COMPARE_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the paper's view: one seed across scales


class Generator:
    """Loads the base model on first use (`load` builds it) and keeps it."""

    def __init__(self, load):
        self._load = load
        self.pipe = None
        self.adapters: AdapterSet | None = None
        self.tokens: dict[Path, str | None] = {}  # file -> its TI token (None: an adapter)

    def ready(self):
        if self.pipe is None:
            self.pipe = self._load()
            self.adapters = AdapterSet(self.pipe)
        return self.pipe

    def images(
        self,
        adapters: list[AdapterSpec],
        prompt: str,
        negative_prompt: str = "",
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        guidance_scale: float = 7.0,
        seeds: list[int] = (0,),
        resolution: int | None = None,
    ) -> list[Image.Image]:
        pipe = self.ready()
        set_sampler(pipe, sampler)
        adapters = [s for s in adapters if not self.embedding(s.path)]  # TI: tokens, no weight
        rows, _ = generate(
            pipe, [prompt], adapters, negative_prompt=negative_prompt, steps=steps,
            guidance_scale=guidance_scale, seeds=list(seeds), resolution=resolution,
            adapter_set=self.adapters,
        )  # fmt: skip
        return rows[0]

    def embedding(self, path: Path) -> bool:
        """Load a textual-inversion file's tokens once; False for an adapter file."""
        path = Path(path).resolve()
        if path not in self.tokens:
            embedding = is_embedding(read_safetensors(path)[0])
            self.tokens[path] = load_embedding(self.pipe, path) if embedding else None
        return self.tokens[path] is not None

    def compare_scales(
        self, adapter: Path, others: list[AdapterSpec], seed: int, **kwargs
    ) -> tuple[Image.Image, list[float]]:
        """One seed at each scale of COMPARE_SCALES, side by side (left: the base model)."""
        row = []
        for scale in COMPARE_SCALES:
            specs = [AdapterSpec(Path(adapter), scale), *others]
            row += self.images(specs, seeds=[seed], **kwargs)
        return image_grid(row, rows=1), list(COMPARE_SCALES)


def parse_extra(text: str) -> list[AdapterSpec]:
    """The "more adapters" box: one `path:weight` a line (a run folder or a file)."""
    return [parse_adapter(line.strip()) for line in (text or "").splitlines() if line.strip()]
