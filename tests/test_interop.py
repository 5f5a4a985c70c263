"""The exported files against the naming rules of the tools that read them, written down here
from those tools' conventions rather than from sdft's code:

- kohya sd-scripts / A1111 / ComfyUI: a layer is `lora_unet_` + its diffusers module path with
  "." -> "_" (text encoder: `lora_te_` + the path under transformers 4's `text_model`), every
  Linear or Conv2d inside a Transformer2DModel (and, with conv layers, a ResnetBlock2D,
  Downsample2D or Upsample2D) may have one; each has `.lora_down.weight` (r, in[, k, k]),
  `.lora_up.weight` (out, r[, 1, 1]) and a scalar `.alpha`.
- LyCORIS (read by A1111, ComfyUI and LyCORIS): the same names with `.hada_w1_a` (out, r),
  `.hada_w1_b` (r, in*k*k), `.hada_w2_a`, `.hada_w2_b` (LoHa) or `.lokr_w1` | `.lokr_w1_a` +
  `.lokr_w1_b`, and `.lokr_w2` | `.lokr_w2_a` + `.lokr_w2_b` (LoKr), kron(w1, w2) the weight's
  shape, and `.alpha`.
- A1111 embeddings: one tensor (kohya: `emb_params`, (n, D)); the file name is the prompt word.
- diffusers: `text_encoder.text_model.encoder.layers.<i>.self_attn.<proj>...`.
"""

import json
import math

import pytest
import torch
from conftest import FAST, compose_cfg
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from sdft.adapters import LoHaMethod, LoKrMethod, LoRAMethod, TextualInversionMethod
from sdft.adapters.load import merge_adapter, read_adapter
from sdft.adapters.metadata import optimizer_name, scheduler_name, tag_frequency
from sdft.models import build_random_pipeline
from sdft.train import run

# the tiny UNet's four Transformer2DModels and the text encoder's two layers, by hand
ATTENTIONS = [
    "down_blocks_0_attentions_0",
    "mid_block_attentions_0",
    "up_blocks_1_attentions_0",
    "up_blocks_1_attentions_1",
]
ATTENTION_LAYERS = {
    f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}"
    for block in ATTENTIONS
    for attn in ("attn1", "attn2")
    for proj in ("to_q", "to_k", "to_v", "to_out_0")
}
TE_LAYERS = {
    f"lora_te_text_model_encoder_layers_{i}_self_attn_{proj}"
    for i in range(2)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
}
KOHYA_CONTAINERS = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
ATOL = 2e-5


def kohya_names(unet) -> dict[str, torch.Size]:
    """kohya's rule: every Linear/Conv2d inside the container blocks -> its weight shape."""
    out = {}
    for name, block in unet.named_modules():
        if type(block).__name__ in KOHYA_CONTAINERS:
            for child, m in block.named_modules():
                if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
                    out[f"lora_unet_{name}.{child}".replace(".", "_")] = m.weight.shape
    return out


def trained_like(method, pipe=None):
    """`method` applied to the tiny pipeline, every adapter tensor random (as after training)."""
    pipe = pipe or build_random_pipeline("tiny")
    method.apply(pipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe


def layers_of(path) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        out = {}
        for k in f.keys():
            name, _, suffix = k.partition(".")
            out.setdefault(name, {})[suffix] = f.get_tensor(k)
        return out


def check_lycoris_layer(kind: str, t: dict[str, torch.Tensor], shape: torch.Size) -> None:
    """One layer's tensors as A1111 / ComfyUI / LyCORIS read them, for a weight of `shape`."""
    out, flat_in = shape[0], math.prod(shape[1:])
    assert t.pop("alpha").dim() == 0
    if kind == "lora":
        assert set(t) == {"lora_down.weight", "lora_up.weight"}
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        assert down.shape == (down.shape[0], *shape[1:]) and up.shape[:2] == (out, down.shape[0])
        assert up.shape[2:] == (1, 1)[: len(shape) - 2]
    elif kind == "loha":
        assert set(t) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        r = t["hada_w1_b"].shape[0]
        for i in (1, 2):
            assert t[f"hada_w{i}_a"].shape == (out, r) and t[f"hada_w{i}_b"].shape == (r, flat_in)
    else:
        w1 = {"lokr_w1"} if "lokr_w1" in t else {"lokr_w1_a", "lokr_w1_b"}
        w2 = {"lokr_w2"} if "lokr_w2" in t else {"lokr_w2_a", "lokr_w2_b"}
        assert set(t) == w1 | w2
        w = [
            t[f"lokr_w{i}"] if f"lokr_w{i}" in t else t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"]
            for i in (1, 2)
        ]
        assert (w[0].shape[0] * w[1].shape[0], w[0].shape[1] * w[1].shape[1]) == (out, flat_in)


@pytest.mark.parametrize(
    "method,kind,convs",
    [
        (LoRAMethod(rank=2), "lora", False),
        (LoRAMethod(rank=2, conv_rank=2), "lora", True),  # LoCon
        (LoHaMethod(rank=2, conv_rank=2), "loha", True),
        (LoKrMethod(rank=2, conv_rank=2), "lokr", True),
        (LoKrMethod(rank=2, decompose_both=True), "lokr", False),
    ],
    ids=["lora", "locon", "loha", "lokr", "lokr-decompose_both"],
)
def test_kohya_and_lycoris_keys_follow_the_a1111_comfyui_lycoris_naming_rules(
    method, kind, convs, tmp_path
):
    pipe = trained_like(method)
    path = method.save(pipe, tmp_path)[-1]  # the kohya/LyCORIS file (LoRA: after diffusers)
    layers = layers_of(path)
    accepted = kohya_names(build_random_pipeline("tiny").unet)
    assert set(layers) <= set(accepted)  # every layer a name the readers know ...
    attention = {n for n in layers if "_attentions_" in n}
    assert attention == ATTENTION_LAYERS  # ... the 32 attention projections, by hand
    convs_found = {n for n in layers if "resnets" in n or "samplers" in n}
    assert bool(convs_found) == convs
    if convs:
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in convs_found
        assert "lora_unet_up_blocks_0_upsamplers_0_conv" in convs_found
    for name, tensors in layers.items():
        check_lycoris_layer(kind, dict(tensors), accepted[name])


def test_text_encoder_lora_files_use_the_text_model_names_and_load_back(tmp_path):
    method = LoRAMethod(rank=2, train_text_encoder=True, output_name="te")
    trained = trained_like(method)
    files = {p.name: p for p in method.save(trained, tmp_path)}
    kohya = layers_of(files["te.safetensors"])
    assert {n for n in kohya if n.startswith("lora_te_")} == TE_LAYERS
    assert set(kohya["lora_te_text_model_encoder_layers_1_self_attn_out_proj"]) == {
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
    }
    with safe_open(str(files["pytorch_lora_weights.safetensors"]), "pt") as f:
        te = {k for k in f.keys() if k.startswith("text_encoder.")}
    assert te == {
        f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}.lora_linear_layer.{w}.weight"
        for i in range(2)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        for w in ("down", "up")
    }

    def text(pipe):
        with torch.no_grad():
            return pipe.encode_prompt("a scribble of apple", "cpu", 1, False)[0]

    expected = text(trained)
    assert (expected - text(build_random_pipeline("tiny"))).abs().max() > 1e-3
    for f in files.values():  # diffusers reads both files with the trained text encoder
        pipe = build_random_pipeline("tiny")
        pipe.load_lora_weights(str(f), adapter_name="te")
        torch.testing.assert_close(text(pipe), expected, atol=ATOL, rtol=0)

    # files written without `text_model` (sdft before this fix, under transformers 5) read
    # as the same layers, and merge to the same text encoder
    old = {
        k.replace("lora_te_text_model_", "lora_te_"): v
        for n, parts in kohya.items()
        for s, v in parts.items()
        for k in [f"{n}.{s}"]
    }
    save_file(old, str(tmp_path / "old.safetensors"))
    canonical, legacy = (
        read_adapter(tmp_path / n, trained) for n in ("te.safetensors", "old.safetensors")
    )
    assert set(legacy.layers) == set(canonical.layers) and not legacy.unknown
    assert sum(c == "text_encoder" for c, _ in canonical.layers) == len(TE_LAYERS)
    merged = build_random_pipeline("tiny")
    merge_adapter(merged, tmp_path / "old.safetensors")
    torch.testing.assert_close(text(merged), expected, atol=ATOL, rtol=0)


def test_textual_inversion_a1111_file_is_named_after_the_placeholder(tmp_path):
    method = TextualInversionMethod(placeholder="<qd-scribble>", num_vectors=2)
    pipe = build_random_pipeline("tiny")
    method.apply(pipe)
    files = {p.name for p in method.save(pipe, tmp_path)}
    assert files == {"learned_embeds.safetensors", "qd-scribble.safetensors"}
    with safe_open(str(tmp_path / "qd-scribble.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_slice("emb_params").get_shape() == [2, 32]
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert TextualInversionMethod(placeholder="<my/concept:v2>").output_name == "my_concept_v2"
    with pytest.raises(ValueError, match=r"placeholder='<>' leaves no file name"):
        TextualInversionMethod(placeholder="<>")


def test_lokr_decompose_both_with_a_conv_rank_is_refused_before_training():
    with pytest.raises(ValueError, match=r"decompose_both=true with method.conv_rank=4: LyCORIS"):
        LoKrMethod(decompose_both=True, conv_rank=4)


def test_kohya_file_carries_modelspec_and_the_ss_keys_a1111_shows(tmp_path):
    overrides = [
        *FAST,
        "method=locon",
        "method.conv_rank=2",
        "data.resolution=32",
        "data.num_categories=3",
        "data.batch_size=2",
        "trainer.max_steps=4",
        "trainer.accumulate_grad_batches=2",
        "callbacks.preview=null",
        "task_name=meta",
    ]
    result = run(compose_cfg(overrides, tmp_path / "run"))
    with safe_open(str(result["output_dir"] / "meta.safetensors"), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert {k: meta[k] for k in meta if k.startswith("modelspec.") and k != "modelspec.date"} == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "meta",
        "modelspec.resolution": "32x32",
        "modelspec.prediction_type": "epsilon",
    }
    assert meta["modelspec.date"][:4].isdigit() and "T" in meta["modelspec.date"]
    started, finished = (
        float(meta["ss_training_started_at"]),
        float(meta["ss_training_finished_at"]),
    )
    assert 0 < finished - started < 3600
    # 2 trained categories (3, 30% held out) x 2 drawings, captioned "a scribble of <category>"
    assert meta["ss_num_train_images"] == "4"
    (tags,) = json.loads(meta["ss_tag_frequency"]).values()
    assert len(tags) == 2 and set(tags.values()) == {2}
    assert all(t.startswith("a scribble of ") for t in tags)
    assert json.loads(meta["ss_dataset_dirs"]) == {"quickdraw": {"n_repeats": 1, "img_count": 4}}
    assert meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_optimizer"].startswith("torch.optim.AdamW(betas=[0.9, 0.999],weight_decay=")
    assert (meta["ss_lr_scheduler"], meta["ss_mixed_precision"]) == ("cosine", "no")
    assert (meta["ss_total_batch_size"], meta["ss_epoch"]) == ("4", "4")  # 4 steps x 4 / 4
    assert meta["ss_clip_skip"] == "None"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}


def test_tags_are_counted_per_image_at_commas_and_names_follow_kohya():
    captions = ["a cat, red", "a cat, blue, a cat", "a dog", ""]
    assert tag_frequency(captions) == {"a cat": 2, "red": 1, "blue": 1, "a dog": 1}
    constant = OmegaConf.create(
        {"_target_": "diffusers.optimization.get_scheduler", "name": "constant_with_warmup"}
    )
    cosine = OmegaConf.create(
        {"_target_": "diffusers.optimization.get_cosine_schedule_with_warmup", "_partial_": True}
    )
    assert (scheduler_name(constant), scheduler_name(cosine)) == ("constant_with_warmup", "cosine")
    optim = OmegaConf.create({"_target_": "torchao.optim.AdamW8bit", "lr": 1e-4, "block_size": 256})
    assert optimizer_name(optim) == "torchao.optim.AdamW8bit(block_size=256)"
