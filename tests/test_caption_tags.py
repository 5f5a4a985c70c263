"""Tag captions: shuffling with the first keep_tags in place, tag dropout, and the seeded
variants that the text cache encodes (data.shuffle_tags, keep_tags, tag_dropout,
caption_variants)."""

import json
import random

import pytest
import torch
from conftest import save_image

from sdft.adapters import LoRAMethod
from sdft.data.caption_folder import CaptionFolderDataModule, TagOptions
from sdft.models import build_random_pipeline
from sdft.module import AdapterFineTuner

TAGS = "vgh, 1girl, red hair, smiling, outdoors, hat, blue sky"


def tag_folder(root, captions=(TAGS, "vgh, cat, sofa, window")):
    lines = []
    for i, text in enumerate(captions):
        save_image(root / f"img{i}.png", 64, 64)
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def dm_for(path, **kw) -> CaptionFolderDataModule:
    dm = CaptionFolderDataModule(str(path), resolution=64, batch_size=2, **kw)
    dm.setup()
    return dm


def tags(caption: str) -> list[str]:
    return caption.split(", ")


def test_shuffling_keeps_the_first_keep_tags_in_place_and_permutes_the_rest():
    opts = TagOptions(shuffle=True, keep=2)
    out = [tags(opts.apply(TAGS, random.Random(s))) for s in range(40)]
    assert all(o[:2] == ["vgh", "1girl"] for o in out)
    assert all(sorted(o[2:]) == sorted(tags(TAGS)[2:]) for o in out)
    assert len({tuple(o) for o in out}) > 20  # 5! = 120 orders of the other five


def test_tag_dropout_drops_other_tags_at_its_rate_never_the_kept_ones():
    opts = TagOptions(keep=1, dropout=0.3, separator=";")
    out = [opts.apply("a;b;c;d;e;f;g", random.Random(s)).split("; ") for s in range(400)]
    assert all(o[0] == "a" for o in out)
    kept = sum(len(o) - 1 for o in out) / (6 * len(out))
    assert 0.64 < kept < 0.76  # 1 - 0.3
    assert all(o[1:] == sorted(o[1:]) for o in out)  # no shuffle: order kept


def test_captions_are_shuffled_per_epoch_seeded_by_data_seed(tmp_path):
    folder = tag_folder(tmp_path)
    ds = dm_for(folder, shuffle_tags=True, keep_tags=1, seed=3).dataset
    epochs = [ds.caption((0, False, e)) for e in range(10)]
    assert len(set(epochs)) > 5 and all(c.startswith("vgh, ") for c in epochs)
    again = dm_for(folder, shuffle_tags=True, keep_tags=1, seed=3).dataset
    assert epochs == [again.caption((0, True, e)) for e in range(10)]  # seeded, any flip
    other = dm_for(folder, shuffle_tags=True, keep_tags=1, seed=4).dataset
    assert epochs != [other.caption((0, False, e)) for e in range(10)]
    assert dm_for(folder).dataset.caption((0, False, 5)) == TAGS  # off by default


def test_cached_tag_captions_take_one_of_the_encoded_variants(tmp_path):
    folder = tag_folder(tmp_path / "data")
    module = AdapterFineTuner(build_random_pipeline("tiny"), LoRAMethod(rank=4), None, None)
    dm = dm_for(folder, shuffle_tags=True, keep_tags=1, tag_dropout=0.1, caption_variants=3,
                caption_prefix="<s> ", cache=True, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.prepare_cache(module.pipeline)
    ds, cached = dm.dataset, dm.train_dataset()
    variants = ds.all_captions()
    assert len(variants) <= 6 and all(v.startswith("<s> vgh, ") for v in variants)
    drawn = [cached[(i, False, e)] for i in range(2) for e in range(12)]
    captions = {d["caption"] for d in drawn}
    assert captions <= set(variants) and len(captions) > 2  # the epochs draw among them
    for d in drawn[:4]:
        with torch.no_grad():
            text = module.encode_prompt([d["caption"]])[0]  # (77, D)
        torch.testing.assert_close(d["encoder_hidden_states"], text, atol=1e-6, rtol=1e-6)


def test_cache_with_tag_shuffling_and_no_variants_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.caption_variants=0 must be >= 1"):
        CaptionFolderDataModule(str(tmp_path), shuffle_tags=True, cache=True, caption_variants=0)
    with pytest.raises(ValueError, match="data.tag_dropout=1.0"):
        CaptionFolderDataModule(str(tmp_path), tag_dropout=1.0)
