"""bench/attention.py: the UNet's attention time by the SDPA kernel tried first."""

import attention
import pytest


def row(count, default, flash, cudnn):
    r = {"count": count, "default_ms": default, "default_err": 1e-3}
    for name, ms in (("flash", flash), ("efficient", 9.0), ("cudnn", cudnn)):
        r[f"{name}_ms"], r[f"{name}_err"] = (ms, 1e-3) if ms else (None, "not supported")
    return r


def test_torchs_own_choice_is_the_measured_default_and_a_missing_kernel_falls_through():
    rows = [row(5, 2.0, 3.0, 2.0), row(1, 4.0, 4.0, None)]  # cuDNN cannot take head dim 160
    assert attention.unet_ms(rows, None) == pytest.approx(5 * 2.0 + 4.0)
    assert attention.unet_ms(rows, "cudnn") == pytest.approx(5 * 2.0 + 4.0)  # then flash
    assert attention.unet_ms(rows, "flash") == pytest.approx(5 * 3.0 + 4.0)
