"""End-to-end training on the tiny model and real QuickDraw drawings."""

import hydra
import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

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
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
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
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
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


class KillAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt  # as if the job were killed


def lora_weights(out):
    return load_file(out / "pytorch_lora_weights.safetensors")


def test_killed_and_resumed_run_ends_with_same_adapter_as_uninterrupted(make_cfg, monkeypatch):
    common = [
        "data.per_category=4",
        "data.batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=10",
        "callbacks.checkpoint.every_n_train_steps=3",
        "optim.lr=1e-2",
    ]  # 28 drawings / (2 x 2) = 7 steps an epoch: the kill is mid-epoch
    full = run(make_cfg(*common, run="full"))

    killed_cfg = make_cfg(*common, run="killed")
    monkeypatch.setattr("sdft.train.build", _with_killer(5))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(killed_cfg)
    monkeypatch.undo()
    ckpt = killed_cfg.paths.output_dir + "/checkpoints/step_000003.ckpt"
    resumed = run(make_cfg(*common, f"ckpt_path={ckpt}", run="resumed"))

    a, b = lora_weights(full["output_dir"]), lora_weights(resumed["output_dir"])
    assert a.keys() == b.keys()
    for k in a:  # bit-identical on CPU up to float reassociation
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


def _with_killer(step):
    from sdft.train import build as real

    def instantiate(node, *args, **kwargs):
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [*kwargs["callbacks"], KillAt(step)]
        return real(node, *args, **kwargs)

    return instantiate


def test_existing_run_folder_is_never_overwritten(trained_run):
    from conftest import FAST, compose_cfg

    cfg, result = trained_run
    before = (result["output_dir"] / "pytorch_lora_weights.safetensors").read_bytes()
    again = compose_cfg([*FAST], result["output_dir"])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        run(again)
    assert (result["output_dir"] / "pytorch_lora_weights.safetensors").read_bytes() == before
