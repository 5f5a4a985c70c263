"""Optimizer presets, LoRA+ parameter groups and schedule-free train/eval modes."""

import functools
import importlib.util

import hydra
import pytest
import torch
from diffusers import StableDiffusionPipeline

import sdft.models
from sdft.adapters import LoRAMethod
from sdft.models import build_random_pipeline
from sdft.module import AdapterFineTuner
from sdft.optim import eval_mode, make_optimizer, split_optim_config
from sdft.train import run

PRESETS = [
    "adamw", "adamw8bit", "prodigy", "adamw_schedulefree", "prodigy_schedulefree", "lion",
    "adafactor", "adamw8bit_bnb",
]  # fmt: skip
# the presets' lr are for real runs; a few steps on one batch need a larger one
TEST_LR = {"prodigy": 1.0, "prodigy_schedulefree": 1.0}
# Prodigy's step-size estimate starts at d0=1e-6 and needs hundreds of steps to grow: start
# it where it would be after a short warm-up
TEST_ARGS = {"prodigy": {"d0": 1e-2}, "prodigy_schedulefree": {"d0": 1e-2}}


def tiny_module(cfg, method_overrides: dict | None = None) -> AdapterFineTuner:
    method = hydra.utils.instantiate(cfg.method, **(method_overrides or {}))
    return AdapterFineTuner(build_random_pipeline("tiny"), method, None, None)


def fixed_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,  # (B, 3, H, W)
        "caption": ["a scribble of apple", "a scribble of cat"],
    }


def loss_on(module, batch) -> float:
    with torch.no_grad():
        return module.diffusion_loss(batch, torch.Generator().manual_seed(7)).item()


@pytest.mark.parametrize("preset", PRESETS)
def test_each_optimizer_preset_lowers_the_loss_of_a_fixed_batch(make_cfg, preset):
    if preset == "adamw8bit":
        pytest.importorskip("torchao")
    cfg = make_cfg(f"optim={preset}", "method.rank=8")
    optim_cfg, _ = split_optim_config(cfg.optim)
    optim_cfg.lr = TEST_LR.get(preset, 1e-2)
    if "fused" in optim_cfg:
        optim_cfg.fused = False
    module = tiny_module(cfg)
    optimizer = make_optimizer(
        module, hydra.utils.instantiate(optim_cfg, **TEST_ARGS.get(preset, {}))
    )
    batch = fixed_batch()
    before = loss_on(module, batch)
    if hasattr(optimizer, "train"):
        optimizer.train()
    for _ in range(10):
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(7))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with eval_mode([optimizer]):  # schedule-free: the averaged weights, as saved
        after = loss_on(module, batch)
    assert after < 0.95 * before, (preset, before, after)


def test_loraplus_puts_the_b_matrices_at_ratio_times_lr(make_cfg):
    module = tiny_module(make_cfg())
    make = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    optimizer = make_optimizer(module, make, loraplus_ratio=16)
    names = {id(p): n for n, p in module.named_parameters()}
    kinds = {}  # lr -> (factor names, weight decays) of its groups
    for group in optimizer.param_groups:
        if group["params"]:
            # "...to_q.lora_B.default.weight" -> lora_B
            factors = {names[id(p)].split(".")[-3] for p in group["params"]}
            kinds.setdefault(round(group["lr"], 9), (set(), set()))[0].update(factors)
            kinds[round(group["lr"], 9)][1].add(group["weight_decay"])
    assert kinds == {1e-3: ({"lora_A"}, {0.01}), 16e-3: ({"lora_B"}, {0.01})}
    trainable = sum(p.requires_grad for p in module.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == trainable


def adamw_schedulefree(params):
    import schedulefree

    return schedulefree.AdamWScheduleFree(params, lr=0.1)


def prodigy_schedulefree(params):
    import prodigyplus

    return prodigyplus.ProdigyPlusScheduleFree(params, lr=1.0, d0=0.1)  # d0: visible steps


@pytest.mark.parametrize("make_schedule_free", [adamw_schedulefree, prodigy_schedulefree])
def test_schedule_free_eval_mode_shows_the_average_and_restores_the_training_point(
    make_schedule_free,
):
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_schedule_free([p])
    opt.train()
    for _ in range(5):
        (p * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
        opt.step()
        opt.zero_grad()
    y = p.detach().clone()
    with eval_mode([opt]):
        assert not opt.param_groups[0]["train_mode"]
        x = p.detach().clone()
    assert opt.param_groups[0]["train_mode"]
    assert not torch.allclose(x, y)  # the average differs from the training point ...
    torch.testing.assert_close(p.detach(), y)  # ... which comes back after


@pytest.mark.parametrize("preset", ["adamw_schedulefree", "prodigy_schedulefree"])
def test_schedule_free_run_samples_in_eval_mode_and_trains_in_train_mode(
    make_cfg, monkeypatch, preset
):
    modules, seen = [], []
    setup, sample = AdapterFineTuner.setup, StableDiffusionPipeline.__call__

    def keep(self, stage):
        modules.append(self)
        return setup(self, stage)

    def spy(pipe, *args, **kwargs):  # each preview prompt: is the optimizer in train mode?
        seen.append(modules[0].trainer.optimizers[0].param_groups[0]["train_mode"])
        return sample(pipe, *args, **kwargs)

    def spy_save(method, *args, **kwargs):  # the adapter files: the averaged weights too
        saved.append(modules[0].trainer.optimizers[0].param_groups[0]["train_mode"])
        return save(method, *args, **kwargs)

    saved, save = [], LoRAMethod.save
    monkeypatch.setattr(AdapterFineTuner, "setup", keep)
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    monkeypatch.setattr(LoRAMethod, "save", spy_save)
    # 4 steps: a preview (2 prompts) after step 2, training goes on after it, one at the end
    result = run(make_cfg(f"optim={preset}", "callbacks.preview.every_n_steps=2"))
    assert seen == [False] * 4 and saved == [False]  # the averaged (eval) weights
    assert modules[0].trainer.optimizers[0].param_groups[0]["train_mode"]  # back after
    assert modules[0].global_step == 4 and result["adapter_files"]


def test_loraplus_with_a_method_without_b_matrices_stops_before_the_model_loads(
    make_cfg, monkeypatch
):
    def no_model(**_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdft.models, "build_random_pipeline", no_model)
    for method in ("loha", "lokr", "textual_inversion"):
        with pytest.raises(ValueError, match=f"optim.loraplus_ratio=16.*method={method}"):
            run(make_cfg(f"method={method}", "optim.loraplus_ratio=16", run=method))


def test_missing_optimizer_package_names_the_pip_package_before_the_model_loads(
    make_cfg, monkeypatch
):
    def no_model(**_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdft.models, "build_random_pipeline", no_model)
    cfg = make_cfg("optim=lion")
    cfg.optim._target_ = "lion_pytorch_missing.Lion"
    with pytest.raises(ImportError, match="pip install lion_pytorch_missing"):
        run(cfg)
    real = importlib.util.find_spec
    missing = {"lion_pytorch": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: missing.get(n, real(n, *a)))
    with pytest.raises(ImportError, match="'lion-pytorch' package: pip install lion-pytorch"):
        run(make_cfg("optim=lion", run="lion"))
