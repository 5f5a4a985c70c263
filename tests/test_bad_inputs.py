"""Each bad input stops the run before training, with a message naming the bad value."""

import json
import shutil

import pytest
from conftest import SAMPLE

from sdft.data.quickdraw import BadSampleError
from sdft.module import CheckpointMismatchError
from sdft.train import run


def test_missing_data_path_is_named(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path=.*nowhere.*no such directory"):
        run(make_cfg(f"data.path={tmp_path}/nowhere"))


def test_unknown_category_is_named(make_cfg):
    with pytest.raises(ValueError, match=r"data.categories: \['unicornz'\] not in"):
        run(make_cfg("data.categories=[apple,unicornz]"))


def test_per_category_larger_than_the_category_is_named(make_cfg):
    with pytest.raises(ValueError, match="per_category=26 but category '.*' has only 25"):
        run(make_cfg("data.per_category=26", "data.formats=[ndjson]"))


def test_malformed_ndjson_line_names_file_and_line(make_cfg, tmp_path):
    data = tmp_path / "qd"
    data.mkdir()
    for name in ("apple", "cat", "fish"):
        shutil.copy(SAMPLE / "ndjson" / f"{name}.ndjson", data)
    lines = (data / "cat.ndjson").read_text().splitlines()
    lines[2] = '{"word": "cat", "drawing": [[[1, 2], [3]]]}'  # x and y differ in length
    (data / "cat.ndjson").write_text("\n".join(lines) + "\n")
    cfg = make_cfg(f"data.path={data}", "data.categories=[cat]", "data.per_category=25")
    with pytest.raises(BadSampleError, match=r"cat.ndjson:3: malformed drawing"):
        run(cfg)
    skip = make_cfg(
        f"data.path={data}",
        "data.categories=[cat]",
        "data.per_category=25",
        "data.on_bad_sample=skip",
        run="skip",
    )
    out = run(skip)["output_dir"]
    assert json.loads((out / "split.json").read_text())["skipped"] == 1


def test_bitmap_file_of_wrong_shape_is_named(make_cfg, tmp_path):
    import numpy as np

    data = tmp_path / "qd"
    data.mkdir()
    np.save(data / "apple.npy", np.zeros((30, 28, 28), dtype=np.uint8))
    with pytest.raises(BadSampleError, match=r"apple.npy: expected a \(N, 784\) uint8"):
        run(make_cfg(f"data.path={data}", "data.categories=[apple]"))


def test_base_model_folder_that_is_not_a_diffusers_pipeline_is_named(make_cfg, tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(ValueError, match="not_a_model.*not a diffusers pipeline"):
        run(make_cfg("model=sd15", f"model.pretrained={empty}"))
    (empty / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="is a FluxPipeline pipeline, not an SD1.x/2.x"):
        run(make_cfg("model=sd15", f"model.pretrained={empty}"))
    with pytest.raises(FileNotFoundError, match="no_such_dir.*no such directory"):
        run(make_cfg("model=sd15", f"model.pretrained={tmp_path}/no_such_dir"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import FAST, compose_cfg

    cfg = compose_cfg([*FAST, "trainer.max_steps=1"], tmp_path_factory.mktemp("c") / "run")
    return run(cfg)["output_dir"] / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_method_is_refused(make_cfg, checkpoint):
    with pytest.raises(CheckpointMismatchError, match="trained with method=.*'rank': 4.*rank': 8"):
        run(make_cfg(f"ckpt_path={checkpoint}", "method.rank=8", "method.alpha=8"))


def test_checkpoint_of_another_base_model_is_refused(make_cfg, checkpoint):
    with pytest.raises(CheckpointMismatchError, match="base_model='sdft-random-tiny-seed0'.*seed7"):
        run(make_cfg(f"ckpt_path={checkpoint}", "model.seed=7"))


def test_missing_checkpoint_is_named(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*gone.ckpt.*no such file"):
        run(make_cfg(f"ckpt_path={tmp_path}/gone.ckpt"))


def test_rank_must_be_positive(make_cfg):
    with pytest.raises(ValueError, match="method.rank=0 must be a positive integer"):
        run(make_cfg("method.rank=0"))
