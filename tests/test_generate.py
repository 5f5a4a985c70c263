"""Generation with several adapters at chosen weights, A1111 prompt syntax, TI tokens,
samplers, seeds and the grid, through the library and the generate.yaml config."""

import numpy as np
import pytest
import torch
from conftest import generate_cfg, unet_out

from sdft.adapters import LoConMethod, LoHaMethod, LoRAMethod, TextualInversionMethod
from sdft.adapters.load import merge_adapter
from sdft.generate import AdapterSet, AdapterSpec, parse_adapter, parse_prompt, resolve_file
from sdft.generate import run as generate_run
from sdft.models import build_random_pipeline

ATOL = 2e-5  # float32, same weights: summation order only (outputs are ~1)


def random_adapter(method, out_dir, seed):
    """A method's files with its adapter weights set at random (as if trained)."""
    pipe = build_random_pipeline("tiny")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    method.apply(pipe)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return {f.name: f for f in method.save(pipe, out_dir)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    (d / "Lora").mkdir()  # an A1111 LoRA folder holding style.safetensors (kohya format)
    style = random_adapter(LoRAMethod(output_name="style"), d / "lora", 1)["style.safetensors"]
    return {
        "lora": style.rename(d / "Lora" / style.name),
        "locon": random_adapter(LoConMethod(conv_rank=2), d / "locon", 2)[
            "pytorch_lora_weights.safetensors"
        ],
        "loha": random_adapter(LoHaMethod(rank=2, conv_rank=2), d / "loha", 3)["loha.safetensors"],
        "dir": d,
    }


def test_prompt_syntax_and_config_specs_are_parsed(adapters, tmp_path):
    lora_dir = adapters["dir"] / "Lora"
    text, specs = parse_prompt("a scribble of apple <lora:style:0.8>, <lora:style>", lora_dir)
    assert text == "a scribble of apple"
    assert [(s.path.name, s.weight) for s in specs] == [
        ("style.safetensors", 0.8),
        ("style.safetensors", 1.0),
    ]
    assert parse_adapter(f"{adapters['lora']}:-0.25") == AdapterSpec(adapters["lora"], -0.25)
    assert parse_adapter(str(adapters["lora"])).weight == 1.0
    # an sdft run folder: its diffusers file
    assert resolve_file(adapters["locon"].parent) == adapters["locon"]
    known = r"<lora:sytle> .* no sytle.safetensors .*it knows \['style'\]"
    with pytest.raises(FileNotFoundError, match=known):
        parse_prompt("a scribble <lora:sytle:0.8>", lora_dir)
    with pytest.raises(ValueError, match=r"<lora:style:heavy>: weight 'heavy' is not a number"):
        parse_prompt("a scribble <lora:style:heavy>", lora_dir)


def test_two_adapters_at_half_and_one_match_diffusers_set_adapters(adapters):
    a, b = adapters["lora"], adapters["locon"]  # a kohya file and a diffusers file
    ours = build_random_pipeline("tiny")
    loaded = AdapterSet(ours)
    specs = [AdapterSpec(a, 0.5), AdapterSpec(b, 1.0)]
    loaded.load(specs)
    assert loaded.activate(specs) == {"style": 0.5, "pytorch_lora_weights": 1.0}
    got = unet_out(ours.unet)

    reference = build_random_pipeline("tiny")  # plain diffusers
    reference.load_lora_weights(str(a), adapter_name="a")
    reference.load_lora_weights(str(b), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    torch.testing.assert_close(got, unet_out(reference.unet), atol=ATOL, rtol=0)

    merged = build_random_pipeline("tiny")  # and W + 0.5 dW_a + 1.0 dW_b
    merge_adapter(merged, a, 0.5)
    merge_adapter(merged, b, 1.0)
    torch.testing.assert_close(got, unet_out(merged.unet), atol=ATOL, rtol=0)
    reference.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0])
    assert (unet_out(reference.unet) - got).abs().max() > 1e-3  # the weights matter


def test_a_lora_and_a_loha_compose_as_their_merged_sum(adapters):
    pipe = build_random_pipeline("tiny")
    specs = [AdapterSpec(adapters["lora"], 0.5), AdapterSpec(adapters["loha"], 1.0)]
    loaded = AdapterSet(pipe)
    loaded.load(specs)
    loaded.activate(specs)
    merged = build_random_pipeline("tiny")
    merge_adapter(merged, adapters["lora"], 0.5)
    merge_adapter(merged, adapters["loha"], 1.0)
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(merged.unet), atol=ATOL, rtol=0)


def pixels(result):
    return np.stack([np.asarray(im, np.int16) for row in result["rows"] for im in row])


def test_generate_config_writes_a_grid_with_adapters_from_config_and_prompt(adapters, tmp_path):
    lora_dir = adapters["dir"] / "Lora"
    common = [f"lora_dir={lora_dir}"]
    base = generate_run(generate_cfg(tmp_path, "base", *common))
    tags = "prompts=['a scribble of apple <lora:style:0.8>','a scribble of a cat']"
    tagged = generate_run(generate_cfg(tmp_path, "tagged", *common, tags))
    listed = generate_run(
        generate_cfg(tmp_path, "listed", *common, f"lora=[{adapters['lora']}:0.8]")
    )
    # the grid: 2 prompts (rows) x 2 seeds (columns) of 32 px images, each image saved too
    grid = tagged["grid"]
    from PIL import Image

    assert Image.open(grid).size == (64, 64)
    assert sorted(p.name for p in (tmp_path / "tagged" / "images").iterdir()) == [
        f"{row:02d}_seed{seed}.png" for row in (0, 1) for seed in (0, 1)
    ]
    assert tagged["info"][0]["text"] == "a scribble of apple"
    assert tagged["info"][0]["adapter_weights"] == {"style": 0.8}
    assert tagged["info"][1]["adapter_weights"] == {"style": 0.0}  # the tag is per prompt
    p_base, p_tagged, p_listed = pixels(base), pixels(tagged), pixels(listed)
    assert np.abs(p_tagged[:2] - p_base[:2]).mean() > 1.0  # apple row: with the LoRA
    assert np.array_equal(p_tagged[2:], p_base[2:])  # cat row: weight 0 is the base exactly
    assert np.abs(p_tagged[:2] - p_listed[:2]).max() <= 1  # tag == config list, same weight
    assert not np.array_equal(p_base[0], p_base[1])  # seeds differ ...
    again = generate_run(generate_cfg(tmp_path, "again", *common))
    assert np.array_equal(pixels(again), p_base)  # ... and repeat


def test_samplers_differ_and_an_unknown_one_is_named(tmp_path):
    (tmp_path / "Lora").mkdir()
    images = {
        s: pixels(generate_run(generate_cfg(tmp_path, s, f"sampler={s}", "seeds=[0]")))
        for s in ("dpmpp_2m", "euler_a", "ddim")
    }
    assert np.abs(images["dpmpp_2m"] - images["euler_a"]).mean() > 0.5
    assert np.abs(images["dpmpp_2m"] - images["ddim"]).mean() > 0.5
    with pytest.raises(ValueError, match=r"sampler='plms' must be one of \['dpmpp_2m'"):
        generate_run(generate_cfg(tmp_path, "bad", "sampler=plms"))


def test_textual_inversion_tokens_work_in_prompts(tmp_path):
    (tmp_path / "Lora").mkdir()
    method = TextualInversionMethod(placeholder="<qd>", num_vectors=2, output_name="qd")
    pipe = build_random_pipeline("tiny")
    method.apply(pipe)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().vectors.normal_(
            generator=torch.Generator().manual_seed(0)
        )
    files = {f.name: f for f in method.save(pipe, tmp_path / "ti")}
    prompts = "prompts=['a <qd> of apple','a qd of apple','a scribble of a cat']"
    base = pixels(generate_run(generate_cfg(tmp_path, "base", prompts, "seeds=[0]")))
    for f in files.values():  # diffusers file: token "<qd>"; A1111 file: its name, "qd"
        cfg = generate_cfg(tmp_path, f.stem, prompts, f"embeddings=[{f}]", "seeds=[0]")
        result = pixels(generate_run(cfg))
        used = 0 if f.name == "learned_embeds.safetensors" else 1  # the prompt with the token
        assert np.abs(result[used] - base[used]).mean() > 1.0
        assert np.array_equal(result[2], base[2])  # other words: untouched


def test_adapter_file_named_like_a_module_method_gets_a_name_peft_can_set():
    from sdft.adapters.load import adapter_name_for

    assert adapter_name_for("runs/train.safetensors") == "train_adapter"  # task_name=train
    assert adapter_name_for("eval.safetensors") == "eval_adapter"
    assert adapter_name_for("my.scribble.safetensors") == "my_scribble"
