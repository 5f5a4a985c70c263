"""Every method trains a few steps on the tiny model, exports, and its files load back (into
diffusers where diffusers reads the format) with the trained module's outputs."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, SAMPLE, compose_cfg, unet_out
from PIL import Image
from safetensors import safe_open

from sdft.adapters.load import load_adapter
from sdft.models import build_random_pipeline
from sdft.module import AdapterFineTuner
from sdft.train import run

# FAST at 32 px (8x8 latents), 2 drawings a batch, 3 steps at a high learning rate so that the
# adapters move well away from zero; no previews.
SMALL = [
    *FAST,
    "data.resolution=32",
    "data.num_categories=3",
    "data.batch_size=2",
    "trainer.max_steps=3",
    "optim.lr=3e-2",
    "callbacks.preview=null",
]
ATOL = 2e-5  # same weights, float32: only summation order may differ (outputs are ~1)
V = 49408  # CLIP's vocabulary


def train(monkeypatch, overrides, out_dir, small=SMALL):
    """run() a config; return (its result, the trained module itself)."""
    trained = {}
    save = AdapterFineTuner.save_adapter

    def keep(self, *args, **kwargs):
        trained["module"] = self
        return save(self, *args, **kwargs)

    monkeypatch.setattr(AdapterFineTuner, "save_adapter", keep)
    result = run(compose_cfg([*small, *overrides], out_dir))
    monkeypatch.undo()
    return result, trained["module"]


def text_out(pipe, prompt="a scribble of apple"):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]  # (1, 77, D)


def files_of(result):
    return {f.name: f for f in result["adapter_files"]}


@pytest.mark.parametrize(
    "name,overrides,loader",
    [
        ("lora", ["method=lora", "method.train_text_encoder=true"], "diffusers"),
        ("locon", ["method=locon", "method.conv_rank=2", "method.conv_alpha=1"], "diffusers"),
        ("loha", ["method=loha", "method.rank=2", "method.conv_rank=2"], "sdft"),
        # rank 4 >= half of W2's size on the tiny model's 32/64-wide layers: full LoKr
        # factors (whose scale the export bakes into lokr_w1); conv_rank 2: decomposed ones
        ("lokr", ["method=lokr", "method.rank=4", "method.conv_rank=2"], "sdft"),
    ],
)
def test_method_trains_exports_and_its_files_load_back(
    name, overrides, loader, monkeypatch, tmp_path
):
    result, module = train(monkeypatch, [*overrides, f"task_name={name}"], tmp_path / "run")
    expected, base = unet_out(module.unet), unet_out(build_random_pipeline("tiny").unet)
    assert (expected - base).abs().max() > 1e-3  # training moved the adapter
    files = files_of(result)
    assert f"{name}.safetensors" in files  # the kohya / LyCORIS file
    assert ("pytorch_lora_weights.safetensors" in files) == (loader == "diffusers")
    for f in files.values():
        pipe = build_random_pipeline("tiny")
        if loader == "diffusers":  # both formats, through diffusers' own loader
            pipe.load_lora_weights(str(f), adapter_name="trained")
        else:  # LyCORIS LoHa/LoKr: diffusers has no SD1.x loader; sdft's (peft layers)
            load_adapter(pipe, f, "trained")
        torch.testing.assert_close(unet_out(pipe.unet), expected, atol=ATOL, rtol=0)
        if module.trains_text_encoder:
            torch.testing.assert_close(
                text_out(pipe), text_out(module.inference_pipeline()), atol=ATOL, rtol=0
            )


def test_locon_adapts_resnet_and_sampler_convs_with_their_own_rank(monkeypatch, tmp_path):
    result, _ = train(
        monkeypatch, ["method=locon", "method.conv_rank=3", "trainer.max_steps=1"], tmp_path / "r"
    )
    f = safe_open(str(files_of(result)["train.safetensors"]), "pt")
    down = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("lora_down.weight")}
    conv1 = down["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv1 == [3, 32, 3, 3]  # conv rank 3, 3x3 kernel kept 4-D
    assert down["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"][0] == 3
    assert down["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"][0] == 3
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert down[f"{attn}.lora_down.weight"] == [4, 32]  # attention: rank 4
    assert float(f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")) == 1.0


def test_textual_inversion_changes_only_its_rows(monkeypatch, tmp_path):
    overrides = [
        "method=textual_inversion",
        "method.placeholder='<qd-style>'",
        "method.num_vectors=2",
        "method.output_name=qd-style",
        "data.caption_template='a <qd-style> of {category}'",
    ]
    result, module = train(monkeypatch, overrides, tmp_path / "run")
    base = build_random_pipeline("tiny").text_encoder.get_input_embeddings().weight
    trained = module.text_encoder.get_input_embeddings()
    # every row of the real vocabulary bit-identical (AdamW's weight decay included) ...
    assert torch.equal(trained.weight[:V], base)
    # ... and the two new rows moved away from their initializer ("sketch")
    init = base[5269]
    assert (trained.vectors.detach() - init).abs().max() > 1e-3
    assert torch.equal(trained.weight[V:], trained.vectors.detach())  # synced at save
    expected = text_out(module.inference_pipeline(), "a <qd-style> of apple")

    files = files_of(result)
    pipe = build_random_pipeline("tiny")
    pipe.load_textual_inversion(str(files["learned_embeds.safetensors"]))
    assert pipe.tokenizer.convert_tokens_to_ids(["<qd-style>", "<qd-style>_1"]) == [V, V + 1]
    torch.testing.assert_close(text_out(pipe, "a <qd-style> of apple"), expected, atol=1e-6, rtol=0)
    # the kohya/A1111 file: {"emb_params": (2, 32)}; the prompt word is the file name
    a1111 = build_random_pipeline("tiny")
    a1111.load_textual_inversion(str(files["qd-style.safetensors"]), token="qd-style")
    torch.testing.assert_close(text_out(a1111, "a qd-style of apple"), expected, atol=1e-6, rtol=0)


def write_instance_images(folder, n=3):
    folder.mkdir(parents=True)
    bitmaps = np.load(SAMPLE / "bitmap" / "apple.npy", mmap_mode="r")[:n]
    for i, b in enumerate(bitmaps):
        Image.fromarray(255 - b.reshape(28, 28)).convert("RGB").save(folder / f"sks_{i}.png")
    return folder


DREAMBOOTH = [  # FAST without its QuickDraw keys
    *[o for o in SMALL if not o.startswith("data.")],
    "data=dreambooth",
    "data.resolution=32",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.num_class_images=2",
    "data.class_steps=2",
    "data.class_batch_size=2",
    "method=dreambooth_lora",
]


def test_dreambooth_makes_class_images_once_and_adds_the_prior_loss(monkeypatch, tmp_path):
    instance = write_instance_images(tmp_path / "subject")
    common = [f"data.instance_dir={instance}", f"data.cache_dir={tmp_path / 'cache'}"]
    result, module = train(monkeypatch, common, tmp_path / "run", DREAMBOOTH)
    made = sorted((tmp_path / "cache" / "class_images").glob("a_scribble-*/*.png"))
    assert [p.name for p in made] == ["00000.png", "00001.png"]
    stamps = [p.stat().st_mtime_ns for p in made]

    # the second run reuses them: same files, untouched
    train(monkeypatch, common, tmp_path / "again", DREAMBOOTH)
    assert [p.stat().st_mtime_ns for p in made] == stamps
    assert sorted((tmp_path / "cache" / "class_images").rglob("*.png")) == made

    # loss = instance + w x prior, each a mean over its half of the batch (w = 1 here)
    dm = module.trainer.datamodule
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["caption"] == ["a sks scribble"] * 2 + ["a scribble"] * 2

    def g():  # the same noise and timesteps for every loss below
        return torch.Generator().manual_seed(5)

    with torch.no_grad():
        total = module.diffusion_loss(batch, g()).item()
        plain = {k: v for k, v in batch.items() if k != "is_prior"}
        module.method.prior_loss_weight = 0.0
        instance_only = module.diffusion_loss(batch, g()).item()
        module.method.prior_loss_weight = 2.5
        heavier = module.diffusion_loss(batch, g()).item()
        mean_all = module.diffusion_loss(plain, g()).item()
    prior = total - instance_only
    assert prior > 0
    assert heavier == pytest.approx(instance_only + 2.5 * prior, rel=1e-5)
    assert mean_all == pytest.approx(instance_only / 2 + prior / 2, rel=1e-5)  # equal halves

    # the files are LoRA files: diffusers loads both with the trained module's output
    assert set(files_of(result)) == {"train.safetensors", "pytorch_lora_weights.safetensors"}
    for f in files_of(result).values():
        pipe = build_random_pipeline("tiny")
        pipe.load_lora_weights(str(f))
        torch.testing.assert_close(unet_out(pipe.unet), unet_out(module.unet), atol=ATOL, rtol=0)


def test_prior_loss_weight_zero_trains_on_instance_images_only(monkeypatch, tmp_path):
    instance = write_instance_images(tmp_path / "subject")
    overrides = [
        f"data.instance_dir={instance}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "method.prior_loss_weight=0",
        "trainer.max_steps=1",
    ]
    _, module = train(monkeypatch, overrides, tmp_path / "run", DREAMBOOTH)
    batch = next(iter(module.trainer.datamodule.train_dataloader()))
    assert "is_prior" not in batch and batch["caption"] == ["a sks scribble"] * 2
    assert not (tmp_path / "cache").exists()  # no class images made


def test_kohya_file_records_the_run_in_ss_metadata(monkeypatch, tmp_path):
    result, _ = train(
        monkeypatch, ["trainer.max_steps=2", "method.save_dtype=float16"], tmp_path / "r"
    )
    out = result["output_dir"]
    f = safe_open(str(out / "train.safetensors"), "pt")
    meta = f.metadata()
    import hashlib

    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == "sdft-random-tiny-seed0"
    assert (meta["ss_resolution"], meta["ss_steps"], meta["ss_max_train_steps"]) == (
        "(32, 32)",
        "2",
        "2",
    )
    assert meta["ss_dataset_hash"] == hashlib.sha256((out / "split.json").read_bytes()).hexdigest()
    assert json.loads(meta["ss_network_args"]) == {}
    # float16 on request, in both files
    for name in ("train.safetensors", "pytorch_lora_weights.safetensors"):
        g = safe_open(str(out / name), "pt")
        assert {g.get_tensor(k).dtype for k in g.keys()} == {torch.float16}


# -- bad input: each stops with a message that names the value ----------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=lora", "method.rank=0"], r"method.rank=0 must be a positive integer"),
        (["method=locon", "method.conv_rank=-1"], r"method.conv_rank=-1 must be a positive"),
        (["method=loha", "method.rank=0"], r"method.rank=0 must be a positive integer"),
        (["method=lokr", "method.rank=-2"], r"method.rank=-2 must be a positive integer"),
        (["method=textual_inversion", "method.num_vectors=0"], r"num_vectors=0 must be a positive"),
    ],
)
def test_rank_must_be_positive_for_every_method(make_cfg, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(make_cfg(*overrides))


def test_textual_inversion_placeholder_already_in_the_vocabulary_is_refused(make_cfg):
    with pytest.raises(ValueError, match=r"placeholder='cat': \['cat'\] already in the tokenizer"):
        run(make_cfg("method=textual_inversion", "method.placeholder=cat"))


def test_textual_inversion_without_the_placeholder_in_captions_stops(make_cfg):
    with pytest.raises(ValueError, match="no caption of the first batch holds the placeholder"):
        run(make_cfg("method=textual_inversion", "trainer.max_steps=1"))


def test_dreambooth_without_instance_images_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    cfg = compose_cfg([*DREAMBOOTH, f"data.instance_dir={tmp_path / 'empty'}"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"instance_dir=.*empty.*holds no instance images"):
        run(cfg)
