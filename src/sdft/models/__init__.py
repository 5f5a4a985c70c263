from sdft.models.pipeline import build_random_pipeline, load_pipeline, sd_noise_scheduler
from sdft.models.tokenizer import clip_tokenizer

__all__ = ["build_random_pipeline", "clip_tokenizer", "load_pipeline", "sd_noise_scheduler"]
