"""Base pipelines: a diffusers SD1.x/2.x repo (hub id or local dir), or one of the same
architecture built in code with random weights (`tiny` for CPU tests, `sd15` shapes for
GPU benchmarks)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sdft.models.tokenizer import clip_tokenizer

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# name -> (unet kwargs, vae kwargs, text-encoder kwargs). `sd15` is SD1.5's exact shapes
# (860M UNet); `tiny` keeps every part of the architecture (cross-attention, VAE, CLIP
# text model) at a size that trains in seconds on a CPU.
ARCHS: dict[str, tuple[dict, dict, dict]] = {
    "sd15": (
        dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        dict(
            sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        ),
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        ),
    ),
    "tiny": (
        dict(
            sample_size=16,  # 64 px images / VAE factor 4
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        dict(
            sample_size=64,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
        ),
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        ),
    ),
}


def sd_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD1.x's training schedule (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_noise_schedule(prediction_type: str | None, zero_terminal_snr: bool) -> None:
    """Raise on a parameterisation sdft cannot train (null: the model's, checked later)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"model.prediction_type={prediction_type!r} must be one of {PREDICTION_TYPES}"
        )
    if zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError(
            "model.zero_terminal_snr=true needs model.prediction_type=v_prediction: at the "
            "last timestep the input is pure noise, so there is no noise left to predict"
        )


def set_noise_schedule(
    pipe: StableDiffusionPipeline, prediction_type: str | None, zero_terminal_snr: bool
) -> None:
    """Give `pipe` the parameterisation it is trained in (null: the model's own) and, with
    `zero_terminal_snr`, betas rescaled so the last timestep is pure noise, sampled from
    there (trailing spacing; Lin et al. 2024). Training, previews, evaluation and
    generation all build their schedulers from this config, so they match."""
    kind = prediction_type or pipe.scheduler.config.prediction_type
    check_noise_schedule(kind, zero_terminal_snr)
    if zero_terminal_snr:  # DDIM: the paper's sampler, and it reads both options
        options = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, **options, prediction_type=kind
        )
    elif kind != pipe.scheduler.config.prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=kind
        )


def training_schedule(
    pretrained: str | None = None,
    revision: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
    **_other_model_keys,
) -> DDPMScheduler | None:
    """The noise schedule a `model` config trains with, read without loading any weights, so
    settings that depend on it are checked first; None when the hub cannot be reached."""
    check_noise_schedule(prediction_type, zero_terminal_snr)
    if pretrained is None:  # built in code
        config = sd_noise_scheduler().config
    else:
        local = _looks_like_path(pretrained)
        source = str(Path(pretrained).expanduser()) if local else pretrained
        try:
            config = DDPMScheduler.load_config(source, subfolder="scheduler", revision=revision)
        except OSError:  # load_pipeline says what is wrong
            return None
    options = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    options = options if zero_terminal_snr else {}
    if prediction_type:
        options["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(config, **options)


def build_random_pipeline(
    arch: str = "tiny",
    seed: int = 0,
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
) -> StableDiffusionPipeline:
    """An SD pipeline of architecture `arch` with seeded random weights, built offline."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is not one of {sorted(ARCHS)}")
    unet_kw, vae_kw, text_kw = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_kw)
        vae = AutoencoderKL(**vae_kw)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                **text_kw,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=copy.deepcopy(clip_tokenizer()),  # its own: textual inversion adds tokens
        unet=unet,
        scheduler=sd_noise_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    set_noise_schedule(pipe, prediction_type, zero_terminal_snr)
    pipe.register_to_config(_name_or_path=f"sdft-random-{arch}-seed{seed}")
    return pipe


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).exists()


def check_sd_pipeline_dir(path: Path) -> None:
    """Raise a clear error unless `path` is a diffusers Stable Diffusion pipeline folder."""
    if not path.exists():
        raise FileNotFoundError(f"model.pretrained={str(path)!r}: no such directory")
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"model.pretrained={str(path)!r} is not a diffusers pipeline: {index.name} is missing"
        )
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from e
    cls = str(meta.get("_class_name", ""))
    missing = [c for c in SD_COMPONENTS if c not in meta]
    if "StableDiffusion" not in cls or "XL" in cls or missing:
        raise ValueError(
            f"model.pretrained={str(path)!r} is a {cls or 'unknown'} pipeline, not an SD1.x/2.x "
            f"StableDiffusionPipeline" + (f" (missing components: {missing})" if missing else "")
        )


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
) -> StableDiffusionPipeline:
    """Load an SD1.x/2.x pipeline from a hub id or a local diffusers folder (no safety
    checker), with the noise schedule `set_noise_schedule` gives it."""
    check_noise_schedule(prediction_type, zero_terminal_snr)  # before the download
    if _looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        check_sd_pipeline_dir(path)
        source = str(path)
    else:
        source = pretrained
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            revision=revision,
            variant=variant,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except OSError as e:
        raise OSError(
            f"model.pretrained={pretrained!r} could not be loaded: not in the local Hugging Face "
            f"cache and the hub is unreachable (or the id is wrong). Use model=tiny offline. ({e})"
        ) from e
    set_noise_schedule(pipe, prediction_type, zero_terminal_snr)
    pipe.register_to_config(_name_or_path=pretrained)
    return pipe
