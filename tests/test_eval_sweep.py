"""The scale-sweep evaluator: determinism, scale 0 = the base model, DDP sharding."""

import copy
import threading

import pytest
import torch
from conftest import SAMPLE
from diffusers import DPMSolverMultistepScheduler

from sdft.adapters import LoRAMethod
from sdft.data.quickdraw import QuickDrawDataModule
from sdft.eval.scale_sweep import ScaleSweepEvaluator
from sdft.models import build_random_pipeline

PROMPTS = ["a scribble of apple", "a scribble of cat", "a scribble of fish"]


def pipeline(lora: bool):
    """The tiny base pipeline with DPM++ 2M; with a LoRA whose B is random, not zero, so
    that the adapter changes the output."""
    pipe = build_random_pipeline("tiny")
    if lora:
        LoRAMethod().apply(pipe)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluator(**kw) -> ScaleSweepEvaluator:
    args = dict(
        scales=[0.0, 1.0],
        num_prompts=2,
        seeds=[0, 1],
        num_inference_steps=2,
        resolution=64,
        batch_size=3,  # 2 categories x 2 groups x 2 seeds = 8 images a scale: 3 calls
        clip_score_model="random:tiny",
        image_model="random:tiny",
        grid_rows=2,
    )
    return ScaleSweepEvaluator(**(args | kw))


@pytest.fixture(scope="module")
def lora_pipe():
    return pipeline(lora=True)


@pytest.fixture(scope="module")
def datamodule():
    dm = QuickDrawDataModule(str(SAMPLE), num_categories=8, per_category=3, resolution=64)
    dm.setup()
    return dm


def test_scale_zero_is_the_base_pipeline_and_scale_one_is_not(lora_pipe):
    ev = evaluator()
    seeds = [0, 1, 2]
    base = ev.generate(pipeline(lora=False), PROMPTS, seeds, scale=1.0)
    assert base.shape == (3, 3, 64, 64) and base.dtype == torch.uint8
    assert torch.equal(ev.generate(lora_pipe, PROMPTS, seeds, scale=0.0), base)
    full = ev.generate(lora_pipe, PROMPTS, seeds, scale=1.0)
    assert (full.int() - base.int()).abs().float().mean() > 1.0
    # the call's scale leaves no trace: scale 0 again is the base again
    assert torch.equal(ev.generate(lora_pipe, PROMPTS, seeds, scale=0.0), base)


def test_each_image_depends_only_on_its_prompt_and_seed(lora_pipe):
    together = evaluator(batch_size=3).generate(lora_pipe, PROMPTS, [0, 1, 2], scale=0.5)
    alone = evaluator(batch_size=1).generate(lora_pipe, PROMPTS, [0, 1, 2], scale=0.5)
    # batched float math may round a pixel differently, no more
    assert (together.int() - alone.int()).abs().max() <= 1
    assert not torch.equal(together[0], together[1])


@pytest.fixture(scope="module")
def single(lora_pipe, datamodule):
    """One sweep, in one process."""
    return evaluator().evaluate(lora_pipe, datamodule)


def test_same_seeds_give_the_same_images_and_metrics_twice(lora_pipe, datamodule, single):
    first = single
    second = evaluator().evaluate(lora_pipe, datamodule)  # fresh CLIP models, fresh references
    assert first.metrics() == second.metrics()
    for group in ("trained", "held_out"):
        assert first.grids[group].tobytes() == second.grids[group].tobytes()

    split = datamodule.split
    assert first.categories == {"trained": split["trained"][:2], "held_out": split["held_out"][:2]}
    assert first.images == 2 * 2 * 2 * 2  # scales x groups x categories x seeds
    m = first.metrics()
    names = {
        f"eval/{stem}@{s}"
        for stem in ("clip_score", "clip_score_heldout", "clip_img_cos", "clip_img_cos_heldout")
        for s in ("0.0", "1.0")
    } | {
        "eval/clip_score_reference",
        "eval/clip_score_reference_heldout",
        "eval/best_scale",
        "eval/clip_img_cos_best",
    }
    assert set(m) == names
    best = max(m["eval/clip_img_cos@0.0"], m["eval/clip_img_cos@1.0"])
    assert m["eval/clip_img_cos_best"] == best
    assert m["eval/best_scale"] in (0.0, 1.0)
    assert m["eval/clip_img_cos@0.0"] != m["eval/clip_img_cos@1.0"]  # the adapter shows
    assert all(r["n_images"] == 4 and r["n_images_heldout"] == 4 for r in first.rows)
    assert first.grids["trained"].width > 2 * 64 and first.grids["trained"].height > 2 * 64


def thread_all_gather(world: int):
    """Lightning's all_gather (ranks stacked on a new dim 0), between threads."""
    barrier, slots = threading.Barrier(world), [None] * world

    def for_rank(rank):
        def gather(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = torch.stack(list(slots))
            barrier.wait()  # all have read before anyone writes the next round
            return out

        return gather

    return for_rank


def test_ranks_share_the_work_and_gather_the_same_result(lora_pipe, datamodule):
    # one image per pipeline call on both sides: a rank's share batches differently, and
    # batched float math may round a pixel differently (see the test above)
    world, results = 2, [None, None]
    gathers = thread_all_gather(world)
    alone = evaluator(batch_size=1).evaluate(lora_pipe, datamodule)

    # as in separate processes: each rank has its own pipeline (LoRA scales are module
    # state) and its own tokenizers (a Rust tokenizer keeps per-call padding state). The
    # random CLIPs are built here, not in the threads: their seeding uses the global RNG.
    evaluators = [evaluator(batch_size=1) for _ in range(world)]
    for ev in evaluators:
        ev.load_models()
        ev.scorer.processor = copy.deepcopy(ev.scorer.processor)

    def rank_main(rank):
        pipe = copy.deepcopy(lora_pipe)
        results[rank] = evaluators[rank].evaluate(
            pipe, datamodule, rank=rank, world=world, gather=gathers(rank)
        )

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(results), "a rank failed"
    for r in results:
        assert r.images == alone.images
        for k, v in alone.metrics().items():
            assert r.metrics()[k] == pytest.approx(v, abs=1e-5), k
        assert r.grids["trained"].tobytes() == alone.grids["trained"].tobytes()
