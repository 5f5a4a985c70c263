"""An exponential moving average of the adapter weights (never the frozen base), through
diffusers' `EMAModel`: ema = d * ema + (1 - d) * w after every `update_every` optimiser
steps, with d = min(decay, (1 + n) / (10 + n)) after n updates (EMAModel's warm-up), so the
average does not remember the random initialisation for long.

It is kept in the checkpoint (a resumed run ends with the same average as an uninterrupted
one), written beside the adapter as `<file>_ema.safetensors` (every format the method
writes), and `eval.use_ema` scores it in the scale sweep (`applied`).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from diffusers.training_utils import EMAModel

DEVICES = ("gpu", "cpu")


class AdapterEMA(L.Callback):
    """EMA of the trainable (adapter) parameters; `device=cpu` keeps it off the GPU.
    `decay=None` (the default config) turns it off."""

    def __init__(self, decay: float | None = None, update_every: int = 1, device: str = "gpu"):
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must be in (0, 1), e.g. 0.999")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"callbacks.ema.update_every={update_every!r} must be an int >= 1")
        if device not in DEVICES:
            raise ValueError(f"callbacks.ema.device={device!r} must be one of {DEVICES}")
        self.decay, self.update_every, self.device = decay, update_every, device
        self.ema: EMAModel | None = None
        self._pending: dict | None = None  # a checkpoint's state, loaded before on_fit_start
        self._last_step = -1

    @staticmethod
    def params(module: L.LightningModule) -> list[torch.nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def _home(self, module: L.LightningModule) -> torch.device:
        return torch.device("cpu") if self.device == "cpu" else module.device

    # -- Lightning hooks -------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.decay is not None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.enabled:
            return
        params = [p.detach().to(self._home(module)) for p in self.params(module)]
        self.ema = EMAModel(params, decay=self.decay)
        if self._pending is not None:
            self.load_state_dict(self._pending)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # after an optimiser step (not every accumulated batch)
        if not self.enabled or step == self._last_step or step % self.update_every:
            return
        self._last_step = step
        params = self.params(module)
        if self.device == "cpu":  # EMAModel averages only params that require grad
            params = [p.detach().to("cpu").requires_grad_() for p in params]
        self.ema.step(params)

    def state_dict(self) -> dict:
        return {} if self.ema is None else {"ema": self.ema.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.ema is None:
            self._pending = state_dict
            return
        self._pending = None
        if "ema" in state_dict:  # checkpoints load on the CPU: back where the average lives
            home = self.ema.shadow_params[0].device if self.ema.shadow_params else "cpu"
            self.ema.load_state_dict(state_dict["ema"])
            self.ema.shadow_params = [p.to(home) for p in self.ema.shadow_params]

    # -- using the average -------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, module: L.LightningModule) -> Iterator[None]:
        """The module's adapter holds the EMA weights inside, its own weights after."""
        params = self.params(module)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def save_adapter(
        self, module: L.LightningModule, out_dir: str | Path, metadata: dict | None = None
    ) -> list[Path]:
        """Write the EMA adapter as the method's files with `_ema` added to each name."""
        out_dir = Path(out_dir)
        tmp = out_dir / ".ema_export"
        with self.applied(module):
            files = module.save_adapter(tmp, metadata)
        moved = []
        for f in files:
            target = out_dir / f"{f.stem}_ema{f.suffix}"
            f.replace(target)
            moved.append(target)
        shutil.rmtree(tmp, ignore_errors=True)
        return moved


def find_ema(trainer: L.Trainer) -> AdapterEMA | None:
    """The trainer's EMA callback, if one is on."""
    return next((c for c in trainer.callbacks if isinstance(c, AdapterEMA) and c.enabled), None)
