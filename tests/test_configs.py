from pathlib import Path

import hydra
import pytest
import torch
from conftest import FAST
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sdft.models.pipeline import ARCHS
from sdft.optim import is_schedule_free, split_optim_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    p.name: sorted(f.stem for f in p.glob("*.yaml"))
    for p in (ROOT / "conf").iterdir()
    if p.is_dir()
}
GLOBAL_DELTAS = ("experiment", "hparams_search")  # `# @package _global_`: tested on their own


def compose_option(make_cfg, group: str, option: str, *extra: str):
    """FAST's data.* keys are QuickDraw's: another data option composes without them."""
    if group == "data" and option != "quickdraw":
        fast = [o for o in FAST if not o.startswith("data.")]
        return make_cfg(f"{group}={option}", *fast, *extra, fast=False)
    return make_cfg(f"{group}={option}", *extra)


def test_scribble_experiment_is_the_papers_recipe(make_cfg):
    cfg = make_cfg("+experiment=scribble", fast=False)
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.method.rank == 4 and list(cfg.method.target_modules) == [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
    ]
    assert cfg.method.init == "gaussian"
    assert cfg.optim.lr == 1e-4 and cfg.optim._target_ == "torch.optim.AdamW"
    assert "cosine" in cfg.lr_scheduler._target_
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 32
    assert cfg.trainer.max_steps == 4410  # 140,000 samples / 32
    assert cfg.data.resolution == 512 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.callbacks.checkpoint.every_n_train_steps == 500
    assert (cfg.data.num_categories, cfg.data.per_category) == (100, 20)
    assert cfg.task_name == "scribble"


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g, opts in GROUPS.items() for o in opts if g not in GLOBAL_DELTAS],
)
def test_every_config_option_composes_and_names_a_target(make_cfg, group, option):
    cfg = compose_option(make_cfg, group, option)
    node = OmegaConf.to_container(cfg[group], resolve=True)
    targets = [node] if "_target_" in node or group == "paths" else list(node.values())
    for t in targets:
        if group != "paths":
            assert "_target_" in t, f"conf/{group}/{option}.yaml instantiates nothing"


@pytest.mark.parametrize(
    "group",
    ["data", "method", "optim", "lr_scheduler", "trainer", "callbacks", "logger", "loss", "val"],
)
def test_every_cheap_config_option_instantiates(make_cfg, group):
    for option in GROUPS[group]:
        on_cpu = [] if torch.cuda.is_available() else ["trainer.accelerator=cpu"]
        cfg = compose_option(make_cfg, group, option, *on_cpu)
        node = cfg[group]
        objs = [node] if "_target_" in node else list(node.values())
        for o in objs:
            if group == "optim":  # sdft's own keys (loraplus_ratio) are not the optimizer's
                o = split_optim_config(o)[0]
            assert hydra.utils.instantiate(o) is not None


def test_random_model_options_build_a_known_arch(make_cfg):
    for option in ("tiny", "sd15_arch"):
        assert make_cfg(f"model={option}").model.arch in ARCHS


def test_unknown_config_key_is_rejected_by_name(make_cfg):
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        make_cfg("data.no_such_key=1")
    with pytest.raises(ConfigCompositionException, match="nope"):
        make_cfg("method=nope")


@pytest.mark.parametrize("optim", GROUPS["optim"])
@pytest.mark.parametrize("schedule", GROUPS["lr_scheduler"])
def test_every_optimiser_and_schedule_builds_under_the_scribble_experiment(
    make_cfg, optim, schedule
):
    # the experiment's overrides must not assume one optimiser (optim.fused broke adamw8bit)
    cfg = make_cfg("+experiment=scribble", f"optim={optim}", f"lr_scheduler={schedule}")
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = hydra.utils.instantiate(split_optim_config(cfg.optim)[0])([param])
    if is_schedule_free(optimizer):
        optimizer.train()  # as AdapterFineTuner does before each step
    scheduler = hydra.utils.instantiate(cfg.lr_scheduler)(
        optimizer=optimizer, num_training_steps=10
    )
    lrs = []
    for _ in range(5):
        param.sum().backward()
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert param.detach().lt(1).all()  # it trained
    if schedule == "constant":
        assert lrs == [cfg.optim.lr] * 5
    else:
        assert lrs == sorted(lrs, reverse=True) and lrs[-1] < cfg.optim.lr
