"""The Train tab's form -> the Hydra overrides of a `python train.py ...` command.

Every field maps to config keys that `conf/` defines (the table in `TrainForm`); a bad value
raises `FormError` naming the field before anything starts. The overrides are composed with
the real configs (`check_overrides`), so an unknown key in "Advanced" is refused the same way
`train.py` would refuse it, before the child process is started.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
METHODS = {  # label in the UI -> conf/method/<name>.yaml
    "LoRA": "lora",
    "DreamBooth-LoRA": "dreambooth_lora",
    "LoCon": "locon",
    "LoHa": "loha",
    "LoKr": "lokr",
    "Textual Inversion": "textual_inversion",
}
YAML_WORDS = {"true", "false", "null", "none", "yes", "no", "on", "off", "nan", "inf"}
DATA_SOURCES = ("uploads", "folder", "quickdraw")
# What the UI itself needs from the run, shown in the command like the rest: a progress line
# per step on stdout, metrics.csv written as it is logged, no progress bar in the log.
UI_OVERRIDES = [
    "callbacks.speed.print_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "+logger.csv.flush_logs_every_n_steps=1",
]


class FormError(ValueError):
    """A bad form value; `field` is the form field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class TrainForm:
    """The Train tab. Field -> override: method -> `method=`; data_source uploads/folder ->
    `data=dreambooth` (DreamBooth-LoRA) or `data=caption_jsonl`, quickdraw -> `data=quickdraw`;
    instance_prompt -> `data.instance_prompt` (DreamBooth) or the captions; token ->
    `method.placeholder` (Textual Inversion); class_prompt, num_class_images -> `data.*`;
    prior_weight -> `method.prior_loss_weight`; preview_* -> `callbacks.preview.*`; steps ->
    `trainer.max_steps`; lr -> `optim.lr`; batch_size -> `data.batch_size`; accumulation ->
    `trainer.accumulate_grad_batches`; rank, alpha -> `method.rank`, `method.alpha`;
    resolution -> `data.resolution`; advanced: any other overrides, as on the command line."""

    method: str = "dreambooth_lora"
    data_source: str = "uploads"
    data_path: str = ""  # the image folder (uploads: the workspace's upload folder)
    instance_prompt: str = "a sks scribble"
    token: str = "sks"
    class_prompt: str = "a scribble"
    prior_weight: float = 1.0
    num_class_images: int = 0  # 0: no prior preservation (class images cost base-model time)
    preview_prompt: str = "a sks scribble"
    preview_negative: str = "blurry, low quality"
    preview_every: int = 50
    preview_seed: int = 0
    steps: int = 400
    lr: float = 1e-4
    batch_size: int = 1
    accumulation: int = 1
    rank: int = 4
    alpha: float = 4.0
    resolution: int = 512
    advanced: str = ""


PRESETS = {  # name -> the fields it sets (the rest stay as they are)
    "scribble (paper recipe)": dict(
        method="lora", data_source="quickdraw", preview_prompt="a scribble of apple",
        steps=4410, lr=1e-4, batch_size=8, accumulation=4, rank=4, alpha=4.0, resolution=512,
        preview_every=500, advanced="+experiment=scribble",
    ),
    "DreamBooth subject (4 images)": dict(
        method="dreambooth_lora", data_source="uploads", instance_prompt="a photo of sks dog",
        token="sks", class_prompt="a photo of a dog", num_class_images=100, prior_weight=1.0,
        preview_prompt="a photo of sks dog in a bucket", steps=400, lr=1e-4, batch_size=1,
        accumulation=1, rank=4, alpha=4.0, resolution=512, preview_every=50, advanced="",
    ),
    "style (caption folder)": dict(
        method="lora", data_source="folder", preview_prompt="a city street, vgh style",
        steps=2500, lr=1e-4, batch_size=4, accumulation=1, rank=4, alpha=4.0, resolution=512,
        preview_every=500, advanced="+experiment=style",
    ),
}  # fmt: skip


def quote(value: str) -> str:
    """A string as a Hydra override value: a plain path or word as it is, anything else
    quoted, so spaces, commas and brackets stay text (Hydra escapes only quotes and the
    backslashes before them)."""
    if re.fullmatch(r"[A-Za-z_/.~][\w./~-]*", value) and value.lower() not in YAML_WORDS:
        return value
    return "'" + re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'") + "'"


def shell_quote(arg: str) -> str:
    """Quote for a POSIX shell, readably: "key='a b'" rather than shlex's '"'"' chains."""
    # plain: no [ ] (globs in bash, errors in zsh), no leading ~ (a home directory)
    if re.fullmatch(r"[\w./:=+~,-]+", arg) and not arg.startswith("~"):
        return arg
    if not re.search(r'["$`\\!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def _int(form: TrainForm, name: str, low: int, high: int | None = None) -> int:
    value = getattr(form, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FormError(name, f"{value!r} is not a number") from None
    if number != int(number) or number < low or (high is not None and number > high):
        where = f"from {low} to {high}" if high is not None else f">= {low}"
        raise FormError(name, f"{value!r} must be a whole number {where}")
    return int(number)


def _float(form: TrainForm, name: str, low: float, high: float, low_open: bool = False) -> float:
    value = getattr(form, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FormError(name, f"{value!r} is not a number") from None
    if not (low < number if low_open else low <= number) or number > high:
        raise FormError(name, f"{value!r} must be in {'(' if low_open else '['}{low}, {high}]")
    return number


def _text(form: TrainForm, name: str) -> str:
    value = str(getattr(form, name) or "").strip()
    if not value:
        raise FormError(name, "is empty")
    return value


def advanced_overrides(text: str) -> list[str]:
    """The Advanced field: overrides as typed on a command line (shell quoting allowed)."""
    try:
        items = shlex.split(text or "")
    except ValueError as e:
        raise FormError("advanced", f"cannot split {text!r}: {e}") from None
    parser = OverridesParser.create()
    for item in items:
        try:
            parser.parse_overrides([item])
        except Exception as e:  # Hydra's grammar errors name the offending text
            raise FormError("advanced", f"{item!r} is not a Hydra override: {e}") from None
    return items


def to_overrides(form: TrainForm) -> list[str]:
    """The overrides for `train.py` (without the model and run folder, which the app adds)."""
    method = form.method if form.method in METHODS.values() else METHODS.get(form.method)
    if method is None:
        raise FormError("method", f"{form.method!r} must be one of {list(METHODS)}")
    if form.data_source not in DATA_SOURCES:
        raise FormError("data_source", f"{form.data_source!r} must be one of {DATA_SOURCES}")
    out = [f"method={method}"]
    if form.data_source == "quickdraw":
        out.append("data=quickdraw")
    else:
        path = _text(form, "data_path")
        instance = _text(form, "instance_prompt")
        if method == "dreambooth_lora":
            out += ["data=dreambooth", f"data.instance_dir={quote(path)}"]
            out.append(f"data.instance_prompt={quote(instance)}")
            n = _int(form, "num_class_images", 0)
            if n:
                out.append(f"data.class_prompt={quote(_text(form, 'class_prompt'))}")
            out.append(f"data.num_class_images={n}")
            out.append(f"method.prior_loss_weight={_float(form, 'prior_weight', 0.0, 100.0)}")
        else:  # uploads carry a .txt caption each (the instance prompt unless edited)
            source = "txt" if form.data_source == "uploads" else "auto"
            out += ["data=caption_jsonl", f"data.path={quote(path)}"]
            out.append(f"data.caption_source={source}")
    if method == "textual_inversion":
        token = _text(form, "token")
        if form.data_source != "quickdraw" and token not in form.instance_prompt:
            raise FormError("instance_prompt", f"must contain the token {token!r}")
        out.append(f"method.placeholder={quote(token)}")
    else:
        out.append(f"method.rank={_int(form, 'rank', 1, 128)}")
        out.append(f"method.alpha={_float(form, 'alpha', 0.0, 1024.0, low_open=True)}")
    steps = _int(form, "steps", 1, 10_000_000)
    out += [f"trainer.max_steps={steps}", "trainer.max_epochs=-1"]
    out.append(f"trainer.log_every_n_steps={max(1, min(10, steps // 100))}")  # a loss curve
    out.append(f"trainer.accumulate_grad_batches={_int(form, 'accumulation', 1, 1024)}")
    out.append(f"optim.lr={_float(form, 'lr', 0.0, 1.0, low_open=True)}")
    out.append(f"data.batch_size={_int(form, 'batch_size', 1, 4096)}")
    resolution = _int(form, "resolution", 8, 4096)
    if resolution % 8:
        raise FormError("resolution", f"{resolution} must be a multiple of 8 (the VAE's factor)")
    out.append(f"data.resolution={resolution}")
    out.append(f"callbacks.preview.prompts=[{quote(_text(form, 'preview_prompt'))}]")
    out.append(f"callbacks.preview.negative_prompt={quote(form.preview_negative or '')}")
    out.append(f"callbacks.preview.every_n_steps={_int(form, 'preview_every', 0)}")
    out.append(f"callbacks.preview.seeds=[{_int(form, 'preview_seed', 0, 2**32 - 1)}]")
    return out + UI_OVERRIDES + advanced_overrides(form.advanced)


def form_from_values(values: dict) -> TrainForm:
    names = {f.name for f in dataclasses.fields(TrainForm)}
    return TrainForm(**{k: v for k, v in values.items() if k in names})


def check_overrides(overrides: list[str]) -> None:
    """Compose `conf/train.yaml` with the overrides as train.py will: an unknown key, option
    or malformed value is refused now, naming it (as field "advanced": the form's own keys
    are known to exist)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            compose("train", overrides=overrides)
    except Exception as e:  # Hydra's ConfigCompositionException, OverrideParseException...
        raise FormError("advanced", f"{type(e).__name__}: {e}") from None
    finally:
        GlobalHydra.instance().clear()


def command(overrides: list[str]) -> str:
    """The shell command the UI runs, to copy and run by hand."""
    return "python train.py " + " ".join(shell_quote(o) for o in overrides)
