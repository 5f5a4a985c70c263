"""End-to-end training on the tiny model and real QuickDraw drawings."""

import hydra
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdft.checkpoints import load_checkpoint
from sdft.models import build_random_pipeline
from sdft.module import AdapterFineTuner
from sdft.train import run


def fixed_batch(cfg):
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    items = [dm.dataset[i] for i in range(len(dm.dataset))]
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
    }


def eval_loss(module, batch):
    with torch.no_grad():
        return module.diffusion_loss(batch, torch.Generator().manual_seed(123)).item()


def test_overfit_few_drawings_loss_falls_clearly(make_cfg):
    cfg = make_cfg(
        "data.num_categories=3",
        "data.per_category=2",
        "data.flip=false",
        "optim.lr=1e-2",
        "trainer.max_steps=150",
        "method.rank=8",
    )
    batch = fixed_batch(cfg)
    result = run(cfg)
    module = untrained_module(cfg)
    before = eval_loss(module, batch)
    load_last_checkpoint(module, result["output_dir"])
    after = eval_loss(module, batch)
    assert after < 0.7 * before, (before, after)


def untrained_module(cfg) -> AdapterFineTuner:
    return AdapterFineTuner(
        build_random_pipeline("tiny"),
        hydra.utils.instantiate(cfg.method),
        optimizer=None,
        lr_scheduler=None,
    )


def load_last_checkpoint(module, out) -> None:
    state = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert not module.load_state_dict(state, strict=False).unexpected_keys


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import FAST, compose_cfg

    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = compose_cfg([*FAST, "optim.lr=1e-2", "trainer.max_steps=6"], out)
    return cfg, run(cfg)


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text).sample


def test_output_folder_holds_adapter_checkpoints_config_split_metrics_preview(trained_run):
    cfg, result = trained_run
    out = result["output_dir"]
    for name in (
        "pytorch_lora_weights.safetensors",
        "config.yaml",
        "split.json",
        "csv/metrics.csv",
        "checkpoints/last.ckpt",
    ):
        assert (out / name).is_file(), name
    assert list((out / "previews").glob("step_*.png"))
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")  # weights_only
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["sdft"]["method"]["name"] == "lora" and ckpt["optimizer_states"]
    assert ckpt["global_step"] == 6


def test_saved_lora_loads_in_plain_diffusers_pipeline_with_same_unet_output(trained_run):
    cfg, result = trained_run
    out = result["output_dir"]
    module = untrained_module(cfg)
    load_last_checkpoint(module, out)
    expected = unet_out(module.unet)

    base = build_random_pipeline("tiny")
    ref = unet_out(base.unet)
    pipe = StableDiffusionPipeline(**base.components)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    got = unet_out(pipe.unet)
    # same weights, same float32 ops: only summation order may differ
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - ref).abs().max() > 1e-3  # the adapter changes the output ...
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[0.0])
    torch.testing.assert_close(
        unet_out(pipe.unet), ref, atol=1e-6, rtol=1e-5
    )  # ... scale 0 is base


def test_adapter_file_keys_are_diffusers_unet_lora_keys(trained_run):
    _, result = trained_run
    sd = load_file(result["output_dir"] / "pytorch_lora_weights.safetensors")
    assert sd and all(k.startswith("unet.") and ".lora." in k or "lora_" in k for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())


# the kill/resume exactness tests: tests/test_resume.py


def test_existing_run_folder_is_never_overwritten(trained_run):
    from conftest import FAST, compose_cfg

    cfg, result = trained_run
    before = (result["output_dir"] / "pytorch_lora_weights.safetensors").read_bytes()
    again = compose_cfg([*FAST], result["output_dir"])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        run(again)
    assert (result["output_dir"] / "pytorch_lora_weights.safetensors").read_bytes() == before
