"""peft options of lora/locon: DoRA (and its kohya `dora_scale` export), rsLoRA, per-layer
ranks (rank_pattern, kohya block_dims), and the refusals of options a method lacks."""

import pytest
import torch
from conftest import unet_out
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import sdft.models
from sdft.adapters import LoConMethod, LoHaMethod, LoRAMethod
from sdft.adapters.base import block_patterns
from sdft.adapters.load import load_adapter, merge_adapter, read_adapter
from sdft.models import build_random_pipeline
from sdft.train import run

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def trained(method) -> StableDiffusionPipeline:
    """The tiny pipeline with `method`'s adapter, its factors and magnitudes moved off init."""
    pipe = build_random_pipeline("tiny")
    method.apply(pipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]:
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


def lora_layers(unet) -> dict[str, LoraLayer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def test_rslora_scales_by_alpha_over_sqrt_rank():
    for rslora, expected in ((False, 8 / 16), (True, 8 / 4)):
        pipe = build_random_pipeline("tiny")
        LoRAMethod(rank=16, alpha=8, use_rslora=rslora).apply(pipe)
        scalings = {m.scaling["default"] for m in lora_layers(pipe.unet).values()}
        assert scalings == {expected}


@pytest.mark.parametrize("method_cls", [LoRAMethod, LoConMethod])
def test_dora_files_reproduce_the_trained_unet(method_cls, tmp_path):
    method = method_cls(rank=4, use_dora=True, output_name="dora")
    pipe = trained(method)
    mags = {n: m.lora_magnitude_vector["default"].weight for n, m in lora_layers(pipe.unet).items()}
    assert mags and all(m.requires_grad for m in mags.values())  # DoRA trains the magnitudes
    files = method.save(pipe, tmp_path)
    # the diffusers file loads in diffusers as a DoRA adapter: same output
    fresh = build_random_pipeline("tiny")
    assert not torch.allclose(unet_out(fresh.unet), unet_out(pipe.unet), atol=1e-4)
    fresh.load_lora_weights(tmp_path, weight_name=DIFFUSERS_FILE)
    torch.testing.assert_close(unet_out(fresh.unet), unet_out(pipe.unet), atol=1e-5, rtol=1e-4)
    # the kohya file stores each magnitude as `dora_scale`, (out, 1[, 1, 1]) (LyCORIS'
    # output-axis form, read by ComfyUI): W' = dora_scale * (W + s up down) / ||.||_row
    kohya = load_file(tmp_path / "dora.safetensors")
    assert files[-1] == tmp_path / "dora.safetensors"
    for name, layer in lora_layers(pipe.unet).items():
        key = "lora_unet_" + name.replace(".", "_")
        scale = kohya[f"{key}.dora_scale"]
        w0 = layer.get_base_layer().weight.detach()
        assert scale.shape == (w0.shape[0],) + (1,) * (w0.dim() - 1)
        torch.testing.assert_close(scale.flatten(), mags[name].detach().flatten())
    # one layer rebuilt from the kohya file alone equals peft's merged DoRA weight
    name, layer = next((n, m) for n, m in lora_layers(pipe.unet).items() if n.endswith("to_q"))
    key = "lora_unet_" + name.replace(".", "_")
    w0 = layer.get_base_layer().weight.detach().clone()
    s = kohya[f"{key}.alpha"] / kohya[f"{key}.lora_down.weight"].shape[0]
    w = w0 + s * kohya[f"{key}.lora_up.weight"] @ kohya[f"{key}.lora_down.weight"]
    rebuilt = kohya[f"{key}.dora_scale"] * w / w.norm(dim=1, keepdim=True)
    layer.merge()
    merged = layer.get_base_layer().weight.detach()
    torch.testing.assert_close(rebuilt, merged, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method_cls", [LoRAMethod, LoConMethod])
def test_dora_kohya_file_loads_back_into_sdft_as_dora(method_cls, tmp_path):
    """diffusers drops `dora_scale` from SD1.x kohya files; sdft's loader (generate.py,
    evaluate.py, merging, init_weights) reads it as DoRA."""
    pipe = trained(method_cls(rank=4, use_dora=True, output_name="dora"))
    file = method_cls(rank=4, use_dora=True, output_name="dora").save(pipe, tmp_path)[-1]
    adapter = read_adapter(file, build_random_pipeline("tiny"))
    assert adapter.dora_layers == len(adapter.layers) > 0
    for scale in (1.0, 0.5):
        loaded = build_random_pipeline("tiny")
        load_adapter(loaded, file, "dora")
        assert any(m.use_dora.get("dora") for m in lora_layers(loaded.unet).values())
        want = scaled_out(pipe.unet, scale)
        torch.testing.assert_close(scaled_out(loaded.unet, scale), want, atol=2e-5, rtol=1e-4)
        merged = build_random_pipeline("tiny")
        merge_adapter(merged, file, scale)
        assert not lora_layers(merged.unet)
        torch.testing.assert_close(scaled_out(merged.unet, 1.0), want, atol=2e-5, rtol=1e-4)
    # and as the start of a DoRA run: the same output before any step
    start = build_random_pipeline("tiny")
    method_cls(rank=4, use_dora=True, init_weights=str(file)).apply(start)
    torch.testing.assert_close(unet_out(start.unet), unet_out(pipe.unet), atol=2e-5, rtol=1e-4)


def test_block_dims_give_kohya_blocks_their_ranks_and_rank_pattern_wins():
    dims = list(range(1, 26))  # block k gets rank k + 1
    to_k = r"up_blocks\.1\.attentions\.0\..*attn2\.to_k"
    pipe = build_random_pipeline("tiny")
    method = LoRAMethod(rank=4, block_dims=dims, block_alphas=[2.0] * 25, rank_pattern={to_k: 30})
    method.apply(pipe)
    ranks = {n: m.r["default"] for n, m in lora_layers(pipe.unet).items()}
    alpha = {n: m.lora_alpha["default"] for n, m in lora_layers(pipe.unet).items()}
    prefix = "transformer_blocks.0.attn1.to_q"
    assert ranks[f"down_blocks.0.attentions.0.{prefix}"] == 2  # IN01
    assert ranks[f"mid_block.attentions.0.{prefix}"] == 13  # MID
    assert ranks[f"up_blocks.1.attentions.0.{prefix}"] == 17  # OUT03 = up_blocks.1, j=0
    assert ranks[f"up_blocks.1.attentions.1.{prefix}"] == 18  # OUT04
    assert ranks["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == 30
    assert alpha[f"mid_block.attentions.0.{prefix}"] == 2.0
    with pytest.raises(ValueError, match="method.block_dims has 3 values: give 25"):
        block_patterns([4, 4, 4], None)


def test_locon_block_dims_leave_the_3x3_convs_at_conv_rank():
    pipe = build_random_pipeline("tiny")
    LoConMethod(rank=4, conv_rank=3, block_dims=[8] * 25).apply(pipe)
    ranks = {n: m.r["default"] for n, m in lora_layers(pipe.unet).items()}
    assert ranks["up_blocks.1.resnets.0.conv1"] == 3
    assert ranks["up_blocks.1.resnets.0.conv_shortcut"] == 8  # 1x1: a block dim, as kohya
    assert ranks["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"] == 8


def test_dora_with_loha_or_lokr_stops_before_the_model_loads(make_cfg, monkeypatch):
    with pytest.raises(ValueError, match="method.use_dora=true.*method=loha has no DoRA"):
        LoHaMethod(use_dora=True)

    def no_model(**_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sdft.models, "build_random_pipeline", no_model)
    for method in ("loha", "lokr"):
        cfg = make_cfg(f"method={method}", run=method)
        OmegaConf.set_struct(cfg, False)
        cfg.method.use_dora = True  # what `+method.use_dora=true` gives
        with pytest.raises(ValueError, match=f"use_dora=true.*method={method} has no DoRA"):
            run(cfg)


# -- PiSSA / OLoRA: peft's principal-part init, the base weights left as they are ---------
def scaled_out(unet, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(
            x, torch.tensor([10, 500]), encoder_hidden_states=text,
            cross_attention_kwargs={"scale": scale},
        ).sample  # fmt: skip


def text_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["a scribble of a cat"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids)[0]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_start_from_peft_factors_at_the_base_output(init):
    base = build_random_pipeline("tiny")
    pipe = build_random_pipeline("tiny")
    LoRAMethod(rank=4, init=init).apply(pipe)
    # the factors are peft's own init_lora_weights=pissa|olora (which rewrites the base)
    peft_pipe = build_random_pipeline("tiny")
    target = LoRAMethod(rank=4).target_regex
    peft_pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=init, target_modules=target)
    )
    ours, theirs = lora_layers(pipe.unet), lora_layers(peft_pipe.unet)
    assert ours.keys() == theirs.keys() and ours
    for name, layer in ours.items():
        for f in ("lora_A", "lora_B"):
            a, b = getattr(layer, f)["default"].weight, getattr(theirs[name], f)["default"].weight
            torch.testing.assert_close(a, b)
            assert a.abs().max() > 0  # not LoRA's zero B
        # the base weight is untouched: W0, where peft keeps W0 - s B0 A0
        w0 = base.unet.get_submodule(name).weight
        torch.testing.assert_close(layer.get_base_layer().weight, w0, atol=0, rtol=0)
    # step 0 is the base model, and so is LoRA scale 0 at any step
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(base.unet), atol=1e-5, rtol=1e-4)
    moved = trained(LoRAMethod(rank=4, init=init))
    assert not torch.allclose(scaled_out(moved.unet, 1.0), scaled_out(base.unet, 1.0), atol=1e-3)
    torch.testing.assert_close(
        scaled_out(moved.unet, 0.0), scaled_out(base.unet, 1.0), atol=1e-5, rtol=1e-4
    )
    # only the trained adapter trains: the `initial` one that cancels B0 A0 stays frozen
    names = [n for n, p in moved.unet.named_parameters() if p.requires_grad]
    assert names and all(".default." in n for n in names)


@pytest.mark.parametrize(
    "method",
    [
        LoRAMethod(rank=4, init="pissa", output_name="f"),
        LoRAMethod(rank=4, alpha=8, init="olora", use_rslora=True, output_name="f"),
        LoConMethod(rank=4, init="pissa", output_name="f"),
        LoRAMethod(rank=4, init="pissa", train_text_encoder=True, output_name="f"),
    ],
    ids=["lora-pissa", "lora-olora-rslora", "locon-pissa", "lora-pissa-text-encoder"],
)
def test_principal_init_files_are_plain_loras_on_the_original_base(method, tmp_path):
    pipe = trained(method)
    method.save(pipe, tmp_path)
    for name in (DIFFUSERS_FILE, "f.safetensors"):
        for scale in (1.0, 0.5):
            fresh = build_random_pipeline("tiny")
            fresh.load_lora_weights(tmp_path, weight_name=name)
            torch.testing.assert_close(
                scaled_out(fresh.unet, scale), scaled_out(pipe.unet, scale), atol=2e-5, rtol=1e-4
            )
            if method.train_text_encoder and scale == 1.0:
                torch.testing.assert_close(text_out(fresh), text_out(pipe), atol=2e-5, rtol=1e-4)
    # rank 2r: [A; A0] and [B, -B0] (peft's path_initial_model_for_weight_conversion form)
    kohya = load_file(tmp_path / "f.safetensors")
    downs = [v for k, v in kohya.items() if k.endswith("to_q.lora_down.weight")]
    assert downs and {d.shape[0] for d in downs} == {8}


def test_principal_init_resumes_exactly(make_cfg):
    common = ["method.init=pissa", "callbacks.checkpoint.every_n_train_steps=2", "optim.lr=1e-2"]
    full = run(make_cfg(*common, run="full"))["output_dir"]
    ckpt = full / "checkpoints" / "step_000002.ckpt"
    resumed = run(make_cfg(*common, f"ckpt_path={ckpt}", run="resumed"))["output_dir"]
    a, b = load_file(full / DIFFUSERS_FILE), load_file(resumed / DIFFUSERS_FILE)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    # a checkpoint of a PiSSA run resumes only as one: its factors are relative to B0 A0
    with pytest.raises(ValueError, match="init"):
        run(make_cfg("callbacks.checkpoint.every_n_train_steps=2", f"ckpt_path={ckpt}", run="x"))


@pytest.mark.parametrize("other", ["method.use_dora=true", "method.init_weights=README.md"])
def test_principal_init_refuses_what_it_cannot_combine_with(make_cfg, other):
    with pytest.raises(ValueError, match="method.init=pissa starts from the base"):
        run(make_cfg("method.init=pissa", other))
