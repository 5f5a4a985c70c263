"""The Gradio page: Data, Train, Generate and Runs tabs over one workspace folder.

The page never trains: Start runs `train.py` (jobs.py), and everything it shows of a run is
read from that run's files. Generation runs in this process through `sdft.generate`.
"""

from __future__ import annotations

import gradio as gr

from sdft.generate import SAMPLERS
from sdft.ui.actions import FIELDS, App, loss_frame
from sdft.ui.form import DATA_SOURCES, METHODS, PRESETS

EVERY_S = 1.0  # how often the Train tab reads the run's files
# small previews (64 px on the tiny model) drawn large and sharp; galleries never crop
CSS = """
#newest-preview img, #gen-image img {width: 100%; height: 100%; object-fit: contain;
  image-rendering: pixelated}
"""


def build(app: App) -> gr.Blocks:
    f = app.form
    with gr.Blocks(title="sdft") as page:
        gr.Markdown("## sdft: train and try adapters · every run is a `python train.py` command")
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                with gr.Row():
                    with gr.Column(scale=1):
                        files = gr.File(
                            elem_id="data-files",
                            file_count="multiple",
                            label="Add instance images",
                            file_types=["image"],
                        )
                        new_caption = gr.Textbox(
                            f.instance_prompt, label="Caption for new images (a .txt each)"
                        )
                        data_note = gr.Markdown()
                        data_source = gr.Radio(
                            list(DATA_SOURCES),
                            value=f.data_source,
                            label="Train on",
                            info="uploads: the images here; folder: images + metadata.jsonl "
                            "or .txt; quickdraw: data/quickdraw",
                        )
                        data_path = gr.Textbox(f.data_path, label="Folder (data source 'folder')")
                    with gr.Column(scale=2):
                        gallery = gr.Gallery(
                            label="Instance images (click one to edit)",
                            columns=4,
                            height=360,
                            object_fit="contain",
                            fit_columns=False,
                        )
                        with gr.Row():
                            picked = gr.Textbox(label="Selected image", interactive=False)
                            picked_caption = gr.Textbox(label="Its caption")
                        with gr.Row():
                            save_btn = gr.Button("Save caption")
                            del_btn = gr.Button("Delete image")
                            del_all_btn = gr.Button("Delete all", variant="stop")
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    preset = gr.Dropdown(list(PRESETS), value=None, label="Preset")
                    method = gr.Dropdown(
                        [(k, v) for k, v in METHODS.items()], value=f.method, label="Method"
                    )
                with gr.Row():
                    instance_prompt = gr.Textbox(f.instance_prompt, label="Instance prompt")
                    token = gr.Textbox(f.token, label="Token (Textual Inversion: the new word)")
                    class_prompt = gr.Textbox(f.class_prompt, label="Class prompt")
                    prior_weight = gr.Number(f.prior_weight, label="Prior weight")
                    num_class_images = gr.Number(
                        f.num_class_images, label="Class images", precision=0
                    )
                with gr.Row():
                    preview_prompt = gr.Textbox(f.preview_prompt, label="Preview prompt")
                    preview_negative = gr.Textbox(
                        f.preview_negative, label="Preview negative prompt"
                    )
                    preview_every = gr.Number(
                        f.preview_every,
                        label="Preview every N steps",
                        precision=0,
                        elem_id="train-preview-every",
                    )
                    preview_seed = gr.Number(f.preview_seed, label="Preview seed", precision=0)
                with gr.Row():
                    steps = gr.Number(f.steps, label="Steps", precision=0, elem_id="train-steps")
                    lr = gr.Number(f.lr, label="Learning rate")
                    batch_size = gr.Number(f.batch_size, label="Batch size", precision=0)
                    accumulation = gr.Number(f.accumulation, label="Accumulation", precision=0)
                    rank = gr.Slider(1, 128, value=f.rank, step=1, label="Rank")
                    alpha = gr.Number(f.alpha, label="Alpha")
                    resolution = gr.Number(f.resolution, label="Resolution", precision=0)
                with gr.Accordion("Advanced: any other key, as Hydra overrides", open=False):
                    advanced = gr.Textbox(
                        f.advanced,
                        label="Overrides",
                        placeholder="optim=adamw8bit method.dropout=0.1",
                    )
                cmd = gr.Textbox(
                    label="The command Start runs",
                    buttons=["copy"],
                    lines=2,
                    interactive=False,
                    elem_id="train-command",
                )
                with gr.Row():
                    start_btn = gr.Button("Start", variant="primary")
                    cancel_btn = gr.Button("Cancel", variant="stop")
                    resume_btn = gr.Button("Resume")
                message = gr.Markdown()
                status = gr.Markdown(elem_id="train-status")
                with gr.Row():
                    loss_plot = gr.LinePlot(
                        loss_frame([]), x="step", y="loss", label="Loss", height=260
                    )
                    preview = gr.Image(label="Newest preview", elem_id="newest-preview", height=260)
                adapter_files = gr.File(
                    label="Adapter files (download)",
                    elem_id="adapter-files",
                    height=120,
                    interactive=False,
                )
                previews = gr.Gallery(
                    label="Earlier previews",
                    columns=8,
                    height=200,
                    object_fit="contain",
                    fit_columns=False,
                    allow_preview=False,
                )
                log_tail = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True)
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        with gr.Row():
                            gen_run = gr.Dropdown(
                                app.adapter_choices(), label="Run", elem_id="gen-run"
                            )
                            refresh_gen = gr.Button("Refresh runs", scale=0)
                        gen_upload = gr.File(
                            label="... or an adapter .safetensors",
                            file_types=[".safetensors"],
                            height=110,
                        )
                        gen_prompt = gr.Textbox(f.preview_prompt, label="Prompt")
                        gen_negative = gr.Textbox(f.preview_negative, label="Negative prompt")
                        with gr.Row():
                            gen_sampler = gr.Dropdown(
                                list(SAMPLERS), value="dpmpp_2m", label="Sampler"
                            )
                            gen_steps = gr.Number(
                                20, label="Steps", precision=0, elem_id="gen-steps"
                            )
                            gen_cfg = gr.Number(7.0, label="CFG")
                            gen_seed = gr.Number(0, label="Seed", precision=0)
                            gen_res = gr.Number(f.resolution, label="Resolution", precision=0)
                        gen_scale = gr.Slider(0, 1.5, value=1.0, step=0.05, label="LoRA scale")
                        gen_extra = gr.Textbox(
                            label="More adapters (path:weight, one a line)", lines=2
                        )
                        with gr.Row():
                            gen_btn = gr.Button("Generate", variant="primary")
                            compare_btn = gr.Button("Compare scales 0 / 0.25 / 0.5 / 0.75 / 1")
                    with gr.Column():
                        gen_image = gr.Image(
                            label="Image", elem_id="gen-image", format="png", height=420
                        )
                        gen_note = gr.Markdown()
            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    refresh_runs = gr.Button("Refresh", scale=0, elem_id="runs-refresh")
                    run_pick = gr.Dropdown([], label="Run")
                runs_df = gr.Dataframe(label="Runs", interactive=False, elem_id="runs-table")
                run_status = gr.Markdown()
                with gr.Row():
                    open_btn = gr.Button("Open in Generate")
                    eval_btn = gr.Button("Evaluate (evaluate.py)")
                    run_resume_btn = gr.Button("Resume")
                with gr.Row():
                    run_loss = gr.LinePlot(
                        loss_frame([]), x="step", y="loss", label="Loss", height=220
                    )
                    run_files = gr.File(label="Files (download)", interactive=False)
                run_plots = gr.Gallery(
                    label="Evaluation plots and the last preview",
                    columns=4,
                    height=240,
                    object_fit="contain",
                    fit_columns=False,
                    preview=False,
                )
                with gr.Accordion("Settings (config.yaml)", open=False):
                    run_config = gr.Code(language="yaml")

        form_inputs = [method, data_source, data_path, instance_prompt, token, class_prompt,
                       prior_weight, num_class_images, preview_prompt, preview_negative,
                       preview_every, preview_seed, steps, lr, batch_size, accumulation, rank,
                       alpha, resolution, advanced]  # fmt: skip
        assert [c for c in FIELDS] == [
            "method", "data_source", "data_path", "instance_prompt", "token", "class_prompt",
            "prior_weight", "num_class_images", "preview_prompt", "preview_negative",
            "preview_every", "preview_seed", "steps", "lr", "batch_size", "accumulation", "rank",
            "alpha", "resolution", "advanced",
        ]  # fmt: skip
        page.load(app.gallery, outputs=[gallery, data_note])
        page.load(app.show_command, form_inputs, cmd)
        files.upload(app.add_images, [files, new_caption], [gallery, data_note, files])
        gallery.select(app.select_image, None, [picked, picked_caption])
        save_btn.click(app.save_caption, [picked, picked_caption], [gallery, data_note])
        del_btn.click(app.delete_image, picked, [gallery, data_note, picked])
        del_all_btn.click(app.delete_all, None, [gallery, data_note, picked])
        gr.on([c.change for c in form_inputs], app.show_command, form_inputs, cmd)

        def apply_preset(name):
            values = PRESETS.get(name, {})
            return [values.get(k, gr.skip()) for k in FIELDS]

        preset.change(apply_preset, preset, form_inputs)
        start_btn.click(app.start, form_inputs, message)
        cancel_btn.click(app.cancel, None, message)
        resume_btn.click(lambda: app.resume(None), None, message)
        timer = gr.Timer(EVERY_S)
        shown = gr.State(None)  # what this page shows already (see App.progress)
        timer.tick(
            app.progress, shown,
            [status, loss_plot, preview, previews, log_tail, adapter_files, shown],
            show_progress="hidden",
        )  # fmt: skip

        refresh_gen.click(lambda: gr.Dropdown(choices=app.adapter_choices()), None, gen_run)
        gen_inputs = [gen_run, gen_upload, gen_prompt, gen_negative, gen_sampler, gen_steps,
                      gen_cfg, gen_seed, gen_scale, gen_res, gen_extra]  # fmt: skip
        gen_btn.click(lambda *a: app.generate(*a, False), gen_inputs, [gen_image, gen_note])
        compare_btn.click(lambda *a: app.generate(*a, True), gen_inputs, [gen_image, gen_note])

        refresh_runs.click(app.runs_table, None, [runs_df, run_pick])
        page.load(app.runs_table, None, [runs_df, run_pick])
        run_pick.change(
            app.run_details, run_pick, [run_status, run_config, run_loss, run_files, run_plots]
        )

        def open_in_generate(name):
            return gr.Dropdown(choices=app.adapter_choices(), value=name), gr.Tabs(
                selected="generate"
            )

        open_btn.click(open_in_generate, run_pick, [gen_run, tabs])
        eval_btn.click(app.evaluate, run_pick, run_status)
        run_resume_btn.click(app.resume, run_pick, run_status)
    return page
