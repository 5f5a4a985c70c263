"""Training speed as users compare it: samples/s in steady state and peak GPU memory."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import lightning as L
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._inductor import config as inductor_config
from torch.nn.attention import SDPBackend, sdpa_kernel

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


class SpeedMonitor(L.Callback):
    """Times optimiser steps after `warmup_steps` (compilation, allocator growth, cuDNN
    autotuning stay out of the numbers); logs `perf/samples_per_s` and writes `perf.json`."""

    def __init__(
        self, warmup_steps: int = 10, out_file: str | None = None, print_every_n_steps: int = 0
    ):
        self.warmup_steps = warmup_steps
        self.out_file = out_file
        self.print_every_n_steps = print_every_n_steps  # >0: a progress line (logs, no bar)
        self._t0: float | None = None
        self._samples = 0
        self._printed = -1

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # peak memory of training itself (model loading and cache building excluded)
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        every = self.print_every_n_steps
        if every and step % every == 0 and trainer.is_global_zero and step != self._printed:
            self._printed = step
            rate = self._samples / (time.perf_counter() - self._t0) if self._samples else 0.0
            print(f"sdft step {step}: {rate:.1f} samples/s since warm-up", flush=True)
        if self._t0 is None:
            if step >= self.warmup_steps:
                self._sync(module)
                self._t0, self._samples = time.perf_counter(), 0
            return
        self._samples += len(batch["caption"]) * trainer.world_size

    def summary(self, module: L.LightningModule) -> dict:
        if self._t0 is None or not self._samples:
            return {}
        self._sync(module)
        seconds = time.perf_counter() - self._t0
        out = {
            "steps_done": module.trainer.global_step,  # fewer than max_steps after max_time
            "samples_per_s": self._samples / seconds,
            "timed_samples": self._samples,
            "timed_seconds": seconds,
        }
        if module.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(module.device) / 1e9
            out["device"] = torch.cuda.get_device_name(module.device)
        return out

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        stats = self.summary(module)
        if not stats or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"perf/{k}": v for k, v in stats.items() if k != "device"},
                step=trainer.global_step,
            )
        print(
            "sdft speed: "
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()
            )
        )
        if self.out_file:
            Path(self.out_file).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out_file).write_text(json.dumps(stats, indent=1))


class FastPath:
    """The GPU speed switches, each a config option (`conf/perf/`). They change how the step
    runs, never what it computes: `tests/test_perf.py` pins the same loss with and without.

    Applied by the module at setup, on CUDA only unless `force` (tests use it on the CPU).
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
        adapter_input_cast: bool = True,
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
        self.attention_order: contextlib.AbstractContextManager | None = None
        # cuDNN times its convolution algorithms on the first call of each shape and keeps the
        # fastest: the shapes here never change (cached latents, one micro-batch)
        self.cudnn_benchmark = cudnn_benchmark
        # peft casts each adapter layer's input to the adapter's dtype (fp32) and, under
        # mixed precision, autocast casts it straight back to bf16 for the matmul: two
        # activation-sized copies per adapted layer, and their backward, for the same numbers
        self.adapter_input_cast = adapter_input_cast
        self.force = force
        self.compiled = False
        self._batch_size: int | None = None  # the shape the UNet is compiled for

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
            # held here: a dropped context manager would restore torch's order when collected
            self.attention_order = sdpa_kernel(order, set_priority=True)
            self.attention_order.__enter__()
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.compile_unet:
            for key, value in self.inductor.items():  # for the process, as tf32
                setattr(inductor_config, key, value)
            # in place (nn.Module.compile): parameter names, and so checkpoints, stay the same
            unet.compile(mode=self.compile_mode, dynamic=False)
            self.compiled = True

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
