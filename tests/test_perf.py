"""The fast path changes how a step runs, not what it computes."""

import inspect
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
import yaml
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

from sdft.models import build_random_pipeline
from sdft.module import AdapterFineTuner
from sdft.perf import TORCH_ORDER, FastPath
from sdft.train import merge_accumulation


def module_and_batch(cfg):
    torch.manual_seed(0)  # the same LoRA init in both modules
    module = AdapterFineTuner(
        build_random_pipeline("tiny"), hydra.utils.instantiate(cfg.method), None, None
    )
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the LoRA path matters
        for n, p in module.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    items = [dm.dataset[(i, i % 2 == 0)] for i in range(4)]
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
    }
    return module, batch


def loss_and_grads(module, batch):
    module.zero_grad()
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(7))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_fast_path_gives_the_same_loss_and_gradients_as_the_plain_path(make_cfg):
    cfg = make_cfg()
    plain, batch = module_and_batch(cfg)
    fast, _ = module_and_batch(cfg)
    FastPath(compile_unet=True, channels_last=True, force=True).apply(fast.unet, fast.device)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    ref_loss, ref_grads = loss_and_grads(plain, batch)
    start = time.perf_counter()
    fast_loss, fast_grads = loss_and_grads(fast, batch)
    assert time.perf_counter() - start < 300, "compile took unreasonably long"
    # fp32 on the CPU; compiled kernels only reassociate sums: relative error well under 1e-4
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys() and ref_grads
    for n in ref_grads:
        torch.testing.assert_close(fast_grads[n], ref_grads[n], rtol=1e-3, atol=1e-6)
    # names (hence checkpoints) are unchanged by the in-place compile
    assert set(fast.state_dict()) == set(plain.state_dict())


def test_regional_compile_compiles_only_the_blocks_and_computes_the_same(make_cfg, tmp_path):
    cfg = make_cfg()
    plain, batch = module_and_batch(cfg)
    fast, _ = module_and_batch(cfg)
    regions = ["UNetMidBlock2DCrossAttn"]  # one block: a short compile on the CPU
    path = FastPath(compile_regions=regions, cache_dir=str(tmp_path / "cache"), force=True)
    path.apply(fast.unet, fast.device)
    compiled = [type(m).__name__ for m in fast.unet.modules() if m._compiled_call_impl]
    assert fast.unet._compiled_call_impl is None and set(compiled) == set(regions)
    ref_loss, ref_grads = loss_and_grads(plain, batch)
    fast_loss, fast_grads = loss_and_grads(fast, batch)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(fast_grads[n], ref_grads[n], rtol=1e-3, atol=1e-6)
    # the kernels went to perf.cache_dir, for the next run; restore puts torch's variables back
    assert any((tmp_path / "cache" / "inductor").rglob("*.py"))
    path.restore()
    assert str(tmp_path) not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    with pytest.raises(ValueError, match=r"perf.compile_regions: the UNet has no \['Block'\]"):
        FastPath(compile_regions=["Block"], force=True).apply(fast.unet, fast.device)


def test_other_batch_sizes_run_eagerly_without_a_second_compile(make_cfg):
    cfg = make_cfg()
    plain, batch = module_and_batch(cfg)
    fast, _ = module_and_batch(cfg)
    fast.fast_path = FastPath(compile_unet=True, channels_last=True, force=True)  # as above: cached
    fast.fast_path.apply(fast.unet, fast.device)
    with fast.compile_stance(4):  # the training micro-batch: compiled
        loss_and_grads(fast, batch)
    graphs = counters["stats"]["unique_graphs"]
    last = {"pixel_values": batch["pixel_values"][:3], "caption": batch["caption"][:3]}
    with fast.compile_stance(3):  # the epoch's last, smaller batch: eager, no recompile
        fast_loss, fast_grads = loss_and_grads(fast, last)
    assert counters["stats"]["unique_graphs"] == graphs
    ref_loss, ref_grads = loss_and_grads(plain, last)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(fast_grads[n], ref_grads[n], rtol=1e-3, atol=1e-6)


def test_merge_accumulation_keeps_the_effective_batch_and_says_so(make_cfg, caplog):
    cfg = make_cfg("data.batch_size=8", "trainer.accumulate_grad_batches=4")
    with caplog.at_level(logging.WARNING):
        merge_accumulation(cfg, FastPath(merge_accumulation=True, force=True))
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (32, 1)
    said = (
        "data.batch_size=8 x trainer.accumulate_grad_batches=4 runs as "
        "data.batch_size=32 x trainer.accumulate_grad_batches=1"
    )
    assert cfg.merged_accumulation == said and said in caplog.text  # in config.yaml and log
    cfg = make_cfg("data.batch_size=8", "trainer.accumulate_grad_batches=4")
    merge_accumulation(cfg, FastPath(merge_accumulation=True))  # CPU, not forced: unchanged
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (8, 4)


def test_profiler_kernels_writes_a_table_of_the_profiled_steps(make_cfg, tmp_path):
    from sdft.train import run

    cfg = make_cfg(
        "profiler=kernels",
        "profiler.schedule.skip_first=1",
        "profiler.schedule.warmup=1",
        "profiler.schedule.active=2",
        "callbacks.preview=null",
        "perf.force=true",  # the compiled UNet, as on the GPU
    )
    graphs = counters["stats"]["unique_graphs"]
    run(cfg)
    table = (tmp_path / "run" / "fit-profile.txt").read_text()
    assert "aten::convolution" in table and "Self CPU" in table
    # the profiler must not split the compiled UNet (per-module hooks made ~170 graphs)
    assert counters["stats"]["unique_graphs"] - graphs <= 1


def test_attention_and_cudnn_options_compute_the_same_in_forward_and_backward(make_cfg):
    cfg = make_cfg()
    plain, batch = module_and_batch(cfg)
    fast, _ = module_and_batch(cfg)
    assert torch._C._get_sdp_priority_order() == [int(b) for b in TORCH_ORDER]
    fast_path = FastPath(
        compile_unet=False,
        gradient_checkpointing=True,
        attention="cudnn",
        cudnn_benchmark=True,
        force=True,
    )
    try:
        # checkpointing recomputes the forward inside backward: the same kernel must run there
        fast_path.apply(fast.unet, fast.device)
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        assert torch.backends.cudnn.benchmark
        # on the CPU cuDNN cannot run: SDPA falls through to the next kernel, same numbers
        fast_loss, fast_grads = loss_and_grads(fast, batch)
    finally:
        fast_path.restore()
        torch.backends.cudnn.benchmark = False
    assert torch._C._get_sdp_priority_order() == [int(b) for b in TORCH_ORDER]
    ref_loss, ref_grads = loss_and_grads(plain, batch)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(fast_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="perf.attention: 'cudn'"):
        FastPath(attention="cudn")


def test_skipping_the_adapter_input_cast_under_autocast_changes_no_number(make_cfg):
    cfg = make_cfg()
    modules = [module_and_batch(cfg) for _ in range(2)]
    batch = modules[0][1]
    results = []
    for (module, _), cast in zip(modules, (True, False), strict=True):
        for p in module.unet.parameters():  # frozen weights in bf16, the adapter fp32: setup
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        fast_path = FastPath(compile_unet=False, adapter_input_cast=cast, force=True)
        fast_path.apply(module.unet, module.device, mixed_precision=True)
        flags = {m.cast_input_dtype_enabled for m in module.unet.modules() if hasattr(m, "lora_A")}
        assert flags == {cast}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(module, batch))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.equal(loss, ref_loss)  # bf16 -> fp32 -> bf16 is exact: the same bits
    for n in ref_grads:
        assert torch.equal(grads[n], ref_grads[n]), n


def test_inductor_settings_are_checked_by_name_and_set_for_the_compile(make_cfg):
    from torch._inductor import config

    with pytest.raises(ValueError, match="perf.inductor.conv_1x1_as_matmul"):
        FastPath(inductor={"conv_1x1_as_matmul": True})
    module, _ = module_and_batch(make_cfg())
    with config.patch(conv_1x1_as_mm=False):
        FastPath(inductor={"conv_1x1_as_mm": True}, force=True).apply(module.unet, module.device)
        assert config.conv_1x1_as_mm


def test_fast_path_defaults_are_conf_perf_default():
    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/perf/default.yaml").read_text())
    del conf["_target_"]
    defaults = {k: v.default for k, v in inspect.signature(FastPath).parameters.items()}
    assert defaults == {**conf, "inductor": None}  # None: no settings, as {}
    assert conf["inductor"] == {}


def test_fast_path_restores_the_process_wide_switches_at_teardown(make_cfg, caplog):
    from torch._inductor import config

    module, _ = module_and_batch(make_cfg())
    device = SimpleNamespace(root_device=torch.device("cpu"))
    trainer = SimpleNamespace(precision="32-true", strategy=device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    before = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        config.conv_1x1_as_mm,
        torch._C._get_sdp_priority_order(),
    )
    fast_path = FastPath(
        tf32=True,
        cudnn_benchmark=True,
        attention="efficient",
        inductor={"conv_1x1_as_mm": not before[3]},
        force=True,
    )
    fast_path.setup(trainer, module, "fit")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark and config.conv_1x1_as_mm != before[3]
    assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.EFFICIENT_ATTENTION)
    # the first compiled step's time is logged (compile included)
    with caplog.at_level(logging.INFO, logger="sdft.perf"):
        fast_path.on_train_batch_start(trainer)
        fast_path.on_train_batch_end(trainer, module)
        fast_path.on_train_batch_end(trainer, module)  # once
    assert caplog.text.count("the first compiled step took") == 1
    fast_path.teardown(trainer, module, "fit")
    after = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        config.conv_1x1_as_mm,
        torch._C._get_sdp_priority_order(),
    )
    assert after == before


def test_sampling_during_fit_puts_each_submodule_back_in_its_own_mode():
    """module.train() after a preview or validation would flip the frozen (eval-mode) UNet to
    training mode: a new graph for the compiled UNet's guards, a recompile every time."""
    from sdft.module import eval_modes

    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    m.train()
    m[0].eval()  # the frozen UNet, in eval mode since it was loaded
    with eval_modes(m):
        assert not any(x.training for x in m.modules())
    assert [x.training for x in m.modules()] == [True, False, True]
