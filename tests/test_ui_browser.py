"""The web UI end to end in a real headless Chromium (Debian's package, driven by Playwright):
upload four drawings, start 1000 steps with a preview every 5, Cancel after the first preview
(a run far longer than the cancel takes: 20 steps finished before the click on a fast CPU),
download the adapter and load it with diffusers, generate with it. Saves a screenshot of
each tab into docs/ (shown in the README)."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdft.models import build_random_pipeline
from sdft.stop import read_status

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TRAIN = [  # every training of this page: small and fast on a CPU
    "logger=csv", "data.num_workers=0", "callbacks.preview.num_inference_steps=2",
    "~callbacks.scale_sweep", "callbacks.speed.warmup_steps=1",
]  # fmt: skip
SLOW = 600_000  # ms: a shared 2-core CPU can be very slow

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no /usr/bin/chromium: apt-get install chromium chromium-driver (.ci/run does)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    """`python ui.py` on a free port with a temporary workspace; yields (url, workspace)."""
    port, workspace = free_port(), tmp_path / "ws"
    log = open(tmp_path / "ui.log", "wb")
    train = "[" + ",".join(f'"{o}"' for o in TRAIN) + "]"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ui.py"), f"port={port}", f"workspace={workspace}",
         f"train_overrides={train}", "device=cpu"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ui.py exited:\n{(tmp_path / 'ui.log').read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    yield url, workspace
    process.terminate()  # atexit in ui.py cancels a training still running
    process.wait(120)
    log.close()


def drawings(folder: Path) -> list[str]:
    """Four QuickDraw apples as black-on-white PNGs, as a user would upload them."""
    folder.mkdir(parents=True)
    paths = []
    for i, bitmap in enumerate(np.load(ROOT / "data/quickdraw/bitmap/apple.npy")[:4]):
        paths.append(str(folder / f"apple_{i}.png"))
        Image.fromarray(255 - bitmap.reshape(28, 28)).convert("RGB").save(paths[-1])
    return paths


def shot(page, name: str) -> None:
    page.wait_for_timeout(500)  # let the last update paint
    page.screenshot(path=str(ROOT / "docs" / f"ui_{name}.png"), full_page=True)


def test_upload_train_preview_cancel_download_generate(ui, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, workspace = ui
    images = drawings(tmp_path / "drawings")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)

        # Data: four drawings, each stored with a caption
        page.locator("#data-files input[type=file]").set_input_files(images)
        expect(page.get_by_text("4 images in")).to_be_visible(timeout=SLOW)
        uploaded = sorted(p.name for p in (workspace / "uploads" / "instance").iterdir())
        assert uploaded == [f"apple_{i}.{ext}" for i in range(4) for ext in ("png", "txt")]
        shot(page, "data")

        # Train: 1000 steps, a preview every 5, Start; wait for the first preview
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-steps input").fill("1000")
        page.locator("#train-preview-every input").fill("5")
        page.locator("#train-preview-every input").press("Tab")
        cmd = page.locator("#train-command textarea")
        expect(cmd).to_have_value(re.compile(r"trainer\.max_steps=1000 .*every_n_steps=5"))
        page.get_by_role("button", name="Start", exact=True).click()
        expect(page.locator("#newest-preview img")).to_be_visible(timeout=SLOW)
        expect(page.locator("#train-status")).to_contain_text("running")
        run_dir = next((workspace / "runs").iterdir())
        assert (run_dir / "previews" / "step_000005.png").is_file()
        shot(page, "train")

        # Cancel: the adapter is saved from the current weights and offered for download
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#train-status")).to_contain_text("cancelled", timeout=SLOW)
        link = page.locator('#adapter-files a[download="pytorch_lora_weights.safetensors"]')
        expect(link.first).to_be_visible(timeout=SLOW)
        status = read_status(run_dir)
        assert status["status"] == "cancelled" and 5 <= status["step"] < 1000
        body = page.request.get(link.first.get_attribute("href")).body()
        saved = run_dir / "pytorch_lora_weights.safetensors"
        assert body == saved.read_bytes()
        downloaded = tmp_path / "pytorch_lora_weights.safetensors"
        downloaded.write_bytes(body)
        pipe = build_random_pipeline("tiny")
        pipe.load_lora_weights(str(downloaded))
        assert pipe.get_list_adapters()["unet"]
        lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
        assert lora_b and max(p.abs().max().item() for p in lora_b) > 0  # it trained
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)[
            "global_step"
        ] == status["step"]  # fmt: skip

        # Runs: the run is listed as cancelled; open it in Generate
        page.get_by_role("tab", name="Runs").click()
        page.locator("#runs-refresh").click()
        expect(page.locator("#runs-table")).to_contain_text("cancelled", timeout=SLOW)
        shot(page, "runs")
        page.get_by_role("button", name="Open in Generate").click()

        # Generate: one image with the adapter, shown on the page
        page.locator("#gen-steps input").fill("2")
        page.locator("#gen-steps input").press("Tab")
        page.get_by_role("button", name="Generate", exact=True).click()
        image = page.locator("#gen-image img")
        expect(image).to_be_visible(timeout=SLOW)
        assert image.evaluate("img => img.complete && img.naturalWidth") == 64
        expect(page.get_by_text(f"{saved.name} at scale 1")).to_be_visible()
        shot(page, "generate")
        browser.close()
