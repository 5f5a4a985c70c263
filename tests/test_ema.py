"""EMA of the adapter (callbacks.ema): the average diffusers' EMAModel defines, exact across a
resume, written as `_ema` files that load, and scored by the scale sweep (eval.use_ema)."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY_EVAL, unet_out
from safetensors.torch import load_file

from sdft.ema import AdapterEMA
from sdft.models import build_random_pipeline
from sdft.train import run


class TwoParams(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_ema_averages_the_trainable_weights_every_update_every_steps(device):
    module, ema = TwoParams(), AdapterEMA(decay=0.9, update_every=2, device=device)
    ema.on_fit_start(None, module)
    expected, n = torch.zeros(3), 0
    for step in range(1, 9):
        with torch.no_grad():
            module.w.fill_(float(step))
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
        if step % 2 == 0:  # EMAModel: d = min(decay, (1 + n) / (10 + n)), 0 at the first update
            n += 1
            d = 0.0 if n == 1 else min(0.9, n / (9 + n))
            expected = d * expected + (1 - d) * step
    assert len(ema.ema.shadow_params) == 1  # the frozen parameter is not averaged
    torch.testing.assert_close(ema.ema.shadow_params[0], expected)
    with ema.applied(module):
        torch.testing.assert_close(module.w.detach(), expected)
    assert module.w.detach().eq(8.0).all()  # the training weights come back


def test_ema_bad_values_are_named():
    with pytest.raises(ValueError, match="callbacks.ema.decay=1.5"):
        AdapterEMA(decay=1.5)
    with pytest.raises(ValueError, match="callbacks.ema.device='tpu'"):
        AdapterEMA(decay=0.9, device="tpu")


def ema_state(out):
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "AdapterEMA" in k]
    return state["ema"]["shadow_params"], ckpt


def test_resumed_run_ends_with_the_same_ema_and_writes_ema_files_that_load(make_cfg):
    common = [
        "callbacks.ema.decay=0.5",  # small: the last steps weigh, a skipped update shows
        "callbacks.checkpoint.every_n_train_steps=2",
        "optim.lr=1e-2",
        *TINY_EVAL,
        "eval.use_ema=both",
    ]
    full = run(make_cfg(*common, run="full"))
    ckpt = full["output_dir"] / "checkpoints" / "step_000002.ckpt"
    resumed = run(make_cfg(*common, f"ckpt_path={ckpt}", run="resumed"))
    a, ckpt_a = ema_state(full["output_dir"])
    b, _ = ema_state(resumed["output_dir"])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)
    # the average differs from the last weights, and the _ema files hold the average
    out = full["output_dir"]
    names = sorted(f.name for f in full["adapter_files"])
    assert names == ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors",
                     "train.safetensors", "train_ema.safetensors"]  # fmt: skip
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    ema = load_file(out / "pytorch_lora_weights_ema.safetensors")
    assert weights.keys() == ema.keys()
    trained = [v for k, v in ckpt_a["state_dict"].items()]
    assert sorted(v.sum().item() for v in ema.values()) == pytest.approx(
        sorted(v.sum().item() for v in a), abs=1e-6
    )
    assert sorted(v.sum().item() for v in weights.values()) == pytest.approx(
        sorted(v.sum().item() for v in trained), abs=1e-6
    )
    assert any(not torch.allclose(weights[k], ema[k]) for k in weights)
    pipe = build_random_pipeline("tiny")
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_ema.safetensors")
    plain = build_random_pipeline("tiny")
    plain.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    assert not torch.allclose(unet_out(pipe.unet), unet_out(plain.unet), atol=1e-6)
    # eval.use_ema=both: the adapter as eval/*, the EMA as eval_ema/*
    metrics = full["metrics"]
    assert "eval/clip_img_cos_best" in metrics and "eval_ema/clip_img_cos_best" in metrics
    assert (out / "eval" / "ema" / "history.csv").is_file()


def test_use_ema_without_an_ema_is_named(make_cfg):
    with pytest.raises(ValueError, match="eval.use_ema=True needs an EMA: set callbacks.ema.decay"):
        run(make_cfg(*TINY_EVAL, "eval.use_ema=true"))
