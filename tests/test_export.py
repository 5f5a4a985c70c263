"""Adapter files made elsewhere: kohya/LyCORIS files built by hand from the documented key
convention load for generation and merging; files that do not fit are refused by name."""

import numpy as np
import pytest
import torch
from conftest import generate_cfg, unet_out
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from sdft.adapters import LoRAMethod
from sdft.adapters.load import AdapterMismatchError, load_adapter, merge_adapter
from sdft.generate import AdapterSet, AdapterSpec, parse_prompt
from sdft.generate import run as generate_run
from sdft.models import build_random_pipeline
from sdft.module import AdapterFineTuner

ATOL = 2e-5  # float32, same weights: summation order only (outputs are ~1)
ATTN2_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # (32, 32) Linear
CONV1 = "down_blocks.0.resnets.0.conv1"  # (32, 32, 3, 3) Conv2d


def handmade_kohya_lora(path, rank=4, alpha=2.0, seed=0):
    """A kohya file written from the convention alone: lora_unet_<path, . -> _> with
    lora_down (r, in[, k, k]), lora_up (out, r[, 1, 1]) and a scalar alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, down, up in [
        (ATTN2_K, (rank, 32), (32, rank)),
        (CONV1, (rank, 32, 3, 3), (32, rank, 1, 1)),
    ]:
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return sd


def patched_by_hand(sd, weight, rank=4, alpha=2.0):
    """The base tiny pipeline with W += weight * alpha / rank * up @ down, layer by layer."""
    pipe = build_random_pipeline("tiny")
    with torch.no_grad():
        for name in (ATTN2_K, CONV1):
            key = "lora_unet_" + name.replace(".", "_")
            down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
            w = pipe.unet.get_submodule(name).weight
            w += weight * alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return pipe


def test_handmade_kohya_file_loads_for_generation_and_changes_the_output_as_expected(tmp_path):
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    sd = handmade_kohya_lora(lora_dir / "handmade.safetensors")
    base = unet_out(build_random_pipeline("tiny").unet)

    pipe = build_random_pipeline("tiny")
    text, specs = parse_prompt("a scribble of apple <lora:handmade:0.7>", lora_dir)
    assert text == "a scribble of apple" and specs[0].weight == 0.7
    adapters = AdapterSet(pipe)
    adapters.load(specs)
    for w in (0.7, 1.0, 0.0):
        adapters.activate([AdapterSpec(specs[0].path, w)])
        expected = unet_out(patched_by_hand(sd, w).unet)
        torch.testing.assert_close(unet_out(pipe.unet), expected, atol=ATOL, rtol=0)
    assert (unet_out(patched_by_hand(sd, 0.7).unet) - base).abs().max() > 1e-2  # it does change

    merged = build_random_pipeline("tiny")
    merge_adapter(merged, lora_dir / "handmade.safetensors", 0.7)
    expected = unet_out(patched_by_hand(sd, 0.7).unet)
    torch.testing.assert_close(unet_out(merged.unet), expected, atol=ATOL, rtol=0)


def cp(t, wa, wb):
    """CP/Tucker rebuild as LyCORIS: core (r, r, k, k), (r, out), (r, in) -> (out, in, k, k)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


def lycoris_delta(t, alpha):
    """The update a LyCORIS layer makes, written from the LyCORIS formulas (the oracle for
    peft's layers): scale * dW with scale = alpha / rank, and 1 for LoKr with both factors full."""
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            w1, w2 = (cp(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]) for i in (1, 2))
        else:
            w1, w2 = (t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"] for i in (1, 2))
        return w1 * w2 * alpha / t["hada_w1_b"].shape[0]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = next((t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t), None)
    w1 = w1[:, :, None, None] if w2.dim() == 4 else w1
    return torch.kron(w1.contiguous(), w2.contiguous()) * (1.0 if rank is None else alpha / rank)


def patched_by_lycoris_formula(sd, scale):
    """The base tiny pipeline with W += scale * the oracle's update, layer by layer."""
    pipe = build_random_pipeline("tiny")
    layers = {}
    for key, t in sd.items():
        name, _, factor = key.partition(".")
        layers.setdefault(name, {})[factor] = t
    with torch.no_grad():
        for name, t in layers.items():
            path = ATTN2_K if name.endswith("to_k") else CONV1
            w = pipe.unet.get_submodule(path).weight
            alpha = float(t.pop("alpha"))
            w += scale * lycoris_delta(t, alpha).reshape(w.shape)
    return pipe


def test_handmade_lycoris_tucker_files_load_as_peft_layers_and_merge_alike(tmp_path):
    """LoHa with CP/Tucker conv factors and LoKr with a decomposed W2 and Tucker core: peft's
    layers, loaded from a config made from the file (generation) and merged into the weights,
    make the update the LyCORIS formulas give."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(shape, generator=g) * 0.3

    conv, attn = "lora_unet_" + CONV1.replace(".", "_"), "lora_unet_" + ATTN2_K.replace(".", "_")
    loha = {
        **{f"{conv}.hada_t{i}": r(2, 2, 3, 3) for i in (1, 2)},  # CP cores (r, r, k, k)
        **{f"{conv}.hada_w{i}_{ab}": r(2, 32) for i in (1, 2) for ab in "ab"},  # (r, out|in)
        f"{conv}.alpha": torch.tensor(1.0),
        **{f"{attn}.hada_w{i}_a": r(32, 2) for i in (1, 2)},  # (out, r)
        **{f"{attn}.hada_w{i}_b": r(2, 32) for i in (1, 2)},  # (r, in)
        f"{attn}.alpha": torch.tensor(4.0),
    }
    lokr = {
        f"{conv}.lokr_w1": r(4, 4),  # (a, c): 32 = 4 x 8 both ways
        f"{conv}.lokr_t2": r(2, 2, 3, 3),  # W2 = CP(t2, w2_a, w2_b): (8, 8, 3, 3)
        f"{conv}.lokr_w2_a": r(2, 8),
        f"{conv}.lokr_w2_b": r(2, 8),
        f"{conv}.alpha": torch.tensor(1.0),
        f"{attn}.lokr_w1": r(4, 4),
        f"{attn}.lokr_w2": r(8, 8),
        f"{attn}.alpha": torch.tensor(9.0),
    }
    base = unet_out(build_random_pipeline("tiny").unet)
    for name, sd in (("loha", loha), ("lokr", lokr)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        loaded, merged = build_random_pipeline("tiny"), build_random_pipeline("tiny")
        load_adapter(loaded, tmp_path / f"{name}.safetensors", name)
        loaded.set_adapters([name], [0.5])
        merge_adapter(merged, tmp_path / f"{name}.safetensors", 0.5)
        expected = unet_out(patched_by_lycoris_formula(sd, 0.5).unet)
        torch.testing.assert_close(unet_out(loaded.unet), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(unet_out(merged.unet), expected, atol=ATOL, rtol=0)
        assert (expected - base).abs().max() > 1e-3
        assert not any("lokr" in n or "hada" in n for n, _ in merged.unet.named_parameters())
    # LoKr with both factors full (the attention layer) has no rank: scale 1, alpha ignored
    only_full = {k: v for k, v in lokr.items() if k.startswith(attn)}
    save_file(only_full, str(tmp_path / "full.safetensors"))
    merged = build_random_pipeline("tiny")
    merge_adapter(merged, tmp_path / "full.safetensors", 1.0)
    w0 = build_random_pipeline("tiny").unet.get_submodule(ATTN2_K).weight
    dw = torch.kron(only_full[f"{attn}.lokr_w1"], only_full[f"{attn}.lokr_w2"])
    torch.testing.assert_close(merged.unet.get_submodule(ATTN2_K).weight, w0 + dw)


def pixels(result):
    return np.stack([np.asarray(im, np.int16) for row in result["rows"] for im in row])


def test_merging_then_generating_matches_generating_with_the_adapter(tmp_path):
    (tmp_path / "Lora").mkdir()
    handmade_kohya_lora(tmp_path / "Lora" / "handmade.safetensors")
    lora = f"lora=[{tmp_path / 'Lora' / 'handmade.safetensors'}:0.6]"
    adapter = generate_run(generate_cfg(tmp_path, "adapter", lora))
    merged = generate_run(generate_cfg(tmp_path, "merged", lora, f"merge_to={tmp_path / 'm'}"))
    base = generate_run(generate_cfg(tmp_path, "base"))
    # uint8 images of float32 runs that differ only in summation order: at most 1 level apart
    assert np.abs(pixels(merged) - pixels(adapter)).max() <= 1
    assert np.abs(pixels(adapter) - pixels(base)).mean() > 1.0  # the adapter shows
    assert merged["info"][0]["adapter_weights"] == {}  # merged: no adapter layers at all

    # the merged folder is a full diffusers pipeline: W' = W + 0.6 dW in its UNet
    reloaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    only = generate_cfg(tmp_path, "only", lora, "prompts=[]", f"merge_to={tmp_path / 'm2'}")
    assert generate_run(only)["rows"] == [] and (tmp_path / "m2" / "model_index.json").is_file()
    expected = unet_out(patched_by_hand(handmade_kohya_lora(tmp_path / "x.st"), 0.6).unet)
    torch.testing.assert_close(unet_out(reloaded.unet), expected, atol=ATOL, rtol=0)


# -- files that do not fit are refused, naming the first mismatched keys and shapes --------
def test_sdxl_lora_into_sd15_names_the_first_mismatched_keys(tmp_path):
    pipe = build_random_pipeline("tiny")
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    sdxl = {  # kohya SDXL naming (sgm blocks) and an SDXL-wide cross-attention (2048)
        f"{key}.lora_down.weight": torch.zeros(4, 2048),
        f"{key}.lora_up.weight": torch.zeros(640, 4),
        f"{key}.alpha": torch.tensor(4.0),
    }
    save_file(sdxl, str(tmp_path / "sdxl_kohya.safetensors"))
    with pytest.raises(
        AdapterMismatchError,
        match=r"sdxl_kohya.safetensors does not fit base model 'sdft-random-tiny-seed0' \(1 of 1 "
        r"layers.*SDXL\?\): lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k: no layer",
    ):
        load_adapter(pipe, tmp_path / "sdxl_kohya.safetensors", "x")
    diffusers_sdxl = {  # diffusers naming: the layer exists, its shapes do not
        f"unet.{ATTN2_K}.lora_A.weight": torch.zeros(4, 2048),
        f"unet.{ATTN2_K}.lora_B.weight": torch.zeros(32, 4),
    }
    save_file(diffusers_sdxl, str(tmp_path / "sdxl_diffusers.safetensors"))
    with pytest.raises(
        AdapterMismatchError,
        match=r"unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k: its "
        r"factors \(lora_down \(4, 2048\), lora_up \(32, 4\)\) make a \(32, 2048\) update for a "
        r"weight of \(32, 32\)",
    ):
        merge_adapter(pipe, tmp_path / "sdxl_diffusers.safetensors")


def test_a_rank_that_does_not_fit_a_layer_is_named(tmp_path):
    key = "lora_unet_" + ATTN2_K.replace(".", "_")
    save_file(
        {
            f"{key}.lora_down.weight": torch.zeros(4, 32),
            f"{key}.lora_up.weight": torch.zeros(32, 8),
        },
        str(tmp_path / "bad_rank.safetensors"),
    )
    with pytest.raises(
        AdapterMismatchError,
        match=rf"{key}: its factors do not combine \(lora_down \(4, 32\), lora_up \(32, 8\)\)",
    ):
        load_adapter(build_random_pipeline("tiny"), tmp_path / "bad_rank.safetensors", "x")


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match=r"old.safetensors: not a safetensors file .*\.pt"):
        load_adapter(build_random_pipeline("tiny"), tmp_path / "old.safetensors", "x")


def test_training_starts_from_a_kohya_file(tmp_path):
    sd = handmade_kohya_lora(tmp_path / "start.safetensors", rank=4, alpha=2.0)
    start, targets = str(tmp_path / "start.safetensors"), rf"{ATTN2_K}|{CONV1}"
    # alpha 8: another scale than the file's 2/4; the update must stay the file's
    method = LoRAMethod(rank=4, alpha=8, target_regex=targets, init_weights=start)
    module = AdapterFineTuner(build_random_pipeline("tiny"), method, None, None)
    expected = unet_out(patched_by_hand(sd, 1.0).unet)
    torch.testing.assert_close(unet_out(module.unet), expected, atol=ATOL, rtol=0)
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.unet.named_parameters())

    rank2 = LoRAMethod(rank=2, target_regex=targets, init_weights=start)
    with pytest.raises(
        AdapterMismatchError,
        match=r"attn2_to_k: the file has lora .*\(4, 32\).*method=lora makes lora .*\(2, 32\)",
    ):
        AdapterFineTuner(build_random_pipeline("tiny"), rank2, None, None)
