"""Every command line in the README's code blocks runs as typed, in its tiny offline form, in a
subprocess started from a folder laid out like a fresh clone (train.py, conf/, data/ linked;
outputs/ its own): a README command cannot rot. A README line this file does not know how to
make tiny fails `test_every_readme_command_has_a_tiny_form`.

How a README line becomes its tiny form (all of it is here, in `tiny_form`):
- `python train.py ...` + TRAIN: the tiny model on the CPU at 64 px, 2 steps (a checkpoint
  each), small previews;
  + TINY_EVAL (the sweep at its smallest, random tiny CLIPs) and TINY_VAL (the validation
  loss at its smallest) when its data has categories.
  A key the README line sets itself is never overridden (its `seeds=`, its `model.pretrained=`).
- `python evaluate.py ...` + TINY_EVAL; `python generate.py ...` + GENERATE (tiny model, CPU,
  2 steps, 64 px).
- Placeholders (PLACEHOLDERS): `/path/to/sd15-diffusers-folder` -> the tiny pipeline saved as
  a diffusers folder; `/path/to/quickdraw` -> the repo's sample; `/path/to/subject` -> four
  drawings as PNGs; `outputs/scribble/<run>` -> the tiny `+experiment=scribble` run made first;
  `style.safetensors` -> that run's kohya file, copied; `outputs/loras` -> a folder holding it.
- What needs a GPU, the hub or SLURM: `trainer=ddp` -> 2 CPU processes (gloo);
  `srun ... trainer.num_nodes=2` -> the Trainer that config builds, under the variables srun
  sets for task 1 of 2 (2 nodes x 1 GPU); `hydra/launcher=slurm` -> `submitit_local` (the same
  plugin, jobs as local processes); DreamBooth keeps `eval=paper` as written (its sweep is
  skipped before any CLIP model loads, so nothing comes from the hub), with 4 class images
  cached in the clone; the Optuna search runs 2 of its 24 trials.
- A hub model (`model=sd15`, `model=sd21` without `model.pretrained=`) -> `model=tiny`
  (`sd21`: with v-prediction, SD2.1-768's own); `/path/to/images` -> ten drawings with
  `metadata.jsonl` captions.
- `make ui` / `python ui.py ...` -> the page started on a free port (the README's `port=` too)
  with a workspace in the clone, until it serves its page; then stopped.
- `make train` -> the Makefile's TINY line + 2 steps and the small sweep; `make paper` (and its
  `ARGS="model=sd15"` form, which needs the SD1.5 weights) -> paper.py at 2 steps into the
  clone; `make test` is this suite and is not run from inside it.
"""

import csv
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SAMPLE
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

README = ROOT / "README.md"
TRAIN = [
    "model=tiny",
    "trainer=cpu",
    "data.resolution=64",
    "data.num_workers=0",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.preview.num_inference_steps=2",
    "callbacks.preview.seeds=[0]",
    "callbacks.checkpoint.every_n_train_steps=1",  # the recipe's every 500, scaled to 2 steps
]
TINY_EVAL = [
    "eval=tiny",
    "eval.scales=[0.0,1.0]",
    "eval.num_prompts=1",
    "eval.seeds=[0]",
    "eval.num_inference_steps=2",
]
# the end-of-fit validation loss at its smallest: 1 drawing a category, one timestep (the
# recipe's 2 x 5 timesteps are 1000 UNet passes, most of a tiny run's time on a CPU)
TINY_VAL = ["data.val_per_category=1", "val.timesteps=[500]"]
GENERATE = ["model=tiny", "device=cpu", "steps=2", "resolution=64", "seeds=[0]"]
CPU_DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
SUBJECT = "/path/to/subject"
PLACEHOLDERS = {
    "/path/to/sd15-diffusers-folder": "sd15-folder",
    "/path/to/quickdraw": str(SAMPLE),
    SUBJECT: "subject",
    "/path/to/images": "images",
}
HUB_MODELS = {
    "model=sd15": ["model=tiny"],
    "model=sd21": ["model=tiny", "model.prediction_type=v_prediction"],
}
SKIPPED = {
    "make test": "it is this test suite",
    'make paper ARGS="model=sd15"': "a GPU and the SD1.5 weights: its tiny form is make paper",
}


def readme_commands() -> list[str]:
    """The command lines of the README's ```bash blocks, comments dropped, in README order."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for b in blocks for line in b.split("\n")]
    return [line for line in lines if line]


def makefile_tiny() -> list[str]:
    """The overrides `make train` passes (the Makefile's TINY line)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    return re.search(r"^TINY := (.*)$", text, flags=re.M).group(1).split()


def keys(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}


def add(args: list[str], extra: list[str]) -> list[str]:
    """`args` + the `extra` overrides whose key `args` does not set itself."""
    return args + [e for e in extra if e.split("=", 1)[0] not in keys(args)]


def tiny_form(command: str, clone: Path) -> list[str] | None:
    """The argv that runs `command`'s tiny offline form in `clone`; None: not run here."""
    if command in SKIPPED:
        return None
    if command == "make train":  # as `make train ARGS="..."`: the same line, 2 steps
        small = ["trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1"]
        small += ["callbacks.preview.every_n_steps=1", *TRAIN[3:], *TINY_EVAL[1:], *TINY_VAL]
        return [sys.executable, "train.py", *add(small, makefile_tiny())]
    if command == "make ui" or "ui.py" in command:
        args = ["model=tiny"] if command == "make ui" else shlex.split(command)[2:]
        args = [a.replace("/path/to/sd15-diffusers-folder", "sd15-folder") for a in args]
        if "model.pretrained" not in keys(args):
            args = [m for a in args for m in HUB_MODELS.get(a, [a])]
        args = [a for a in args if not a.startswith("port=")]
        return [sys.executable, "ui.py", *args, f"port={free_port()}", f"workspace={clone / 'ui'}"]
    if command.startswith("make paper"):
        small = ["trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1"]
        dirs = [f"results_dir={clone / 'paper_results'}", f"work_dir={clone / 'paper_work'}"]
        script = str(ROOT / "experiments" / "scribble_paper" / "paper.py")
        return [sys.executable, script, *dirs, *small, *TINY_EVAL[1:], *TINY_VAL]
    argv = shlex.split(command)
    for placeholder, value in PLACEHOLDERS.items():
        argv = [a.replace(placeholder, value) for a in argv]
    if "<run>" in command:
        argv = [a.replace("<run>", first_run(clone).name) for a in argv]
    if argv[0] == "srun":
        argv = argv[1:]
    script, args = argv[1], argv[2:]
    if "model.pretrained" not in keys(args):
        args = [m for a in args for m in HUB_MODELS.get(a, [a])]
    if script == "generate.py":
        return [sys.executable, script, *add(args, GENERATE)]
    if script == "evaluate.py":
        return [sys.executable, script, *add(args, TINY_EVAL)]
    assert script == "train.py", command
    tiny = [t for t in TRAIN if not (t.startswith("model=") and "model.pretrained" in keys(args))]
    if "trainer=ddp" in args:
        tiny = [t for t in tiny if t != "trainer=cpu"] + CPU_DDP
    if "hydra/launcher=slurm" in args:
        args = [a.replace("launcher=slurm", "launcher=submitit_local") for a in args]
    if "hparams_search=scribble_optuna" in args:
        tiny.append("hydra.sweeper.n_trials=2")
    if "ckpt_path" in keys(args):
        tiny = add(["trainer.max_steps=3"], tiny)  # one step more than the run it continues
    if "data=dreambooth" in args:  # eval=paper stays: the skipped sweep must load nothing
        tiny += ["data.num_class_images=4", f"data.cache_dir={clone / 'cache'}"]
    elif "data=caption_jsonl" not in args:  # a caption folder has no categories to sweep
        tiny += TINY_EVAL + TINY_VAL
    return [sys.executable, script, *add(args, tiny)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serves_its_page(argv: list[str], clone: Path) -> None:
    """Start the UI, wait for its page (the tiny model loads first), stop it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    port = next(a.split("=")[1] for a in argv if a.startswith("port="))
    ui = subprocess.Popen(argv, cwd=clone, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        for _ in range(240):
            assert ui.poll() is None, f"{shlex.join(argv)} exited:\n{ui.stdout.read()[-4000:]}"
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                assert b"gradio" in page.lower()
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{shlex.join(argv)}: no page on port {port} after 120 s")
    finally:
        ui.terminate()
        ui.wait(60)


def run(argv: list[str], clone: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if "hydra/launcher=submitit_local" in argv:  # its 3 jobs run at once: one thread each, or
        env["OMP_NUM_THREADS"] = "1"  # 3 x 2 spinning OpenMP threads thrash 2 cores (10x slower)
    proc = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}"
    return proc


def first_run(clone: Path) -> Path:
    """The tiny `+experiment=scribble` run the `<run>` placeholders stand for (made once)."""
    runs = clone / "outputs" / "scribble"
    done = sorted(runs.glob("*/pytorch_lora_weights.safetensors")) if runs.is_dir() else []
    if not done:
        run(tiny_form("python train.py +experiment=scribble", clone), clone)
        done = sorted(runs.glob("*/pytorch_lora_weights.safetensors"))
    return done[0].parent


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A folder laid out like a fresh clone, with what the placeholders stand for."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("train.py", "evaluate.py", "generate.py", "ui.py", "conf", "data"):
        (root / name).symlink_to(ROOT / name)
    from sdft.models import build_random_pipeline

    build_random_pipeline("tiny").save_pretrained(root / "sd15-folder")
    bitmaps = __import__("numpy").load(SAMPLE / "bitmap" / "apple.npy")[:10]
    (root / "images").mkdir()
    for i, b in enumerate(bitmaps):  # data=caption_jsonl data.path=/path/to/images
        Image.fromarray(255 - b.reshape(28, 28)).convert("RGB").save(root / "images" / f"{i}.png")
    (root / "images" / "metadata.jsonl").write_text(
        "".join(
            f'{{"file_name": "{i}.png", "text": "a scribble of an apple"}}\n' for i in range(10)
        )
    )
    (root / "subject").mkdir()
    bitmaps = torch.from_numpy(__import__("numpy").load(SAMPLE / "bitmap" / "apple.npy")[:4])
    for i, b in enumerate(bitmaps):
        Image.fromarray((255 - b.reshape(28, 28)).numpy()).convert("RGB").save(
            root / "subject" / f"{i}.png"
        )
    kohya = first_run(root) / "scribble.safetensors"
    (root / "outputs" / "loras").mkdir()
    shutil.copy(kohya, root / "outputs" / "loras" / "scribble.safetensors")
    shutil.copy(kohya, root / "style.safetensors")
    return root


def new_folders(parent: Path, before: set[Path]) -> list[Path]:
    return sorted(p for p in parent.glob("*") if p.is_dir() and p not in before)


def overrides_of(command: str) -> list:
    """The README line's own key=value overrides, as Hydra parses them."""
    args = [a for a in shlex.split(command)[2:] if "=" in a and not a.startswith("hydra")]
    args = [a.replace("<run>", "run") for a in args]  # `<` is no character of Hydra's grammar
    return OverridesParser.create().parse_overrides(args)


def check_config_has(config: dict, command: str) -> None:
    """Each `key=value` the README line sets is what the run's saved config holds."""
    for o in overrides_of(command):
        key = o.key_or_group
        if "/" in key or o.is_sweep_override() or "/" in str(o.value()):
            continue  # a group choice, a placeholder or a path: checked by what the run wrote
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = "group"  # a config group choice (method=locon): not a key
                break
            node = node[part]
        if node != "group" and not isinstance(node, dict):
            assert node == o.value(), f"{command}: {key}={node!r}, README says {o.value()!r}"


def test_every_readme_command_has_a_tiny_form(tmp_path):
    commands = readme_commands()
    assert "make train" in commands and len(commands) >= 20
    for c in commands:
        if c in SKIPPED:
            continue
        head = shlex.split(c)
        scripts = ("train.py", "evaluate.py", "generate.py", "ui.py")
        known = head[0] in ("python", "srun", "make") and (
            head[0] == "make" or any(s in c for s in scripts)
        )
        assert known, f"README command {c!r}: add its tiny form to tests/test_readme_commands.py"
        for word in re.findall(r"/path/to/[\w.-]+", c):
            assert word in PLACEHOLDERS, f"{c!r}: add {word} to PLACEHOLDERS"


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_typed(clone, command):
    argv = tiny_form(command, clone)
    if argv is None:
        pytest.skip(f"{command}: {SKIPPED[command]}")
    if command.startswith("srun "):
        return check_srun_reads_slurm_variables(command, clone)
    if "ui.py" in argv[1]:
        return serves_its_page(argv, clone)
    outputs = clone / "outputs"
    before = set(outputs.glob("*/*")) | set(outputs.glob("*"))
    proc = run(argv, clone)

    if command.startswith("make paper"):
        assert (clone / "paper_results" / "README.md").stat().st_size > 500
        rows = list(csv.DictReader(open(clone / "paper_results" / "fig11_image_cosine.csv")))
        assert [float(r["scale"]) for r in rows] == [0.0, 1.0]
    elif "generate.py" in command:
        if "merge_to=merged/" in command:
            assert (clone / "merged" / "model_index.json").is_file()
        else:
            (folder,) = new_folders(outputs / "generate", before)
            prompts, seeds = (1, 1) if "prompts=" in command else (2, 4)  # README's seeds=[0,1,2,3]
            assert len(list((folder / "images").glob("*.png"))) == prompts * seeds
            assert Image.open(folder / "grid.png").size[0] >= 64 * seeds
    elif "evaluate.py" in command:
        (folder,) = new_folders(outputs / "evaluate", before)
        rows = list(csv.DictReader(open(folder / "scale_sweep.csv")))
        assert [float(r["scale"]) for r in rows] == [0.0, 1.0]
    elif " -m " in f" {command} ":
        check_sweep(command, outputs, before, proc)
    else:
        task = "scribble" if "+experiment=scribble" in argv else "train"
        (folder,) = new_folders(outputs / task, before)
        config = yaml.safe_load(open(folder / "config.yaml"))
        check_config_has(config, command)
        adapter = "learned_embeds" if "textual_inversion" in command else "pytorch_lora_weights"
        assert (folder / f"{adapter}.safetensors").stat().st_size > 100
        metrics = folder / "csv" / "metrics.csv"
        rows = list(csv.DictReader(open(metrics))) if metrics.is_file() else []
        steps = [int(r["step"]) for r in rows if r.get("train/loss")]
        if "ckpt_path=" in command:
            assert sorted(set(steps)) == [2]  # it continued a 2-step run: only step 3 is new
        elif "resume=true" in command:  # the newest run with these settings had finished
            assert steps == [] and "continuing from" in proc.stdout + proc.stderr
        else:
            assert sorted(set(steps)) == [0, 1]
        if "eval=tiny" in shlex.join(argv) and steps:  # the end-of-fit sweep ran, offline
            assert (folder / "eval" / "history.csv").is_file()
        if "data=dreambooth" in command:  # eval=paper as written: skipped, nothing loaded
            assert not (folder / "eval").exists()
            assert "scale sweep skipped" in proc.stderr + proc.stdout


def check_sweep(command: str, outputs: Path, before: set, proc) -> None:
    """A sweep writes one folder per trial and the summary, where the README says."""
    (sweep,) = [p for p in new_folders(outputs / "scribble", before) if "multirun" in p.name]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    sizes = [len(o.value().list) for o in overrides_of(command) if o.is_sweep_override()]
    trials = 2 if "optuna" in command else int(torch.tensor(sizes).prod())
    assert len(rows) == trials and {r["status"] for r in rows} == {"completed"}, rows
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
    for r in rows:  # each trial trained, with the values the sweep gave it
        trial = yaml.safe_load(open(sweep / r["folder"] / "config.yaml"))
        assert (sweep / r["folder"] / "pytorch_lora_weights.safetensors").is_file()
        if "method.rank" in r:
            assert trial["method"]["rank"] == int(r["method.rank"])
    if "method.rank=4,8,16" in command:
        assert sorted({int(r["method.rank"]) for r in rows}) == [4, 8, 16]


def check_srun_reads_slurm_variables(command: str, clone: Path) -> None:
    """`srun` starts one task per GPU and sets SLURM_*: the Trainer this config builds takes
    its rank and world from them (no processes of its own)."""
    script = (
        "import sys, hydra; from hydra import compose, initialize_config_dir;"
        "initialize_config_dir(sys.argv[1], version_base='1.3');"
        "cfg = compose('train', overrides=sys.argv[2:]);"
        "t = hydra.utils.instantiate(cfg.trainer);"
        "print(type(t.strategy.cluster_environment).__name__, t.num_nodes, t.world_size,"
        " t.global_rank)"
    )
    args = shlex.split(command)[3:] + [a for a in CPU_DDP if "devices" not in a]
    args += ["trainer.devices=1", "paths.root_dir=.", "paths.output_dir=."]
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NAME": "sdft", "SLURM_NODELIST": "localhost"}  # fmt: skip
    env = {**os.environ, **slurm}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "conf"), *args],
        cwd=clone, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-4:] == ["SLURMEnvironment", "2", "2", "1"]
