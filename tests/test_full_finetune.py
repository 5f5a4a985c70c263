"""method=full: every UNet weight trains, the checkpoint holds them all, and the run's unet/
folder is the trained UNet as diffusers loads it."""

import csv

import torch
from conftest import TINY_EVAL, unet_out
from diffusers import UNet2DConditionModel

from sdft.models import build_random_pipeline
from sdft.train import run


def test_full_finetune_trains_every_unet_weight_and_writes_a_unet_diffusers_loads(make_cfg):
    cfg = make_cfg(
        "method=full", "optim.lr=1e-3", "callbacks.checkpoint.every_n_train_steps=2", *TINY_EVAL
    )
    out = run(cfg)["output_dir"]
    base = build_random_pipeline("tiny").unet
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    names = [n for n, _ in base.named_parameters()]
    assert sorted(k.removeprefix("unet.") for k in state) == sorted(names)  # every weight
    loaded = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, state[f"unet.{name}"], atol=0, rtol=0)
    pairs = zip(loaded.parameters(), base.parameters(), strict=True)
    moved = sum(not torch.equal(p, b) for p, b in pairs)
    assert moved > 0.9 * len(names)  # training changed (nearly) every tensor, not an adapter
    assert not torch.allclose(unet_out(loaded), unet_out(base), atol=1e-4)
    # a LoRA scale means nothing here: the sweep scores scale 1.0 only
    (table,) = out.rglob("scale_sweep.csv")
    assert [float(r["scale"]) for r in csv.DictReader(table.open())] == [1.0]


def test_full_finetune_run_through_train_py_checks_only_its_weights(make_cfg):
    """train.py's trial check reads each written safetensors file for NaN/inf; method=full
    also writes unet/config.json, which it must not read as one."""
    from sdft.sweep import check_trial_finite

    out = run(make_cfg("method=full", "trainer.max_steps=1"))
    check_trial_finite(out)  # raised "header too large" on config.json before
