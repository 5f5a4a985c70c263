"""The paper's two CLIP metrics: CLIP score (torchmetrics) and CLIP image cosine similarity.

CLIP models are named in config by a string:
  "openai/clip-vit-base-patch16"        a transformers CLIP model: hub id or local folder
  "open_clip:ViT-L-14/openai"           an open_clip architecture / pretrained tag (image cosine
                                        only; also "open_clip:hf-hub:org/repo")
  "random:tiny", "random:vit-b-16", "random:vit-l-14"
                                        a transformers CLIP of that shape with seeded random
                                        weights, built offline (tests, CPU runs, GPU timing)
  "open_clip:tiny/random", "open_clip:ViT-B-32/random"
                                        the same through open_clip
Random models give numbers that mean nothing about images: they exist so that the whole
evaluation runs (and is timed) without the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from sdft.eval.grids import to_pil
from sdft.models.tokenizer import clip_tokenizer

# arch -> (text tower, vision tower, projection dim); vit-b-16 / vit-l-14 are OpenAI's shapes.
RANDOM_CLIP: dict[str, tuple[dict, dict, int]] = {
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        ),
        16,
    ),
    "vit-b-16": (
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        512,
    ),
    "vit-l-14": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        768,
    ),
}
# open_clip's counterpart of RANDOM_CLIP["tiny"]
OPEN_CLIP_TINY = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=4, width=32, layers=2, head_width=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
)


class ClipFeatures(nn.Module):
    """A transformers CLIPModel whose `get_*_features` return the projected embeddings as a
    tensor. transformers 5 returns a ModelOutput there, which torchmetrics 1.9's CLIPScore
    cannot read (torchmetrics issue #3407); this is the model torchmetrics is given."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads the text length limit from it

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return self._tensor(out)


def build_random_clip(arch: str = "tiny", seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A transformers CLIP of shape `arch` with seeded random weights and SD's real tokenizer."""
    if arch not in RANDOM_CLIP:
        raise ValueError(f"random CLIP arch {arch!r} is not one of {sorted(RANDOM_CLIP)}")
    text, vision, proj = RANDOM_CLIP[arch]
    config = CLIPConfig(
        text_config=dict(
            text, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"
        ),
        vision_config=dict(vision, hidden_act="quick_gelu"),
        projection_dim=proj,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    side = vision["image_size"]
    images = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return model, CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer())


def load_clip(name: str) -> tuple[ClipFeatures, CLIPProcessor]:
    """A transformers CLIP model and processor by config name ("random:ARCH" or a hub id/path)."""
    if name.startswith("random:"):
        model, processor = build_random_clip(name.removeprefix("random:"))
    else:
        try:
            model = CLIPModel.from_pretrained(name)
            processor = CLIPProcessor.from_pretrained(name)
        except OSError as e:
            raise OSError(
                f"CLIP model {name!r} could not be loaded: not in the local Hugging Face cache and "
                "the hub is unreachable (or the id is wrong). Offline, use eval=tiny (random CLIP "
                f"models) or turn the evaluator off with callbacks.scale_sweep=null. ({e})"
            ) from e
    return ClipFeatures(model.eval().requires_grad_(False)), processor


class ClipScorer:
    """CLIP score as torchmetrics' CLIPScore computes it: 100 x cosine(image, caption) per
    image; `clip_score()` reduces a set of them the way `CLIPScore.compute()` does."""

    def __init__(self, name: str, batch_size: int = 64):
        self.name, self.batch_size = name, batch_size
        self.model, self.processor = load_clip(name)

    def to(self, device: torch.device | str) -> ClipScorer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """uint8 images (N, 3, H, W) and N captions -> (N,) float32 scores on the CPU."""
        # CLIPScore.update's own per-sample step (private in torchmetrics): the same code, so
        # the same numbers, but it keeps each image's score for spreads and for DDP gathering.
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            score, _ = _clip_score_update(
                list(chunk), captions[i : i + self.batch_size], self.model, self.processor
            )
            out.append(score.float().cpu())
        return torch.cat(out)


def clip_score(scores: torch.Tensor) -> float:
    """The reduction of torchmetrics' CLIPScore.compute(): the mean, floored at 0."""
    return max(scores.float().mean().item(), 0.0)


class ImageEncoder:
    """Unit-norm CLIP image embeddings from a transformers CLIP or an open_clip model."""

    def __init__(self, name: str, batch_size: int = 64):
        self.name, self.batch_size = name, batch_size
        self.open_clip = name.startswith("open_clip:")
        if self.open_clip:
            self.model, self.preprocess = _load_open_clip(name.removeprefix("open_clip:"))
        else:
            self.model, processor = load_clip(name)
            self.preprocess = processor.image_processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> ImageEncoder:
        self.model.to(device)
        return self

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        if self.open_clip:  # open_clip's transforms take PIL images
            return torch.stack([self.preprocess(im) for im in to_pil(images)])
        return self.preprocess(images=list(images.cpu()), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) -> (N, D) float32 unit vectors on the CPU."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.pixel_values(images[i : i + self.batch_size]).to(self.device)
            if self.open_clip:
                feats = self.model.encode_image(x)
            else:
                feats = self.model.get_image_features(x)
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)


def _load_open_clip(spec: str) -> tuple[nn.Module, object]:
    """`ARCH/TAG` (TAG an open_clip pretrained tag, or "random"), or `hf-hub:org/repo`."""
    import open_clip

    if spec.startswith(("hf-hub:", "local-dir:")):
        model, _, preprocess = open_clip.create_model_and_transforms(spec)
        return model.eval().requires_grad_(False), preprocess
    arch, _, tag = spec.rpartition("/")
    if not arch:
        raise ValueError(
            f"open_clip model 'open_clip:{spec}' needs a pretrained tag, e.g. "
            "'open_clip:ViT-L-14/openai' (or '/random' for random weights)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "tiny":
            model = open_clip.model.CLIP(**OPEN_CLIP_TINY)
            side = OPEN_CLIP_TINY["vision_cfg"]["image_size"]
            preprocess = open_clip.image_transform(side, is_train=False)
        else:
            weights = None if tag == "random" else tag
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
    return model.eval().requires_grad_(False), preprocess


def image_cosine(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each generated embedding (N, D) with every reference (M, D) -> (N,).

    Both sides are unit vectors, so the mean over references is one dot product with their
    mean vector."""
    return generated @ references.mean(0)
