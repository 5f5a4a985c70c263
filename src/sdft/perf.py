"""The GPU fast path: the speed switches of `conf/perf/`, as a Lightning callback."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._dynamo import config as dynamo_config
from torch._inductor import config as inductor_config
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# torch's nominal order of the SDPA kernels; `perf.attention` moves one to the front. (Left
# alone, torch on Hopper tries cuDNN first: seen in the H100 profiles, bench/RESULTS.md.)
TORCH_ORDER = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.OVERRIDEABLE,
]
ATTENTION_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def restore_env(var: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = value


class FastPath(L.Callback):
    """The GPU speed switches, each a config option (`conf/perf/`). They change how the step
    runs, never what it computes: `tests/test_perf.py` pins the same loss with and without.

    A callback: `setup` applies them (on CUDA only unless `force`: tests use it on the CPU),
    `teardown` puts the process-wide ones (TF32, cudnn.benchmark, inductor settings, the SDPA
    kernel order) back as they were. The defaults are `conf/perf/default.yaml`'s.
    """

    def __init__(
        self,
        compile_unet: bool = True,
        channels_last: bool = False,
        tf32: bool = True,
        gradient_checkpointing: bool = False,
        merge_accumulation: bool = True,
        compile_mode: str | None = None,
        inductor: dict | None = None,
        attention: str | None = None,
        cudnn_benchmark: bool = False,
        adapter_input_cast: bool = False,
        compile_regions: list[str] | None = None,
        cache_dir: str | None = "~/.cache/sdft/torch_compile",
        force: bool = False,
    ):
        self.compile_unet = compile_unet  # inductor kernels; first steps pay the compile
        # NHWC convs: cuDNN's fastest layout, yet on an H100 (torch 2.11) the step is 3% slower
        # with it: convolution_backward's layout copies cost more than the convs gain
        self.channels_last = channels_last
        self.tf32 = tf32  # fp32 matmuls (the fp32 adapter's) on tensor cores
        self.gradient_checkpointing = gradient_checkpointing  # less memory, ~25% slower
        self.merge_accumulation = merge_accumulation  # batch 8 x 4 -> one micro-batch of 32
        self.compile_mode = compile_mode
        # torch._inductor.config settings for the UNet's compile, e.g. conv_1x1_as_mm
        self.inductor = dict(inductor or {})
        for key in self.inductor:
            if not hasattr(inductor_config, key):
                raise ValueError(f"perf.inductor.{key}: not a torch._inductor.config setting")
        # the SDPA kernel tried first: "cudnn" (cuDNN's fused attention, fast on Hopper),
        # "flash", "efficient"; null keeps torch's order. Shapes a backend cannot take
        # (SD1.5's head dim 160 for cuDNN) fall through to the next one.
        if attention is not None and attention not in ATTENTION_BACKENDS:
            names = list(ATTENTION_BACKENDS)
            raise ValueError(f"perf.attention: {attention!r} is not one of {names} or null")
        self.attention = attention
        # cuDNN times its convolution algorithms on the first call of each shape and keeps the
        # fastest: the shapes here never change (cached latents, one micro-batch)
        self.cudnn_benchmark = cudnn_benchmark
        # peft casts each adapter layer's input to the adapter's dtype (fp32) and, under
        # mixed precision, autocast casts it straight back to bf16 for the matmul: two
        # activation-sized copies per adapted layer, and their backward, for the same numbers
        self.adapter_input_cast = adapter_input_cast
        # regional compilation: compile each block of these classes (the UNet's repeated
        # BasicTransformerBlock, ResnetBlock2D, ...) rather than the whole UNet: inductor
        # compiles one block of each shape and reuses it, a far shorter cold start
        self.compile_regions = list(compile_regions or [])
        # where inductor and Triton keep compiled kernels across runs (null: torch's default,
        # /tmp/torchinductor_<user>): a second run, and every sweep trial, starts warm
        self.cache_dir = cache_dir
        self.force = force
        self.compiled = False
        self._batch_size: int | None = None  # the shape the UNet is compiled for
        self._restore = contextlib.ExitStack()  # the process-wide switches, undone in teardown
        self._first_step_t0: float | None = None  # times the first compiled step

    # -- the callback ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the module is still on the CPU here: the strategy knows the training device
        mixed = str(trainer.precision).endswith("-mixed")  # autocast casts adapter inputs
        self.apply(pl_module.unet, trainer.strategy.root_device, mixed)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.compiled and self._first_step_t0 is None:
            self._first_step_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self._first_step_t0 is not None and self._first_step_t0 > 0:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            seconds = time.perf_counter() - self._first_step_t0
            self._first_step_t0 = -1.0  # logged once
            log.info(
                "torch.compile: the first compiled step took %.1f s (compile included)", seconds
            )

    def active(self, device: torch.device) -> bool:
        return device.type == "cuda" or self.force

    def apply(
        self, unet: torch.nn.Module, device: torch.device, mixed_precision: bool = False
    ) -> None:
        if not self.active(device):
            return
        if not self.adapter_input_cast and mixed_precision:  # without autocast, dtypes differ
            for layer in unet.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.cast_input_dtype_enabled = False
        if self.attention:
            # for the whole process, as tf32: backward, and gradient checkpointing's
            # recompute in it, must pick the kernel the forward picked
            first = ATTENTION_BACKENDS[self.attention]
            order = [first, *(b for b in TORCH_ORDER if b != first)]
            # held open until `restore`: a dropped one would restore torch's order when collected
            self._restore.enter_context(sdpa_kernel(order, set_priority=True))
        if self.cudnn_benchmark:
            self._remember(torch.backends.cudnn, "benchmark")
            torch.backends.cudnn.benchmark = True
        if self.tf32:
            self._remember(torch.backends.cuda.matmul, "allow_tf32")
            self._remember(torch.backends.cudnn, "allow_tf32")
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.compile_unet:
            for key, value in self.inductor.items():  # for the process, as tf32
                self._remember(inductor_config, key)
                setattr(inductor_config, key, value)
            if self.cache_dir:
                self.use_cache_dir(Path(self.cache_dir).expanduser())
            if self.compile_regions:  # one graph per block shape: SD1.5's ResnetBlock2D alone
                self._remember(dynamo_config, "recompile_limit")  # has ~15, over the default 8
                dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            # in place (nn.Module.compile): parameter names, and so checkpoints, stay the same
            for module in self.compile_targets(unet):
                module.compile(mode=self.compile_mode, dynamic=False)
            self.compiled = True

    def compile_targets(self, unet: torch.nn.Module) -> list[torch.nn.Module]:
        """The UNet itself, or with `compile_regions` every block of those classes."""
        if not self.compile_regions:
            return [unet]
        blocks = [m for m in unet.modules() if type(m).__name__ in self.compile_regions]
        found = {type(m).__name__ for m in blocks}
        if missing := [c for c in self.compile_regions if c not in found]:
            raise ValueError(
                f"perf.compile_regions: the UNet has no {missing} blocks "
                f"(it has e.g. {sorted({type(m).__name__ for m in unet.modules()})[:8]})"
            )
        return blocks

    def use_cache_dir(self, folder: Path) -> None:
        """Point inductor's and Triton's caches at `folder` for this process (until
        `restore`); they read these variables when they compile."""
        for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
            self._restore.callback(restore_env, var, os.environ.get(var))
            os.environ[var] = str(folder / sub)
        log.info("torch.compile cache: %s", folder)

    def _remember(self, owner: Any, name: str) -> None:
        """Have `restore` set `owner.name` back to its value now."""
        self._restore.callback(setattr, owner, name, getattr(owner, name))

    def restore(self) -> None:
        """Put the process-wide switches back as `apply` found them (last set, first undone)."""
        self._restore.close()

    def stance(self, batch_size: int | None = None) -> contextlib.AbstractContextManager:
        """Run the compiled UNet for the training micro-batch (the first size seen) and any
        other shape eagerly: the epoch's last, smaller batch (1400 = 43 x 32 + 24) and sampling
        (previews, the scale sweep) would each cost a compile of minutes on the GPU, for a few
        calls; eager computes the same. `batch_size=None`: always eager (inference)."""
        if not self.compiled:
            return contextlib.nullcontext()
        if batch_size is not None:
            self._batch_size = self._batch_size or batch_size
            if batch_size == self._batch_size:
                return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")
