"""`make paper` at toy size: every file of experiments/scribble_paper/results/, and the W&B
offline run of its evaluation read back from disk."""

import csv
import importlib.util
import json
import struct
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image
from wandb.proto import wandb_internal_pb2

SCALES = [0.0, 0.5, 1.0]
# The tiny profile of paper.py (model=tiny, CPU, random tiny CLIPs), shrunk to seconds: 2
# training steps on 6 categories, 1 prompt per group and 1 seed at 3 scales, 2 denoising steps.
SMALL = [
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "data.num_categories=6",
    "data.per_category=2",
    "data.batch_size=4",
    "callbacks.preview.num_inference_steps=2",
    "callbacks.preview.seeds=[0]",
    f"eval.scales=[{','.join(map(str, SCALES))}]",
    "eval.num_prompts=1",
    "eval.seeds=[0]",
    "eval.num_inference_steps=2",
]
FIG10 = [  # CLIP score vs scale: trained, held-out, and the real drawings' reference
    "scale",
    "clip_score",
    "clip_score_std",
    "clip_score_heldout",
    "clip_score_heldout_std",
    "clip_score_reference",
    "clip_score_reference_heldout",
]
FIG11 = [  # image cosine vs scale, trained and held-out
    "scale",
    "clip_img_cos",
    "clip_img_cos_std",
    "clip_img_cos_heldout",
    "clip_img_cos_heldout_std",
]
GRIDS = [  # the paper's figures 5-9
    "fig5_apple_seeds_x_scales",
    "fig6_trained_categories",
    "fig7_heldout_categories",
    "fig8_complex_prompts",
    "fig9_complex_prompts_scribble",
]


def load_paper():
    """experiments/scribble_paper/paper.py (a script, not a package) as a module."""
    path = ROOT / "experiments" / "scribble_paper" / "paper.py"
    spec = importlib.util.spec_from_file_location("scribble_paper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """One toy-sized `make paper` run, W&B offline inside the temporary folder."""
    tmp = tmp_path_factory.mktemp("paper")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            mp.setenv(var, str(tmp / "wandb_home"))
        mp.setenv("WANDB_MODE", "offline")
        out = load_paper().main(
            [f"results_dir={tmp / 'results'}", f"work_dir={tmp / 'work'}", *SMALL]
        )
    return {**out, "work": tmp / "work"}


def read_csv(path: Path) -> tuple[list[str], list[list[float]]]:
    header, *rows = list(csv.reader(path.open()))
    return header, [[float(v) for v in row] for row in rows]


def test_paper_writes_every_table_plot_grid_and_the_readme(paper):
    out = paper["results_dir"]
    for stem in ("fig10_clip_score", "fig11_image_cosine"):
        for suffix in (".csv", ".md", ".png"):
            assert (out / f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"
    for stem in GRIDS:
        assert (out / f"{stem}.png").is_file(), f"{stem}.png missing"
    assert set(paper["files"]) >= {out / "README.md", out / "summary.json"}
    assert all(f.is_file() for f in paper["files"])

    # the tables: one row per scale, in order, with the paper's columns
    for stem, columns in (("fig10_clip_score", FIG10), ("fig11_image_cosine", FIG11)):
        header, rows = read_csv(out / f"{stem}.csv")
        assert header == columns
        assert [r[0] for r in rows] == SCALES
        assert all(len(r) == len(columns) for r in rows)
        md = (out / f"{stem}.md").read_text().splitlines()
        assert md[0] == "| " + " | ".join(columns) + " |"
        assert len(md) == 2 + len(SCALES)
    _, fig10 = read_csv(out / "fig10_clip_score.csv")
    assert len({r[FIG10.index("clip_score_reference")] for r in fig10}) == 1  # flat reference
    _, fig11 = read_csv(out / "fig11_image_cosine.csv")
    assert all(-1 <= r[1] <= 1 for r in fig11)
    assert paper["metrics"]["eval/best_scale"] in SCALES

    # the grids: a column per scale (all 3 here: at most 6 of them); figure 5 a row per seed
    for stem in GRIDS:
        w, h = Image.open(out / f"{stem}.png").size
        assert w > len(SCALES) * 64 and h > 64, stem
    assert Image.open(out / "fig5_apple_seeds_x_scales.png").height > 4 * 64
    for stem in ("fig10_clip_score", "fig11_image_cosine"):
        assert Image.open(out / f"{stem}.png").size == (720, 480)  # matplotlib 6x4 in at 120 dpi

    readme = (out / "README.md").read_text()
    for name in ["fig10_clip_score", "fig11_image_cosine", *GRIDS]:
        assert f"({name}.png)" in readme, name
    assert "model=tiny" in readme and 'make paper ARGS="model=sd15"' in readme
    assert "python train.py +experiment=scribble model=tiny" in readme
    assert "python evaluate.py adapter=" in readme
    summary = json.loads((out / "summary.json").read_text())
    assert summary["figures"] == GRIDS


# -- the W&B offline run: a LevelDB-style log of protobuf records (wandb's `.wandb` file) --
BLOCK, HEADER = 32768, 7  # 32 KiB blocks; chunk header: crc32c (4), length (2), type (1)
FULL, LAST = 1, 4  # chunk types that end a record (FIRST = 2 and MIDDLE = 3 continue one)


def wandb_records(path: Path):
    """Each Record of an offline run file, in order (file header: ':W&B', magic, version)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, record = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        record += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            yield wandb_internal_pb2.Record.FromString(record)
            record = b""


def read_wandb_run(run_dir: Path) -> dict:
    """history (flat "a/b" keys -> last value), config (likewise) and saved file paths."""
    (run_file,) = run_dir.glob("run-*.wandb")
    run = {"history": {}, "config": {}, "files": set()}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                run["history"][key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                run["config"][key] = json.loads(item.value_json)
        elif kind == "files":
            run["files"] |= {f.path for f in record.files.files}
    return run


def test_wandb_offline_run_of_the_evaluation_holds_tables_plots_and_grids(paper):
    eval_dir = paper["work"] / "eval"
    (run_dir,) = (eval_dir / "wandb").glob("offline-run-*")
    run = read_wandb_run(run_dir)
    history, files = run["history"], run_dir / "files"
    assert all((files / f).is_file() for f in run["files"])

    # the scale-sweep table: the same columns and rows as scale_sweep.csv on disk
    assert history["eval/scale_sweep/_type"] == "table-file"
    table = json.loads((files / history["eval/scale_sweep/path"]).read_text())
    header, rows = read_csv(eval_dir / "scale_sweep.csv")
    assert table["columns"] == header
    assert [v for row in table["data"] for v in row] == pytest.approx(sum(rows, []))
    assert [r[0] for r in table["data"]] == SCALES

    # a line plot per metric over scale: a Vega panel over its own logged table
    for stem, lines in (("clip_score", 4), ("clip_img_cos", 2)):  # + 2 reference lines
        panel = run["config"][f"_wandb/visualize/eval/plot/{stem}"]
        assert panel["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
        points = json.loads((files / history[f"eval/plot/{stem}_table/path"]).read_text())
        assert len(points["data"]) == lines * len(SCALES)

    # the scale grids and the PNG plots, as images: the files on disk, pixel for pixel
    for key, png in (
        ("eval/grid/trained", "grid_trained.png"),
        ("eval/grid/held_out", "grid_held_out.png"),
        ("eval/figure/clip_score", "clip_score.png"),
        ("eval/figure/clip_img_cos", "clip_img_cos.png"),
    ):
        assert history[f"{key}/_type"] == "images/separated", key
        (logged,) = history[f"{key}/filenames"]
        expected = Image.open(eval_dir / png).convert("RGB")
        assert Image.open(files / logged).convert("RGB").tobytes() == expected.tobytes(), key
    assert not [k for k in history if k.startswith("eval/figure/grid_")]  # logged once

    # the scalars, at the adapter's training step
    for name, value in paper["metrics"].items():
        assert history[name] == pytest.approx(value), name
    assert history["trainer/global_step"] == 2
