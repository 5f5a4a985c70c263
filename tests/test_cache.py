"""`data.cache=true`: cached latents and text give the loss of pixels and captions, caches are
keyed and reused, DDP ranks share the encoding, and training runs from the cache."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST, SAMPLE, bucket_folder, caption_folder
from safetensors.torch import load_file
from torch.utils.data import default_collate

from sdft.adapters import LoRAMethod
from sdft.data.caption_folder import CaptionFolderDataModule
from sdft.data.quickdraw import QuickDrawDataModule
from sdft.models import build_random_pipeline
from sdft.module import AdapterFineTuner
from sdft.train import run


@pytest.fixture(scope="module")
def module() -> AdapterFineTuner:
    m = AdapterFineTuner(build_random_pipeline("tiny"), LoRAMethod(rank=4), None, None)
    with torch.no_grad():  # a non-zero adapter, so the UNet output depends on it too
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return m


def quickdraw(tmp_path, pipeline, path=SAMPLE, **kw) -> QuickDrawDataModule:
    settings = dict(resolution=64, categories=["apple", "cat", "The Eiffel Tower"],
                    per_category=2, held_out_fraction=0.0, formats=["ndjson"])  # fmt: skip
    dm = QuickDrawDataModule(str(path), cache=True, cache_dir=str(tmp_path / "cache"),
                             **{**settings, **kw})  # fmt: skip
    dm.setup()
    dm.prepare_cache(pipeline)
    return dm


def both_batches(dm, keys) -> tuple[dict, dict]:
    """The batch of `keys` from pixels and captions, and from the cache."""
    items = [dm.dataset[k] for k in keys]
    pixels = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
    }
    return pixels, default_collate([dm.train_dataset()[k] for k in keys])


def assert_same_loss(module, pixels, cached, draws: int = 3) -> None:
    losses = []
    for k in range(draws):
        with torch.no_grad():
            a = module.diffusion_loss(pixels, torch.Generator().manual_seed(k)).item()
            b = module.diffusion_loss(cached, torch.Generator().manual_seed(k)).item()
        assert abs(a - b) <= 1e-5 * a, (k, a, b)  # batched VAE: last-bit differences only
        losses.append(a)
    assert len(set(losses)) == draws  # the generator matters: the test compares real draws


def test_training_from_cache_gives_the_same_loss_as_without(module, tmp_path):
    dm = quickdraw(tmp_path, module.pipeline)
    keys = [(i, flip) for i in range(len(dm.dataset)) for flip in (False, True)]
    pixels, cached = both_batches(dm, keys)
    assert cached["caption"] == pixels["caption"]
    assert cached["latent_params"].shape == (12, 8, 16, 16)  # mean and logvar, both flips
    assert cached["encoder_hidden_states"].shape == (12, 77, 32)
    with torch.no_grad():
        params = module.vae.encode(pixels["pixel_values"]).latent_dist.parameters
        text = module.encode_prompt(pixels["caption"])
    torch.testing.assert_close(cached["latent_params"], params, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached["encoder_hidden_states"], text, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(cached["latent_params"][0], cached["latent_params"][1])  # flip
    assert_same_loss(module, pixels, cached)


def test_cached_caption_folder_keeps_list_captions_dropout_and_buckets(module, tmp_path):
    folder = bucket_folder(tmp_path / "data")
    dm = CaptionFolderDataModule(str(folder), caption="a photo", caption_dropout=0.5,
                                 resolution=128, bucketing=True, min_bucket_size=64,
                                 max_bucket_size=256, batch_size=2, cache=True,
                                 cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup()
    dm.prepare_cache(module.pipeline)
    batches = list(dm.train_sampler())
    captions = [dm.dataset.caption(k) for b in batches for k in b]
    assert set(captions) == {"", "a photo"}  # dropout still draws per (epoch, sample)
    for n, keys in enumerate(batches):
        pixels, cached = both_batches(dm, keys)
        assert cached["caption"] == pixels["caption"]
        h, w = pixels["pixel_values"].shape[2:]
        assert cached["latent_params"].shape[1:] == (8, h // 4, w // 4)
        with torch.no_grad():
            text = module.encode_prompt(pixels["caption"])  # "" for the dropped captions
        torch.testing.assert_close(cached["encoder_hidden_states"], text, atol=1e-6, rtol=1e-6)
        if n == 0:
            assert_same_loss(module, pixels, cached, draws=2)
    shapes = {tuple(b["latent_params"].shape[2:]) for b in dm.train_dataloader()}
    assert shapes == {(32, 32), (16, 48), (48, 16), (64, 16)}


def test_cache_is_reused_and_any_change_makes_a_new_one(module, tmp_path, monkeypatch):
    data = tmp_path / "qd"
    data.mkdir()
    for name in ("apple", "cat", "The Eiffel Tower"):
        shutil.copy(SAMPLE / "ndjson" / f"{name}.ndjson", data)
    first = quickdraw(tmp_path, module.pipeline, data).train_dataset()
    built = json.loads((first.root / "manifest.json").read_text())

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached sample was encoded again")

    with monkeypatch.context() as m:  # the same inputs: read back, nothing encoded
        m.setattr(module.vae, "encode", no_encoding)
        m.setattr(module.text_encoder, "forward", no_encoding)
        again = quickdraw(tmp_path, module.pipeline, data).train_dataset()
    assert again.root == first.root and again.manifest == built
    assert built["encoded_per_rank"] == [6] and built["flips"] == 2

    other_weights = build_random_pipeline("tiny")  # same name and configs
    with torch.no_grad():
        next(other_weights.vae.parameters()).flatten()[0] += 1.0
    changes = [
        dict(resolution=128),
        dict(flip=False),
        dict(render="strokes"),
        dict(caption_template="{category} doodle"),
        dict(per_category=3),  # other drawings
        dict(pipeline=build_random_pipeline("tiny", seed=1)),
        dict(pipeline=other_weights),
    ]
    roots = {first.root}
    for change in changes:
        pipeline = change.pop("pipeline", module.pipeline)
        roots.add(quickdraw(tmp_path, pipeline, data, **change).train_dataset().root)
    st = os.stat(data / "cat.ndjson")  # the same file, touched
    os.utime(data / "cat.ndjson", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    roots.add(quickdraw(tmp_path, module.pipeline, data).train_dataset().root)
    assert len(roots) == 2 + len(changes)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(r.name for r in roots)


def _ddp_rank(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # forked: one thread, as a dataloader worker (OpenMP after fork)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        pipeline = build_random_pipeline("tiny")
        root = quickdraw(Path(tmp), pipeline, per_category=3).train_dataset().root
        Path(tmp, f"rank{rank}.txt").write_text(str(root))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_encode_disjoint_shares_once(tmp_path):
    # fork, not spawn: the ranks skip re-importing torch and diffusers (seconds each)
    mp.start_processes(_ddp_rank, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    roots = {Path(tmp_path, f"rank{r}.txt").read_text() for r in range(2)}
    assert len(roots) == 1
    manifest = json.loads(Path(roots.pop(), "manifest.json").read_text())
    assert manifest["encoded_per_rank"] == [5, 4]  # 9 drawings: i = 0, 2, .. and 1, 3, ..
    ddp = quickdraw(tmp_path, build_random_pipeline("tiny"), per_category=3)
    single = quickdraw(tmp_path / "single", ddp._pipeline, per_category=3)
    a, b = ddp.train_dataset(), single.train_dataset()  # read back / built by one process
    assert a.root.parent == tmp_path / "cache" and b.root.parent == tmp_path / "single" / "cache"
    for key in [(i, f) for i in range(9) for f in (False, True)]:
        for name in ("latent_params", "encoder_hidden_states"):
            torch.testing.assert_close(a[key][name], b[key][name], atol=1e-6, rtol=1e-6)


def test_training_runs_from_the_cache_with_the_same_adapter(make_cfg, tmp_path):
    cache = [f"data.cache_dir={tmp_path}/cache", "callbacks.preview.every_n_steps=0"]
    plain = run(make_cfg(*cache, run="plain"))
    cached = run(make_cfg("data.cache=true", *cache, run="cached"))
    again = run(make_cfg("data.cache=true", *cache, run="again"))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # built once, then reused
    a, b, c = (load_file(r["output_dir"] / "pytorch_lora_weights.safetensors")
               for r in (plain, cached, again))  # fmt: skip
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c[k], b[k], atol=0, rtol=0)
    loss = plain["metrics"]["train/loss"]
    assert abs(cached["metrics"]["train/loss"] - loss) <= 1e-5 * loss


def test_style_experiment_trains_from_a_cached_caption_folder(make_cfg, tmp_path):
    folder = caption_folder(tmp_path / "vangogh", n=3)
    cfg = make_cfg(
        "+experiment=style",
        f"data.path={folder}",
        f"data.cache_dir={tmp_path}/cache",
        "model=tiny",
        "trainer=cpu",
        "logger=csv",
        "data.resolution=64",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "callbacks.preview.num_inference_steps=2",
        "callbacks.preview.seeds=[0]",
        fast=False,
    )
    assert cfg.data.caption == "a painting in vangogh style" and cfg.data.cache
    out = run(cfg)["output_dir"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "split.json").read_text())["images"][0] == "img0.png"
    manifest = json.loads(
        next((tmp_path / "cache").iterdir()).joinpath("manifest.json").read_text()
    )
    assert manifest["num_samples"] == 4 and list(manifest["captions"]) == [
        "a painting in vangogh style"
    ]


def test_cache_without_a_pipeline_is_named():
    dm = QuickDrawDataModule(str(SAMPLE), num_categories=3, per_category=1, cache=True)
    with pytest.raises(RuntimeError, match="call datamodule.prepare_cache"):
        dm.train_dataloader()


assert FAST  # the make_cfg fixture composes FAST: runs are tiny and short
