"""The two CLIP metrics, computed by our code and directly, on fixed images and captions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE
from torchmetrics.functional.multimodal import clip_score as tm_clip_score
from torchmetrics.multimodal.clip_score import CLIPScore

from sdft.data.quickdraw import QuickDrawDataModule
from sdft.eval.grids import to_pil
from sdft.eval.metrics import ClipScorer, ImageEncoder, clip_score, image_cosine

CATEGORIES = ["apple", "cat", "fish", "bicycle"]


@pytest.fixture(scope="module")
def drawings():
    """Real QuickDraw drawings (2 per category) as uint8 (8, 3, 64, 64), and their captions."""
    dm = QuickDrawDataModule(
        str(SAMPLE), categories=CATEGORIES, held_out_fraction=0.0, per_category=2, resolution=64
    )
    dm.setup()
    ds = dm.dataset
    images = torch.stack([((ds[i]["pixel_values"] + 1) * 127.5).round() for i in range(len(ds))])
    return images.to(torch.uint8), [ds.caption(i) for i in range(len(ds))]


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer("random:tiny")


def test_clip_score_is_torchmetrics_clipscore(scorer, drawings):
    images, captions = drawings
    ours = scorer.scores(images, captions)  # (8,) per image
    # independently: 100 x cosine of the projected CLIP embeddings
    model, processor = scorer.model.model, scorer.processor
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tok = processor(text=captions, return_tensors="pt", padding=True)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    torch.testing.assert_close(ours, 100 * F.cosine_similarity(img, txt), atol=1e-4, rtol=1e-5)

    # torchmetrics' own CLIPScore and clip_score, given the same model: the same numbers.
    # A random CLIP scores some pairs below 0; the mean is floored at 0 as torchmetrics does.
    positive = ours > 0
    assert 2 <= positive.sum() < len(ours), ours  # both cases occur in these fixed inputs
    for subset in (positive, ~positive, torch.ones_like(positive)):
        metric = CLIPScore(model_name_or_path=lambda: (scorer.model, scorer.processor))
        chosen = [c for c, keep in zip(captions, subset, strict=True) if keep]
        metric.update(images[subset], chosen)
        expected = metric.compute().item()
        functional = tm_clip_score(
            list(images[subset]), chosen, lambda: (scorer.model, scorer.processor)
        ).item()
        assert clip_score(ours[subset]) == pytest.approx(expected, abs=1e-4)
        assert functional == pytest.approx(expected, abs=1e-4)
    assert clip_score(ours[positive]) > 0 and clip_score(ours[~positive]) == 0.0


def test_scores_do_not_depend_on_the_batching(drawings):
    images, captions = drawings
    whole = ClipScorer("random:tiny", batch_size=64).scores(images, captions)
    torch.testing.assert_close(
        ClipScorer("random:tiny", batch_size=3).scores(images, captions), whole
    )


@pytest.mark.parametrize("name", ["random:tiny", "open_clip:tiny/random"])
def test_image_cosine_is_the_mean_pairwise_cosine(name, drawings):
    images, _ = drawings
    encoder = ImageEncoder(name, batch_size=3)
    feats = encoder.encode(images)  # (8, D)
    with torch.no_grad():  # directly, through the model's own API
        if name.startswith("open_clip"):
            x = torch.stack([encoder.preprocess(im) for im in to_pil(images)])
            direct = encoder.model.encode_image(x)
        else:
            x = encoder.preprocess(images=list(images), return_tensors="pt")["pixel_values"]
            direct = encoder.model.model.get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(feats, F.normalize(direct, dim=-1), atol=1e-5, rtol=1e-4)

    generated, real = images[:3], images[3:]
    pairwise = F.cosine_similarity(
        F.normalize(direct[:3], dim=-1)[:, None], F.normalize(direct[3:], dim=-1)[None], dim=-1
    )  # (3, 5)
    ours = image_cosine(encoder.encode(generated), encoder.encode(real))
    torch.testing.assert_close(ours, pairwise.mean(1), atol=1e-5, rtol=1e-4)
    assert image_cosine(feats[:1], feats[:1]).item() == pytest.approx(1.0, abs=1e-5)


def test_open_clip_name_needs_a_pretrained_tag():
    with pytest.raises(
        ValueError, match="needs a pretrained tag, e.g. 'open_clip:ViT-L-14/openai'"
    ):
        ImageEncoder("open_clip:ViT-L-14")


def test_unknown_random_clip_arch_is_named():
    with pytest.raises(ValueError, match="random CLIP arch 'huge' is not one of"):
        ClipScorer("random:huge")
