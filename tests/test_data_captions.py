"""Caption folders (`data=caption_jsonl`) on generated folders: sources, captions,
transforms, bucketing and every bad input with its message."""

import hashlib
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from conftest import bucket_folder, caption_folder, dm_for, save_image, write_jsonl

from sdft.data import sampler as sampler_module
from sdft.data.caption_folder import CaptionFolderDataModule
from sdft.data.checks import BadSampleError
from sdft.data.sampler import BucketBatchSampler, SeededEpochSampler


def rows_of(dm) -> list[tuple[str, str]]:
    ds = dm.dataset
    return sorted(
        (str(Path(ds.images[i]).resolve()), ds.caption((i, False))) for i in range(len(ds))
    )


def test_metadata_rows_are_those_of_datasets_imagefolder(tmp_path):
    folder = caption_folder(tmp_path / "data")
    dm = dm_for(folder)
    ref = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf")
    ).cast_column("image", datasets.Image(decode=False))
    expected = sorted((str(Path(r["image"]["path"]).resolve()), r["text"]) for r in ref)
    assert len(expected) == 5 and rows_of(dm) == expected
    assert json.loads(dm.save_split(tmp_path / "run").read_text())["images"][-1] == "sub/x.png"


def test_columns_prefix_suffix_and_list_captions_one_per_epoch(tmp_path):
    save_image(tmp_path / "a.png", 64, 64)
    save_image(tmp_path / "b.png", 64, 64)
    write_jsonl(tmp_path / "metadata.jsonl", [
        {"path": "a.png", "caption": ["red", "green", "blue"]},
        {"path": "b.png", "caption": "plain"},
    ])  # fmt: skip
    dm = dm_for(tmp_path, image_column="path", caption_column="caption",
                caption_prefix="vgh, ", caption_suffix=".")  # fmt: skip
    ds = dm.dataset
    per_epoch = [ds.caption((0, False, e)) for e in range(30)]
    assert set(per_epoch) == {"vgh, red.", "vgh, green.", "vgh, blue."}
    assert per_epoch == [ds.caption((0, True, e)) for e in range(30)]  # same draw, any flip
    assert per_epoch[:6] == [dm_for(tmp_path, image_column="path", caption_column="caption",
                             caption_prefix="vgh, ", caption_suffix=".").dataset.caption(
                             (0, False, e)) for e in range(6)]  # fmt: skip
    assert {ds.caption((1, False, e)) for e in range(5)} == {"vgh, plain."}
    assert ds.all_captions() == ["vgh, blue.", "vgh, green.", "vgh, plain.", "vgh, red."]


def test_caption_dropout_gives_the_empty_caption_at_its_rate(tmp_path):
    ds = dm_for(caption_folder(tmp_path), caption_dropout=0.25).dataset
    drawn = [ds.caption((i % 5, False, e)) for i in range(5) for e in range(100)]
    assert 0.19 < drawn.count("") / len(drawn) < 0.31
    assert "" in ds.all_captions() and "" not in dm_for(tmp_path).dataset.all_captions()


def test_txt_sidecars_one_caption_per_line(tmp_path):
    save_image(tmp_path / "a.png", 64, 64)
    save_image(tmp_path / "b.jpg", 64, 64)
    (tmp_path / "a.txt").write_text("a cat, sitting\n")
    (tmp_path / "b.txt").write_text("first\n\nsecond\n")
    ds = dm_for(tmp_path).dataset  # auto: no metadata.jsonl, so .txt
    assert ds.captions == [["a cat, sitting"], ["first", "second"]]
    assert {ds.caption((1, False, e)) for e in range(20)} == {"first", "second"}


def test_one_fixed_caption_for_a_plain_folder(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", 64, 64)
    ds = dm_for(tmp_path, caption="a painting in vangogh style").dataset
    assert [ds.caption((i, False)) for i in range(3)] == ["a painting in vangogh style"] * 3


def test_resize_center_crop_flip_and_range(tmp_path):
    save_image(tmp_path / "wide.png", 256, 128, value=255)  # 2:1, left half black
    ds = dm_for(tmp_path, caption="x").dataset
    x = ds[(0, False)]["pixel_values"]  # 256x128 -> 128x64 -> centre 64x64: 32 px of each
    assert x.shape == (3, 64, 64) and x.min() >= -1.0 and x.max() <= 1.0
    assert (x[:, :, :31] == -1).all() and (x[:, :, 33:] == 1).all()  # black | white halves
    assert torch.equal(ds[(0, True)]["pixel_values"], x.flip(-1))
    rand = dm_for(tmp_path, caption="x", crop="random").dataset
    crops = [rand[(0, False, e)]["pixel_values"] for e in range(8)]
    dark = [int((c[0, 0] < 0).sum()) for c in crops]  # black columns: where the crop sat
    assert len(set(dark)) > 2 and min(dark) >= 0 and max(dark) <= 64
    assert torch.equal(crops[3], rand[(0, False, 3)]["pixel_values"])  # drawn from the key


def test_bucketing_batches_of_one_size_multiples_of_64(tmp_path):
    dm = dm_for(bucket_folder(tmp_path), caption="x", resolution=128, bucketing=True,
                min_bucket_size=64, max_bucket_size=256)  # fmt: skip
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 128 * 128 for h, w in dm.buckets)
    assert dm.dataset.sizes == [(128, 128), (64, 192), (192, 64), (128, 128), (128, 128),
                                (64, 192), (256, 64)]  # fmt: skip
    seen = []
    for batch in dm.train_dataloader():
        x = batch["pixel_values"]
        assert x.shape[2:] in [(128, 128), (64, 192), (192, 64), (256, 64)] and len(x) <= 2
        seen.append(x.shape[0])
    assert sum(seen) == 7 and len(seen) == 5  # buckets of 3, 2, 1, 1 -> 2 + 1 + 1 + 1 + 1


def test_bucket_sampler_is_seeded_per_epoch_resumable_and_sharded(monkeypatch):
    buckets = [0, 1, 0, 2, 1, 0, 0, 1, 2, 0]
    s = BucketBatchSampler(buckets, batch_size=2, seed=3)
    epoch0 = list(s)
    assert epoch0 == list(BucketBatchSampler(buckets, 2, seed=3))
    assert sorted(k[0] for b in epoch0 for k in b) == list(range(10))
    assert all(len({buckets[k[0]] for k in b}) == 1 for b in epoch0)
    assert len(s) == len(epoch0) == 6  # ceil(5/2) + ceil(3/2) + ceil(2/2)
    s.sampler.set_epoch(1)  # where Lightning sets it: batch_sampler.sampler
    assert list(s) != epoch0
    s.sampler.set_epoch(0)
    s.load_state_dict({"epoch": 0, "done": 2, "world_size": 1})  # 2 batches trained
    assert list(s) == epoch0[2:] and list(s) == epoch0  # one resume, then whole epochs
    monkeypatch.setattr(sampler_module, "world", lambda: (1, 2))
    rank1 = list(s)
    assert rank1 == epoch0[1::2] and len(s) == 3


def test_seeded_sampler_keys_carry_the_epoch_and_shard(monkeypatch):
    s = SeededEpochSampler(7, seed=0, with_epoch=True)
    s.set_epoch(4)
    keys = list(s)
    assert sorted(k[0] for k in keys) == list(range(7)) and {k[2] for k in keys} == {4}
    monkeypatch.setattr(sampler_module, "world", lambda: (0, 2))
    assert [k[0] for k in s] == [k[0] for k in keys][0::2] + [keys[0][0]][: 4 - 4]


BAD_ROWS = [
    {"file_name": "ok0.png", "text": "good"},  # line 1
    {"file_name": "ok1.png", "text": ["good", "also good"]},  # 2
    '{"file_name": "ok2.png", "text": "unclosed}',  # 3
    {"file_name": "gone.png", "text": "missing image"},  # 4
    {"file_name": "broken.png", "text": "unreadable image"},  # 5
    {"file_name": "ok3.png", "text": "   "},  # 6
    {"file_name": "ok4.png", "text": 5},  # 7
    {"file_name": "ok5.png", "txt": "typo in the column"},  # 8
    {"file_name": "../outside.png", "text": "escapes the folder"},  # 9
    "",  # 10: blank lines are ignored
    '["a", "list"]',  # 11
]


def bad_folder(root: Path) -> Path:
    for i in range(6):
        save_image(root / f"ok{i}.png", 64, 64)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    save_image(root.parent / "outside.png", 64, 64)
    write_jsonl(root / "metadata.jsonl", BAD_ROWS)
    return root


def test_each_bad_metadata_line_is_named_with_its_line(tmp_path):
    folder = bad_folder(tmp_path / "data")
    with pytest.raises(BadSampleError) as e:
        dm_for(folder)
    msg, meta = str(e.value), f"{folder}/metadata.jsonl"
    assert "8 bad sample(s) of 10 in" in msg
    for line, what in [
        (3, "malformed JSON line (Unterminated string starting at: column 34)"),
        (4, f"missing image {folder}/gone.png"),
        (5, f"unreadable image {folder}/broken.png (UnidentifiedImageError"),
        (6, "empty caption"),
        (7, "caption 5 is not a string or a list of strings"),
        (8, "no 'text' (it has ['file_name', 'txt'])"),
        (9, "file_name='../outside.png' is not a path in"),
        (11, "not a JSON object"),
    ]:
        assert f"{meta}:{line}: {what}" in msg, (line, msg)
    assert ":1:" not in msg and ":2:" not in msg and ":10:" not in msg


def test_skip_warns_and_counts_bad_lines(tmp_path, caplog):
    folder = bad_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        dm = dm_for(folder, on_bad_sample="skip")
    assert dm.skipped == 8 and len(dm.dataset) == 2
    assert [Path(p).name for p in dm.dataset.images] == ["ok0.png", "ok1.png"]
    assert "skipped 8 bad sample(s) of 10" in caplog.text
    assert json.loads(dm.save_split(tmp_path / "run").read_text())["skipped"] == 8


def test_unknown_column_name_is_a_setting_error(tmp_path):
    folder = caption_folder(tmp_path)
    with pytest.raises(ValueError, match=r"data.caption_column='caption' is not a column of .*"
                       r"metadata.jsonl \(its columns: \['file_name', 'text'\]\)"):  # fmt: skip
        dm_for(folder, caption_column="caption")
    with pytest.raises(ValueError, match=r"data.image_column='image' is not a column"):
        dm_for(folder, image_column="image")


def test_bad_sidecars_are_named(tmp_path):
    for name in ("a", "b", "c"):
        save_image(tmp_path / f"{name}.png", 64, 64)
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_text("\n  \n")
    with pytest.raises(BadSampleError) as e:
        dm_for(tmp_path)
    assert f"{tmp_path}/b.txt: empty caption" in str(e.value)
    assert f"{tmp_path}/c.png: no caption file c.txt" in str(e.value)
    assert "2 bad sample(s) of 3" in str(e.value)
    assert dm_for(tmp_path, on_bad_sample="skip").skipped == 2


def test_missing_folder_or_captions_and_bad_settings_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*no such directory"):
        dm_for(tmp_path / "nowhere")
    save_image(tmp_path / "a.png", 64, 64)
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl and no .txt captions"):
        dm_for(tmp_path)
    with pytest.raises(ValueError, match="data.cache=true fixes each image's crop"):
        CaptionFolderDataModule(str(tmp_path), crop="random", cache=True)
    with pytest.raises(ValueError, match="data.caption_dropout=1.5 must be in"):
        CaptionFolderDataModule(str(tmp_path), caption_dropout=1.5)
    with pytest.raises(ValueError, match="data.resolution=100 must be a positive multiple of 64"):
        dm_for(tmp_path, caption="x", resolution=100, bucketing=True)


def folder_digest(root: Path) -> dict:
    return {
        str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_images_and_captions_are_never_modified(tmp_path):
    folder = caption_folder(tmp_path / "data", size=(96, 64))
    before = folder_digest(folder)
    dm = dm_for(folder, crop="random", caption_dropout=0.5)
    for _ in range(2):
        list(dm.train_dataloader())
    assert folder_digest(folder) == before
