"""Image folders someone else made: a decompression bomb is refused from its header, a
metadata.jsonl that is not UTF-8 is named by line, a duplicated file warns and a symlink
out of the folder is refused."""

import json
import logging
import os

import pytest
from PIL import Image

from sdft.data import caption_folder
from sdft.data.caption_folder import CaptionFolderDataModule
from sdft.data.checks import BadSampleError
from sdft.data.dreambooth import DreamBoothDataModule


def folder_with(root, names, rows=None):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (64, 64), (200, 10, 10)).save(root / name)
    rows = rows if rows is not None else [{"file_name": n, "text": f"a {n}"} for n in names]
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def setup_dm(path, **kw):
    dm = CaptionFolderDataModule(str(path), resolution=64, batch_size=2, **kw)
    dm.setup()
    return dm


def test_image_over_max_pixels_is_refused_from_its_header_never_decoded(tmp_path, monkeypatch):
    folder = folder_with(tmp_path / "data", ["a.png", "b.png"])
    Image.new("1", (12000, 12000)).save(folder / "huge.png")  # 144 Mpx, a small file
    rows = [{"file_name": n, "text": n} for n in ("a.png", "b.png", "huge.png")]
    folder_with(folder, [], rows)
    decoded = []
    real_decode = caption_folder.decode
    monkeypatch.setattr(caption_folder, "decode", lambda p: decoded.append(p) or real_decode(p))
    with pytest.raises(BadSampleError) as e:
        setup_dm(folder)
    assert (
        f"{folder}/metadata.jsonl:3: image {folder}/huge.png is 12000x12000 = 144000000 "
        "pixels, over data.max_pixels=67108864: refused before decoding"
    ) in str(e.value)
    assert not any(p.endswith("huge.png") for p in decoded)
    assert len(setup_dm(folder, on_bad_sample="skip").dataset) == 2
    with pytest.raises(
        BadSampleError, match=r"a.png is 64x64 = 4096 pixels, over data.max_pixels=4095"
    ):
        setup_dm(folder, max_pixels=4095)


def test_metadata_line_that_is_not_utf8_is_named_and_skippable(tmp_path):
    rows = [{"file_name": "a.png", "text": "a"}, b'{"file_name": "b.png", "text": "caf\xe9"}']
    folder = folder_with(tmp_path / "data", ["a.png", "b.png"], rows)
    msg = f"{folder}/metadata.jsonl:2: not UTF-8 text (byte 0xe9 at column 36)"
    with pytest.raises(BadSampleError) as e:
        setup_dm(folder)
    assert msg in str(e.value)
    dm = setup_dm(folder, on_bad_sample="skip")
    assert dm.skipped == 1 and [os.path.basename(p) for p in dm.dataset.images] == ["a.png"]


def test_a_sidecar_caption_that_is_not_utf8_is_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in (("a", b"a cat"), ("b", b"caf\xe9")):
        Image.new("RGB", (64, 64)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(text)
    with pytest.raises(BadSampleError, match=rf"{folder}/b.txt: not UTF-8 text \(byte 0xe9 at 3\)"):
        setup_dm(folder)


def test_duplicated_file_name_warns_with_its_lines(tmp_path, caplog):
    rows = [{"file_name": n, "text": n} for n in ("a.png", "b.png", "a.png")]
    folder = folder_with(tmp_path / "data", ["a.png", "b.png"], rows)
    with caplog.at_level(logging.WARNING):
        dm = setup_dm(folder)
    meta = f"{folder}/metadata.jsonl"
    assert (
        f"{folder}/a.png is listed 2 times ({meta}:1, {meta}:3): it trains 2 times as often"
    ) in caplog.text
    assert len(dm.dataset) == 3 and "b.png is listed" not in caplog.text


def test_symlink_out_of_the_folder_is_refused_naming_it(tmp_path):
    folder = folder_with(tmp_path / "data", ["a.png", "b.png"])
    Image.new("RGB", (64, 64)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", folder / "link.png")
    os.symlink(folder / "a.png", folder / "inside.png")  # a link within the folder is fine
    rows = [{"file_name": n, "text": n} for n in ("a.png", "b.png", "link.png", "inside.png")]
    folder_with(folder, [], rows)
    with pytest.raises(BadSampleError) as e:
        setup_dm(folder)
    assert (
        f"{folder}/metadata.jsonl:3: {folder}/link.png is a symlink to {tmp_path}/secret.png, "
        f"outside data.path='{folder}': refused"
    ) in str(e.value)
    assert "1 bad sample(s) of 4" in str(e.value)


def test_dreambooth_instance_image_over_max_pixels_is_refused(tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    Image.new("RGB", (128, 64)).save(folder / "big.png")
    dm = DreamBoothDataModule(str(folder), num_class_images=0, max_pixels=64 * 64)
    with pytest.raises(
        BadSampleError, match=r"big.png is 128x64 = 8192 pixels, over data.max_pixels"
    ):
        dm.setup()
