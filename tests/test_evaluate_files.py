"""`evaluate.py adapter=...` on files a user is handed: nothing in them runs (pickles and
config targets are refused), every method's run folder evaluates through generate.py's loader,
and a broken or NaN adapter is refused with a message naming the file."""

import shutil

import pytest
import torch
from conftest import FAST, compose_cfg
from omegaconf import OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from sdft.adapters.load import AdapterMismatchError, load_adapter
from sdft.eval.evaluate import run as evaluate
from sdft.run_folder import UntrustedConfigError, read_run_config
from sdft.train import build
from sdft.train import run as train

STEPS = 2
TI = ["data.caption_template='a <qd-scribble> of {category}'"]
EVAL = [  # the scale sweep at its smallest: 2 scales, 1 prompt, 1 seed, 2 denoising steps
    "eval=tiny",
    "eval.scales=[0.0,1.0]",
    "eval.num_prompts=1",
    "eval.seeds=[0]",
    "eval.num_inference_steps=2",
    "logger=csv",
]


class Payload:
    """Unpickling this creates the marker file: a harmless stand-in for code hidden in a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(method) -> the run folder of a 2-step tiny run of that method (made once)."""
    runs = {}

    def _train(method: str):
        if method not in runs:
            extra = TI if method == "textual_inversion" else []
            out = tmp_path_factory.mktemp(method) / "run"
            cfg = compose_cfg(
                [*FAST, f"trainer.max_steps={STEPS}", f"method={method}", *extra], out
            )
            runs[method] = train(cfg)["output_dir"]
        return runs[method]

    return _train


def run_eval(adapter, tmp_path, *extra):
    cfg = compose_cfg([*EVAL, f"adapter={adapter}", *extra], tmp_path / "eval", "evaluate")
    return evaluate(cfg)


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "copied_run")


def test_checkpoint_holding_a_code_payload_is_refused_and_nothing_runs(trained, tmp_path):
    ckpt = torch.load(trained("lora") / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({**ckpt, "callbacks": {"x": Payload(marker)}}, evil)
    with pytest.raises(ValueError, match=r"evil.ckpt: refused to load: .*could run code"):
        run_eval(evil, tmp_path)
    assert not marker.exists()


def test_sdft_checkpoint_evaluates_with_weights_only_loading(trained, tmp_path):
    out = run_eval(trained("lora") / "checkpoints" / "last.ckpt", tmp_path)
    assert out["step"] == STEPS
    assert out["result"].images == 4  # 2 scales x (1 trained + 1 held-out prompt) x 1 seed


@pytest.mark.parametrize("given", ["folder", "diffusers file"])
def test_safetensors_adapter_never_unpickles_the_checkpoint_beside_it(trained, tmp_path, given):
    run = copy_run(trained("lora"), tmp_path)
    marker = tmp_path / "marker"
    torch.save({"global_step": 99, "payload": Payload(marker)}, run / "checkpoints" / "last.ckpt")
    adapter = run if given == "folder" else run / "pytorch_lora_weights.safetensors"
    out = run_eval(adapter, tmp_path)
    assert not marker.exists()
    assert out["step"] == STEPS  # from the adapter files' ss_steps metadata


def test_run_config_naming_code_to_run_is_refused_before_anything_is_built(trained, tmp_path):
    run = copy_run(trained("lora"), tmp_path)
    marker = tmp_path / "marker"
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    OmegaConf.save(cfg, run / "config.yaml")
    with pytest.raises(
        UntrustedConfigError, match=r"refused data._target_='builtins.open'.*values only"
    ):
        run_eval(run, tmp_path)
    assert not marker.exists()


def test_run_config_with_a_nested_target_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "method:\n  _target_: sdft.adapters.LoRAMethod\n"
        "  init_weights:\n    _target_: torch.load\n    f: x.ckpt\n    weights_only: false\n"
    )
    with pytest.raises(UntrustedConfigError, match=r"refused method.init_weights._target_"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text(
        "method:\n  _target_: sdft.adapters.LoHaMethod\n  rank: 2\n"
    )
    assert dict(read_run_config(tmp_path).method) == {
        "_target_": "sdft.adapters.LoHaMethod",
        "rank": 2,
    }


@pytest.mark.parametrize("method", ["loha", "lokr", "textual_inversion"])
def test_run_folder_of_every_method_evaluates(trained, tmp_path, method):
    run = trained(method)
    out = run_eval(run, tmp_path)
    assert out["step"] == STEPS
    assert out["result"].images == 4
    pipe = out["pipeline"]
    if method == "textual_inversion":
        assert "<qd-scribble>" in pipe.tokenizer.get_vocab()
        return
    (file,) = run.glob("*.safetensors")  # the kohya/LyCORIS file, the run's only adapter
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == len([k for k in load_file(file) if k.endswith(".alpha")]) > 0


@pytest.fixture
def pipe():
    from conftest import ROOT  # noqa: F401  (the tiny model of the run configs)

    cfg = compose_cfg(["model=tiny"], ROOT / "outputs" / "unused")
    return build(cfg.model)


def test_adapter_full_of_nan_is_refused_naming_file_and_tensor(trained, tmp_path, pipe):
    tensors = load_file(trained("lora") / "train.safetensors")
    bad = tmp_path / "nan.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, bad)
    match = r"nan.safetensors: tensor 'lora_unet_.*' holds NaN or infinite values"
    with pytest.raises(ValueError, match=match):
        load_adapter(pipe, bad, "bad")  # generate.py's loader
    with pytest.raises(ValueError, match=match):
        run_eval(bad, tmp_path)


def test_truncated_wrong_shape_and_sdxl_adapters_get_generate_messages(trained, tmp_path):
    good = trained("lora") / "train.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"truncated.safetensors: not a safetensors file"):
        run_eval(truncated, tmp_path)

    tensors = load_file(good)
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    shape = tmp_path / "shape.safetensors"
    save_file({**tensors, key: torch.zeros(4, 7)}, shape)
    with pytest.raises(AdapterMismatchError, match=r"shape.safetensors does not fit base model"):
        run_eval(shape, tmp_path)

    sdxl = tmp_path / "sdxl.safetensors"  # SDXL's kohya names: input_blocks, not down_blocks
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{name}.lora_down.weight": torch.zeros(4, 640),
            f"{name}.lora_up.weight": torch.zeros(640, 4),
            f"{name}.alpha": torch.tensor(4.0),
        },
        sdxl,
    )
    with pytest.raises(AdapterMismatchError, match=r"sdxl.safetensors does not fit.*SDXL\?"):
        run_eval(sdxl, tmp_path)
