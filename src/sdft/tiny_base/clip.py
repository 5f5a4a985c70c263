"""The evaluation CLIP pair of the tiny base (`eval=tiny_qd`): transformers' CLIPModel with SD's
real tokenizer, an image tower for 32 px drawings and a small text tower, trained on
(drawing, "a scribble of <category>") pairs of every category, so that the scale sweep's CLIP
score and image cosine come from a model that knows drawings.

Objective: CLIP's image-to-text cross-entropy with every category's prompt as the candidates
(not only the batch's captions: two drawings of one category in a batch would otherwise be
each other's negatives)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from sdft.eval.metrics import ClipFeatures
from sdft.models.tokenizer import clip_tokenizer
from sdft.tiny_base.data import SIDE

CLIP_CONFIG = dict(
    text_config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
    ),
    vision_config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=SIDE, patch_size=4, hidden_act="quick_gelu",
    ),
    projection_dim=64,
)  # fmt: skip


def clip_processor() -> CLIPProcessor:
    """SD's tokenizer and a 32 px image processor (CLIP's normalisation)."""
    images = CLIPImageProcessor(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )  # fmt: skip
    return CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer())


def to_clip_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    """sdft's drawings in [-1, 1] -> CLIP's normalised pixels (the processor's mean and std)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return ((pixel_values + 1) / 2 - mean) / std


class ClipPairTrainer(L.LightningModule):
    """Trains `CLIPModel(CLIP_CONFIG)` to pick each drawing's category prompt among all."""

    def __init__(self, prompts: list[str], lr: float = 1e-3):
        super().__init__()
        self.model = CLIPModel(CLIPConfig(**CLIP_CONFIG))
        self.features = ClipFeatures(self.model)  # the projected embeddings, as tensors
        self.lr = lr
        tokens = clip_processor().tokenizer(prompts, padding=True, return_tensors="pt")  # (C, L)
        self.register_buffer("input_ids", tokens.input_ids, persistent=False)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C): scaled cosine of each drawing with each category prompt."""
        images = F.normalize(self.features.get_image_features(to_clip_pixels(pixel_values)), dim=-1)
        texts = F.normalize(self.features.get_text_features(self.input_ids), dim=-1)
        return self.model.logit_scale.exp() * images @ texts.T

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.logits(batch["pixel_values"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.1)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, pixels: torch.Tensor, labels: torch.Tensor,
                       prompts: list[str]) -> float:  # fmt: skip
    """Top-1 accuracy of picking each drawing's prompt among `prompts` by cosine."""
    tokens = clip_processor().tokenizer(prompts, padding=True, return_tensors="pt")
    features = ClipFeatures(model)
    texts = F.normalize(features.get_text_features(tokens.input_ids), dim=-1)
    images = F.normalize(features.get_image_features(to_clip_pixels(pixels)), dim=-1)
    return (images @ texts.T).argmax(-1).eq(labels).float().mean().item()
