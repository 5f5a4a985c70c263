"""A damaged latent cache is found by its manifest's sizes and checksums and rebuilt, with a
warning saying what was wrong; build folders left by a killed run are cleaned up."""

import json
import logging
import os
import time

import pytest
import torch
from conftest import SAMPLE

from sdft.data import cache as cache_module
from sdft.data.quickdraw import QuickDrawDataModule
from sdft.models import build_random_pipeline


@pytest.fixture(scope="module")
def pipeline():
    return build_random_pipeline("tiny")


def cached(tmp_path, pipeline):
    dm = QuickDrawDataModule(
        str(SAMPLE), resolution=64, categories=["apple", "cat"], per_category=2,
        held_out_fraction=0.0, formats=["ndjson"], cache=True, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.setup()
    dm.prepare_cache(pipeline)
    return dm.train_dataset()


def samples(ds) -> list[dict]:
    return [ds[(i, flip)] for i in range(len(ds)) for flip in (False, True)]


def truncate_latents(root):
    (latents,) = root.glob("latents_*.npy")
    latents.write_bytes(latents.read_bytes()[:-100])
    return f"{latents.name} has"


def empty_text(root):
    (text,) = root.glob("text_*.npy")
    text.write_bytes(b"")
    return f"{text.name} has 0 bytes"


def break_manifest(root):
    (root / "manifest.json").write_text('{"format": 2, "files": [')
    return "unreadable manifest.json (JSONDecodeError"


def break_index(root):
    index = root / "latent_index.npy"
    data = bytearray(index.read_bytes())
    data[-8:] = b"\xff" * 8  # the last sample now points to a row that does not exist
    index.write_bytes(bytes(data))
    return "latent_index.npy does not match its sha256"


def delete_manifest(root):
    (root / "manifest.json").unlink()
    return "no manifest.json"


@pytest.mark.parametrize(
    "damage", [truncate_latents, empty_text, break_manifest, break_index, delete_manifest]
)
def test_damaged_cache_is_rebuilt_and_says_why(tmp_path, pipeline, caplog, damage):
    first = cached(tmp_path, pipeline)
    expected = samples(first)
    why = damage(first.root)
    with caplog.at_level(logging.WARNING):
        again = cached(tmp_path, pipeline)
    assert f"latent cache {first.root} is damaged ({why}" in caplog.text
    assert again.root == first.root and cache_module.cache_damage(again.root) is None
    for a, b in zip(samples(again), expected, strict=True):
        assert a["caption"] == b["caption"]
        torch.testing.assert_close(a["latent_params"], b["latent_params"], rtol=0, atol=0)
        torch.testing.assert_close(a["encoder_hidden_states"], b["encoder_hidden_states"])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.root.name]


def test_sound_cache_is_reused_without_a_warning(tmp_path, pipeline, caplog, monkeypatch):
    first = cached(tmp_path, pipeline)
    monkeypatch.setattr(pipeline.vae, "encode", lambda *a, **k: pytest.fail("encoded again"))
    with caplog.at_level(logging.WARNING):
        again = cached(tmp_path, pipeline)
    assert again.root == first.root and "damaged" not in caplog.text
    manifest = json.loads((first.root / "manifest.json").read_text())
    assert set(manifest["checksums"]) == {*manifest["files"], "latent_index.npy"}


def test_build_folders_of_a_killed_run_are_removed_and_a_live_one_kept(tmp_path, pipeline):
    cache_dir = tmp_path / "cache"
    stale, live = cache_dir / "abc.partial-dead", cache_dir / "abc.partial-live"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "latents_64x64_rank0.npy").write_bytes(b"half")
    old = time.time() - cache_module.STALE_PARTIAL_S - 60
    for p in (stale / "latents_64x64_rank0.npy", stale):
        os.utime(p, (old, old))
    ds = cached(tmp_path, pipeline)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([ds.root.name, live.name])
