"""Optimizers beyond AdamW: a check that the optimizer's package is installed (before any
model loads), LoRA+ parameter groups, and the train/eval mode that schedule-free optimizers
need around sampling and saving.

An `optim` config is a `_partial_: true` optimizer class plus sdft's own keys, which are
taken out before it is built (`OPTIM_KEYS`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from peft.optimizers import create_loraplus_optimizer

OPTIM_KEYS = ("loraplus_ratio",)  # sdft's keys in conf/optim/*.yaml, not the optimizer's
# import name -> pip package, for the error when one is missing
PIP_PACKAGES = {
    "prodigyopt": "prodigyopt",
    "schedulefree": "schedulefree",
    "prodigyplus": "prodigy-plus-schedule-free",
    "lion_pytorch": "lion-pytorch",
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "transformers": "transformers",
}


def check_optimizer_installed(optim: DictConfig) -> None:
    """Raise ImportError naming the pip package if `optim._target_`'s package is missing."""
    top = str(optim._target_).split(".")[0]
    if importlib.util.find_spec(top) is None:
        pip = PIP_PACKAGES.get(top, top)
        raise ImportError(
            f"optim._target_={optim._target_!r} needs the {pip!r} package: pip install {pip}"
        )


def split_optim_config(optim: DictConfig) -> tuple[DictConfig, dict]:
    """(the optimizer's own config, sdft's keys such as loraplus_ratio)."""
    own = {k: optim.get(k) for k in OPTIM_KEYS}
    rest = OmegaConf.masked_copy(optim, [k for k in optim if k not in OPTIM_KEYS])
    return rest, own


def check_loraplus(method: object, ratio: float | None) -> None:
    """LoRA+ scales the learning rate of LoRA's B (up) matrices: the method must have them."""
    if ratio is None:
        return
    if not getattr(method, "has_lora_b", False):
        raise ValueError(
            f"optim.loraplus_ratio={ratio} needs LoRA's B matrices, which "
            f"method={getattr(method, 'name', type(method).__name__)} has not "
            "(use method=lora, locon or dreambooth_lora, or optim.loraplus_ratio=null)"
        )
    if ratio <= 0:
        raise ValueError(f"optim.loraplus_ratio={ratio} must be > 0 (kohya uses 16)")


def make_optimizer(
    module: torch.nn.Module,
    make: Callable[..., torch.optim.Optimizer],
    loraplus_ratio: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer over `module`'s trainable parameters; with `loraplus_ratio`, peft's
    LoRA+ groups: B matrices (and DoRA magnitudes) at ratio x lr, the rest at lr."""
    if loraplus_ratio is None:
        return make([p for p in module.parameters() if p.requires_grad])
    # peft's helper takes a class and kwargs: unpack the config's partial
    assert isinstance(make, functools.partial), "optim must be a _partial_: true config"
    kwargs = dict(make.keywords)
    lr = kwargs.pop("lr")
    weight_decay = kwargs.pop("weight_decay", 0.0)  # peft's name for it is loraplus_...
    return create_loraplus_optimizer(
        module,
        make.func,
        lr=lr,
        loraplus_lr_ratio=loraplus_ratio,
        loraplus_weight_decay=weight_decay,
        **kwargs,
    )


def is_schedule_free(optimizer: object) -> bool:
    """Schedule-free optimizers (schedulefree, prodigy-plus) hold two weight sequences and
    expose `train()` / `eval()` to swap which one the parameters show."""
    return callable(getattr(optimizer, "eval", None)) and callable(
        getattr(optimizer, "train", None)
    )


@contextlib.contextmanager
def eval_mode(optimizers: list) -> Iterator[None]:
    """Parameters at the schedule-free average (what should be sampled and saved) inside,
    back at the training point after. No-op for other optimizers."""
    switched = [o for o in optimizers if is_schedule_free(o)]
    for o in switched:
        o.eval()
    try:
        yield
    finally:
        for o in switched:
            o.train()
