"""sdft.files: a write either replaces the file whole or leaves it as it was, with no litter."""

import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdft.adapters.export import save_kohya
from sdft.files import atomic_path, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "summary.md"
    write_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]


def test_a_kohya_file_is_written_in_place_of_the_old_one_with_its_metadata(tmp_path):
    path = tmp_path / "scribble.safetensors"
    path.write_bytes(b"an older adapter")
    save_kohya({"w": torch.ones(2)}, path, {"ss_network_dim": "4"})
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scribble.safetensors"]


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_adapters_are_written_with_the_umask_mode_not_private(tmp_path, umask):
    """A shared run folder stays readable by its group: 0666 less the umask, as open() gives."""
    from diffusers import StableDiffusionPipeline

    from sdft.files import atomic_output

    old = os.umask(umask)
    try:
        kohya = save_kohya({"w": torch.ones(2)}, tmp_path / "kohya.safetensors", {})
        with atomic_output(tmp_path / "pytorch_lora_weights.safetensors") as tmp_dir:
            lora = {"unet.a.lora_A.weight": torch.ones(1, 2)}
            StableDiffusionPipeline.save_lora_weights(tmp_dir, unet_lora_layers=lora)
        write_atomic(tmp_path / "summary.md", "x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert kohya.name in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and len(modes) == 3
