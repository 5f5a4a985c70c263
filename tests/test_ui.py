"""The web UI's parts without a browser: form -> overrides, uploads, the one-job rule, and
Cancel (SIGINT / SIGTERM to a tiny `train.py`) leaving a loadable adapter and a resumable
checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

from sdft.generate import AdapterSpec
from sdft.models import build_random_pipeline
from sdft.stop import read_status
from sdft.ui import base_overrides, warn_if_exposed
from sdft.ui.form import (
    PRESETS,
    FormError,
    TrainForm,
    check_overrides,
    command,
    quote,
    to_overrides,
)
from sdft.ui.jobs import STEP_LINE, JobBusy, JobRunner, error_message
from sdft.ui.uploads import (
    UploadError,
    delete_image,
    inside,
    list_images,
    sanitize_name,
    store_uploads,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "quickdraw" / "bitmap" / "apple.npy"


def drawings(folder: Path, n: int = 4) -> list[Path]:
    """n QuickDraw apples as black-on-white PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    bitmaps = np.load(SAMPLE, mmap_mode="r")[:n]
    paths = []
    for i, b in enumerate(bitmaps):
        paths.append(folder / f"apple_{i}.png")
        Image.fromarray(255 - np.asarray(b).reshape(28, 28)).convert("RGB").save(paths[-1])
    return paths


def as_dict(overrides: list[str]) -> dict:
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.get_key_element(): o.value() for o in parsed}


# -- form -> overrides ----------------------------------------------------------------
def test_every_form_field_maps_to_its_config_key():
    form = TrainForm(
        method="dreambooth_lora", data_source="uploads", data_path="/data/my subject",
        instance_prompt="a photo of sks dog", token="sks", class_prompt="a photo of a dog",
        prior_weight=0.5, num_class_images=50, preview_prompt="sks dog, in a bucket",
        preview_negative="blurry", preview_every=25, preview_seed=7, steps=300, lr=2e-4,
        batch_size=2, accumulation=4, rank=16, alpha=8, resolution=256,
        advanced="optim=adamw8bit 'method.dropout=0.1'",
    )  # fmt: skip
    got = as_dict(to_overrides(form))
    assert got["method"] == "dreambooth_lora" and got["data"] == "dreambooth"
    assert got["data.instance_dir"] == "/data/my subject"
    assert got["data.instance_prompt"] == "a photo of sks dog"
    assert got["data.class_prompt"] == "a photo of a dog"
    assert got["data.num_class_images"] == 50
    assert got["method.prior_loss_weight"] == 0.5
    assert got["callbacks.preview.prompts"] == ["sks dog, in a bucket"]
    assert got["callbacks.preview.negative_prompt"] == "blurry"
    assert got["callbacks.preview.every_n_steps"] == 25
    assert got["callbacks.preview.seeds"] == [7]
    assert got["trainer.max_steps"] == 300 and got["trainer.max_epochs"] == -1
    assert got["optim.lr"] == 2e-4
    assert got["data.batch_size"] == 2
    assert got["trainer.accumulate_grad_batches"] == 4
    assert got["method.rank"] == 16 and got["method.alpha"] == 8.0
    assert got["data.resolution"] == 256
    assert got["optim"] == "adamw8bit" and got["method.dropout"] == 0.1
    check_overrides(["model=tiny", *to_overrides(form)])  # every key exists in conf/


def test_lora_on_uploads_reads_txt_captions_and_ti_sets_its_placeholder():
    lora = as_dict(to_overrides(TrainForm(method="LoRA", data_path="/up")))
    assert (lora["data"], lora["data.path"], lora["data.caption_source"]) == (
        "caption_jsonl", "/up", "txt",
    )  # fmt: skip
    form = TrainForm(
        method="textual_inversion", data_path="/up", token="<cat-toy>",
        instance_prompt="a photo of <cat-toy>",
    )  # fmt: skip
    ti = as_dict(to_overrides(form))
    assert ti["method.placeholder"] == "<cat-toy>" and "method.rank" not in ti
    qd = as_dict(to_overrides(TrainForm(method="lora", data_source="quickdraw")))
    assert qd["data"] == "quickdraw" and "data.path" not in qd


@pytest.mark.parametrize(
    "field, value",
    [
        ("rank", 0), ("rank", 129), ("rank", 4.5), ("steps", 0), ("steps", "many"),
        ("lr", 0), ("lr", -1e-4), ("batch_size", 0), ("accumulation", 0), ("alpha", 0),
        ("resolution", 100), ("preview_every", -1), ("preview_seed", -1),
        ("prior_weight", -1), ("num_class_images", -3), ("instance_prompt", "  "),
        ("preview_prompt", ""), ("method", "dora"), ("data_source", "s3"),
        ("advanced", "a=b=c'"), ("data_path", ""),
    ],
)  # fmt: skip
def test_bad_value_is_refused_naming_its_field(field, value):
    form = TrainForm(data_path="/up", num_class_images=10)
    setattr(form, field, value)
    with pytest.raises(FormError) as e:
        to_overrides(form)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_unknown_advanced_key_is_refused_before_the_start():
    overrides = to_overrides(TrainForm(data_path="/up", advanced="method.rnak=8"))
    with pytest.raises(FormError, match="advanced: .*method.rnak"):
        check_overrides(overrides)


def test_ti_prompt_without_its_token_is_refused():
    form = TrainForm(method="textual_inversion", data_path="/up", token="<x>")
    with pytest.raises(FormError, match="instance_prompt: must contain the token '<x>'"):
        to_overrides(form)


def test_presets_compose_with_the_real_configs():
    for values in PRESETS.values():
        form = TrainForm(data_path="/up", **values)
        check_overrides(to_overrides(form))  # the experiments and every key exist
    assert as_dict(to_overrides(TrainForm(**PRESETS["scribble (paper recipe)"])))[
        "trainer.max_steps"
    ] == 4410  # fmt: skip


@pytest.mark.parametrize("text", ["a, b", "it's [x] \\ y\\", "<lora:a:1>", "true", "12", "/a b"])
def test_quoted_values_parse_back_to_the_same_text(text):
    parsed = OverridesParser.create().parse_overrides([f"data.instance_prompt={quote(text)}"])
    assert parsed[0].value() == text


def test_command_is_what_a_shell_passes_back_as_the_overrides():
    form = TrainForm(
        data_path="/tmp/it's here", instance_prompt='say "sks"', advanced="~callbacks.preview"
    )
    overrides = to_overrides(form)
    line = command(overrides)
    assert line.startswith("python train.py method=dreambooth_lora ")
    argv = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {line.removeprefix('python train.py ')}"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert argv == overrides


# -- uploads --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, safe",
    [
        ("../../etc/passwd", "passwd"), ("..\\..\\win.ini", "win.ini"), ("..", "image"),
        (".bashrc", "bashrc"), ("my photo (1).JPG", "my_photo__1.jpg"),
        ("a\x00b.png", "a_b.png"), ("ok-name_2.webp", "ok-name_2.webp"),
    ],
)  # fmt: skip
def test_upload_names_are_sanitised(name, safe):
    assert sanitize_name(name) == safe


def test_uploads_are_checked_copied_and_captioned(tmp_path):
    src = drawings(tmp_path / "src", 2)
    before = [p.read_bytes() for p in src]
    stored = store_uploads(src, tmp_path / "up", "a sks scribble", ["../x.png", "x.png"])
    assert [p.name for p in stored] == ["x.png", "x_1.png"]
    assert [(p.name, c) for p, c in list_images(tmp_path / "up")] == [
        ("x.png", "a sks scribble"), ("x_1.png", "a sks scribble"),
    ]  # fmt: skip
    assert [p.read_bytes() for p in src] == before  # originals untouched
    delete_image(tmp_path / "up", "x.png")
    assert [p.name for p in (tmp_path / "up").iterdir()] == ["x_1.png", "x_1.txt"]


def test_bad_uploads_are_refused_by_name_and_nothing_is_stored(tmp_path):
    good = drawings(tmp_path / "src", 1)[0]
    broken = tmp_path / "src" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    notes = tmp_path / "src" / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UploadError, match=r"^broken\.png: unreadable image"):
        store_uploads([good, broken], tmp_path / "up")
    with pytest.raises(UploadError, match=r"^notes\.txt: not an image file"):
        store_uploads([notes], tmp_path / "up")
    tiny = tmp_path / "src" / "dot.png"
    Image.new("RGB", (4, 4)).save(tiny)
    with pytest.raises(UploadError, match=r"^dot\.png: 4x4 px"):
        store_uploads([tiny], tmp_path / "up")
    assert not list_images(tmp_path / "up")
    with pytest.raises(UploadError, match="not a file of"):
        inside(tmp_path / "up", "../src/apple_0.png")


# -- the page's settings --------------------------------------------------------------
def test_non_local_host_or_share_warns(capsys, monkeypatch):
    from omegaconf import OmegaConf

    local = OmegaConf.create({"host": "127.0.0.1", "port": 7860, "share": False, "auth": None})
    assert warn_if_exposed(local) is None
    exposed = OmegaConf.merge(local, {"host": "0.0.0.0"})
    assert "anyone with the address" in warn_if_exposed(exposed)
    assert "gradio.live" in warn_if_exposed(OmegaConf.merge(local, {"share": True}))
    cfg = OmegaConf.create({"device": "cpu", "train_overrides": ["logger=csv"]})
    assert base_overrides(cfg, "tiny", []) == [
        "model=tiny",
        "trainer=cpu",
        "eval=tiny",
        "logger=csv",
    ]
    gpu = OmegaConf.create({"device": "auto", "train_overrides": []})
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert base_overrides(gpu, "sd15", []) == ["model=sd15", "trainer=gpu"]  # bf16-mixed


# -- jobs -----------------------------------------------------------------------------
def test_second_start_is_refused_while_one_runs(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\nsleep 60\n")
    fake.chmod(0o755)
    runner = JobRunner(tmp_path / "runs", python=str(fake), grace_s=5)
    first = runner.start("a", ["method=lora"], 10)
    with pytest.raises(JobBusy, match=f"a training is running \\({first.run_dir.name}\\)"):
        runner.start("b", ["method=lora"], 10)
    assert json.loads((first.run_dir / "ui.json").read_text())["overrides"] == ["method=lora"]
    assert runner.cancel().startswith("cancelled before training started: nothing saved")
    assert runner.progress()["state"] == "cancelled"
    assert runner.start("c", [], 10).run_dir != first.run_dir  # free again


def test_failed_run_reports_failed_with_its_error(tmp_path):
    fake = tmp_path / "fake_python"  # prints what Hydra prints for a bad value, exits 1
    fake.write_text(
        "#!/bin/sh\necho 'Error executing job with overrides: []'\n"
        "echo 'ValueError: data.instance_prompt is empty'\nexit 1\n"
    )
    fake.chmod(0o755)
    runner = JobRunner(tmp_path / "runs", python=str(fake))
    runner.start("bad", [], 10).process.wait(30)
    progress = runner.progress()
    assert (progress["state"], progress["error"]) == (
        "failed", "ValueError: data.instance_prompt is empty",
    )  # fmt: skip


def test_failed_run_shows_the_exception_line():
    log = (
        "Error executing job with overrides: ['a=b']\nTraceback (most recent call last):\n"
        "  File \"x.py\", line 1\nFileNotFoundError: data.instance_dir='/nope': no such "
        "directory\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
    )
    assert error_message(log) == "FileNotFoundError: data.instance_dir='/nope': no such directory"
    assert STEP_LINE.findall("sdft step 12: 3.5 samples/s since warm-up") == [("12", "3.5")]


# -- cancel: a real tiny train.py -----------------------------------------------------
TINY_RUN = [
    "model=tiny", "trainer=cpu", "logger=csv", "method=dreambooth_lora", "data=dreambooth",
    "data.num_class_images=0", "data.resolution=32", "data.num_workers=0",
    "trainer.max_steps=100000", "trainer.max_epochs=-1", "~callbacks.scale_sweep",
    "callbacks.preview.every_n_steps=0", "callbacks.speed.print_every_n_steps=1",
    "trainer.enable_progress_bar=false", "optim.lr=1e-2", "trainer.log_every_n_steps=1",
]  # fmt: skip


def wait_for_step(log: Path, step: int, process: subprocess.Popen, timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"train.py exited early:\n{log.read_text()[-3000:]}")
        found = STEP_LINE.findall(log.read_text() if log.exists() else "")
        if found and int(found[-1][0]) >= step:
            return
        time.sleep(0.1)
    pytest.fail(f"no step {step} within {timeout} s")


def lora_changes_the_unet(adapter: Path) -> float:
    """max |UNet(x) with the adapter - UNet(x) without|, through diffusers' own loader."""
    pipe = build_random_pipeline("tiny")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        before = pipe.unet(x, 10, text).sample
        pipe.load_lora_weights(str(adapter))
        after = pipe.unet(x, 10, text).sample
    return (after - before).abs().max().item()


def test_sigint_saves_a_loadable_adapter_and_a_checkpoint(tmp_path):
    inst = tmp_path / "inst"
    drawings(inst)
    out, log = tmp_path / "run", tmp_path / "console.log"
    with open(log, "wb") as f:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *TINY_RUN, f"data.instance_dir={inst}",
             f"hydra.run.dir={out}"],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    wait_for_step(log, 3, process)
    process.send_signal(signal.SIGINT)  # what Ctrl+C does
    t0 = time.time()
    process.wait(120)
    stopped_in = time.time() - t0
    status = read_status(out)
    assert status["status"] == "cancelled" and status["step"] >= 3, log.read_text()[-2000:]
    assert stopped_in < 60, stopped_in
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == status["step"]
    assert {Path(f).name for f in status["files"]} == {
        "pytorch_lora_weights.safetensors", "train.safetensors",
    }  # fmt: skip
    for f in status["files"]:  # both formats load in diffusers and carry the trained update
        assert lora_changes_the_unet(Path(f)) > 1e-6
    assert "cancelled at step" in log.read_text()


def test_ui_cancel_then_resume_continues_to_the_planned_steps(tmp_path):
    inst = tmp_path / "inst"
    drawings(inst)
    runner = JobRunner(tmp_path / "runs", grace_s=30)
    planned = ("trainer.max_steps", "callbacks.preview.every_n_steps")
    overrides = [o for o in TINY_RUN if not o.startswith(planned)]
    # a preview at every step keeps the 8 steps slower than the page's cancel: on an idle
    # machine the tiny model trains 8 steps in a fraction of a second
    overrides += [f"data.instance_dir={inst}", "trainer.max_steps=8"]
    job = runner.start("ui", [*overrides, "callbacks.preview.every_n_steps=1"], 8)
    wait_for_step(job.run_dir / "console.log", 2, job.process)
    message = runner.cancel()  # SIGTERM: Lightning stops at the end of the step
    step = read_status(job.run_dir)["step"]
    assert message == f"cancelled at step {step}: adapter and checkpoint in {job.run_dir}"
    assert 2 <= step < 8
    progress = runner.progress()
    assert progress["state"] == "cancelled"
    assert progress["files"][0].name == "pytorch_lora_weights.safetensors"
    resumed = runner.resume(job.run_dir)
    assert f"ckpt_path={job.run_dir}/checkpoints/last.ckpt" in resumed.overrides
    resumed.process.wait(600)
    status = read_status(resumed.run_dir)
    assert status["status"] == "finished", (resumed.run_dir / "console.log").read_text()[-2000:]
    assert status["step"] == 8
    # the resumed run continued the step counter: its first loss is logged at the step the
    # cancelled run had reached (Lightning logs before the optimiser step), not at 0
    assert runner.progress()["losses"][0][0] == step


# -- generate -------------------------------------------------------------------------
def test_compare_scales_draws_one_seed_at_each_scale_side_by_side(tmp_path):
    from test_generate import random_adapter

    from sdft.adapters import LoRAMethod
    from sdft.ui.generation import COMPARE_SCALES, Generator

    lora = random_adapter(LoRAMethod(), tmp_path, 1)["pytorch_lora_weights.safetensors"]
    generator = Generator(lambda: build_random_pipeline("tiny"))
    kwargs = dict(prompt="a sks scribble", steps=2, resolution=32)
    grid, scales = generator.compare_scales(lora, [], seed=3, **kwargs)
    assert scales == list(COMPARE_SCALES) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid.size == (5 * 32, 32)
    panels = [np.asarray(grid.crop((32 * i, 0, 32 * (i + 1), 32))).astype(int) for i in range(5)]
    base = Generator(lambda: build_random_pipeline("tiny")).images([], seeds=[3], **kwargs)[0]
    full = generator.images([AdapterSpec(lora, 1.0)], seeds=[3], **kwargs)[0]
    assert np.abs(panels[0] - np.asarray(base).astype(int)).max() <= 1  # scale 0 = base model
    assert np.abs(panels[4] - np.asarray(full).astype(int)).max() <= 1
    assert np.abs(panels[4] - panels[0]).mean() > 1  # the adapter changes the image
