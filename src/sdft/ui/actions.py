"""What the page's buttons do: the App holds the workspace folders, the job runner and the
generator; each method is one event's handler (layout in app.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr
import pandas as pd

from sdft.generate import AdapterSpec, resolve_file
from sdft.ui import runs, uploads
from sdft.ui.form import FormError, TrainForm, check_overrides, command, to_overrides
from sdft.ui.generation import Generator, parse_extra
from sdft.ui.jobs import JobBusy, JobRunner

FIELDS = [f.name for f in dataclasses.fields(TrainForm)]  # the Train tab's inputs, in order


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def loss_frame(losses: list[tuple[int, float]]) -> pd.DataFrame:
    # typed even when empty: the plot takes its axis types from the first value it gets
    steps, values = zip(*losses, strict=True) if losses else ((), ())
    return pd.DataFrame(
        {"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(values, dtype="float64")}
    )


class App:
    """The page's state: workspace folders, the job runner, the generator."""

    def __init__(self, workspace: Path, base_overrides: list[str], form: TrainForm, load_pipe):
        self.workspace = Path(workspace)
        self.upload_dir = self.workspace / "uploads" / "instance"
        self.runs_dir = self.workspace / "runs"
        self.base_overrides = base_overrides  # model, device, eval: before the form's
        self.form = form
        self.jobs = JobRunner(self.runs_dir)
        self.generator = Generator(load_pipe)

    # -- Data ------------------------------------------------------------------------
    def gallery(self) -> tuple[list, str]:
        items = uploads.list_images(self.upload_dir)
        note = f"{len(items)} images in {self.upload_dir}" if items else "no images yet"
        return [(str(p), f"{p.name}: {c}") for p, c in items], note

    def add_images(self, files: list | None, caption: str):
        if files:
            paths = [getattr(f, "name", f) for f in files]
            try:
                uploads.store_uploads(
                    paths, self.upload_dir, caption, [Path(p).name for p in paths]
                )
            except uploads.UploadError as e:
                raise gr.Error(str(e)) from None
        return *self.gallery(), None

    def select_image(self, event: gr.SelectData) -> tuple[str, str]:
        items = uploads.list_images(self.upload_dir)
        path, caption = items[event.index]
        return path.name, caption

    def save_caption(self, name: str, caption: str):
        if name:
            uploads.write_caption(uploads.inside(self.upload_dir, name), caption)
        return self.gallery()

    def delete_image(self, name: str):
        if name:
            uploads.delete_image(self.upload_dir, name)
        return *self.gallery(), ""

    def delete_all(self):
        uploads.delete_all(self.upload_dir)
        return *self.gallery(), ""

    # -- Train -----------------------------------------------------------------------
    def overrides(self, *values) -> list[str]:
        form = TrainForm(**dict(zip(FIELDS, values, strict=True)))
        if form.data_source == "uploads":
            form.data_path = str(self.upload_dir)
        return [*self.base_overrides, *to_overrides(form)]

    def show_command(self, *values) -> str:
        try:
            return command(self.overrides(*values))
        except FormError as e:
            return f"# not valid yet: {e}"

    def start(self, *values):
        try:
            overrides = self.overrides(*values)
            check_overrides(overrides)
            if values[FIELDS.index("data_source")] == "uploads" and not uploads.list_images(
                self.upload_dir
            ):
                raise FormError("data_source", "no uploaded images: add some in the Data tab")
            job = self.jobs.start("ui", overrides, int(float(values[FIELDS.index("steps")])))
        except (FormError, JobBusy) as e:
            raise gr.Error(str(e)) from None
        return f"started: `{job.run_dir}`"

    def cancel(self) -> str:
        return self.jobs.cancel()

    def resume(self, run_name: str | None = None) -> str:
        job = self.jobs.job
        run_dir = self.runs_dir / run_name if run_name else (job.run_dir if job else None)
        if run_dir is None:
            raise gr.Error("no run to resume")
        try:
            new = self.jobs.resume(run_dir)
        except (FileNotFoundError, JobBusy) as e:
            raise gr.Error(str(e)) from None
        return f"resumed {run_dir.name} as `{new.run_dir}`"

    def progress(self, shown: dict | None):
        """The Train tab's progress; `shown` (per page) holds what that page already shows,
        so images, files and the plot are re-sent only when they change."""
        p = self.jobs.progress()
        if p["state"] == "idle":
            return "idle: no training started yet", *[gr.skip()] * 5, shown
        head = f"**{p['state']}** · step {p['step']} / {p['total']}"
        if p["state"] == "running":
            head += f" · {p['samples_per_s']:.2f} samples/s · ETA {fmt_eta(p['eta_s'])}"
        if p["error"]:
            head += f"\n\n**error:** `{p['error']}`"
        if p["files"]:
            head += f"\n\nadapter and checkpoint in `{p['run_dir']}`"
        previews = [str(x) for x in p["previews"]]
        files = [str(f) for f in p["files"]]
        now = {"losses": p["losses"], "previews": previews, "files": files}
        old = shown or {}

        def changed(key, value):
            return value if old.get(key) != now[key] else gr.skip()

        return (
            head,
            changed("losses", loss_frame(p["losses"])),
            changed("previews", previews[-1] if previews else None),
            changed("previews", [(x, Path(x).stem) for x in reversed(previews)]),
            p["log"],
            changed("files", files or None),
            now,
        )

    # -- Generate --------------------------------------------------------------------
    def adapter_choices(self) -> list[str]:
        return [
            row[0] for row in runs.list_runs(self.runs_dir) if row[1] in ("finished", "cancelled")
        ]

    def pick_adapter(self, run_name: str | None, upload) -> Path:
        if upload is not None:
            path = Path(getattr(upload, "name", upload))
            if path.suffix != ".safetensors":
                raise gr.Error(f"{path.name}: not a .safetensors file")
            return path
        if not run_name:
            raise gr.Error("pick a run or upload a .safetensors adapter")
        try:
            return resolve_file(self.runs_dir / run_name)
        except FileNotFoundError as e:
            raise gr.Error(str(e)) from None

    def generate(self, run_name, upload, prompt, negative, sampler, steps, cfg, seed, scale,
                 resolution, extra, compare):  # fmt: skip
        adapter = self.pick_adapter(run_name, upload)
        kwargs = dict(
            prompt=prompt, negative_prompt=negative, sampler=sampler, steps=int(steps),
            guidance_scale=float(cfg), resolution=int(resolution) or None,
        )  # fmt: skip
        try:
            others = parse_extra(extra)
            if compare:
                grid, scales = self.generator.compare_scales(adapter, others, int(seed), **kwargs)
                label = "scales " + ", ".join(f"{s:g}" for s in scales) + " (left to right)"
                return grid, label
            specs = [AdapterSpec(adapter, float(scale)), *others]
            image = self.generator.images(specs, seeds=[int(seed)], **kwargs)[0]
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        return image, f"{adapter.name} at scale {float(scale):g}, seed {int(seed)}"

    # -- Runs ------------------------------------------------------------------------
    def runs_table(self):
        rows = runs.list_runs(self.runs_dir)
        names = [r[0] for r in rows]
        frame = pd.DataFrame(rows, columns=["run", "status", "method", "step", "loss"])
        return frame, gr.Dropdown(choices=names, value=names[0] if names else None)

    def run_details(self, name: str | None):
        if not name:
            return "", "", loss_frame([]), None, []
        d = runs.run_details(self.runs_dir / name)
        head = f"**{d['status']}**" + (f": `{d['error']}`" if d["error"] else "")
        images = [str(p) for p in d["plots"] + d["previews"][-1:]]
        return (
            head,
            d["config"],
            loss_frame(d["losses"]),
            [str(f) for f in d["files"]] or None,
            images,
        )

    def evaluate(self, name: str | None) -> str:
        if not name:
            raise gr.Error("pick a run")
        extra = [o for o in self.base_overrides if o.startswith(("eval=", "model"))]
        process = runs.start_evaluation(self.runs_dir / name, extra)
        return f"evaluate.py started (pid {process.pid}); plots appear here when it is done"
