"""Which categories the tiny base may learn ("base") and which it must never see ("new"):
"new" is every category that `+experiment=scribble` can pick from the repo's sample (its 70
trained and 30 held-out), so the scribble LoRA's study on `model=tiny_qd` is about drawings the
base has never seen; "base" is every other category of the training data."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from sdft.data.quickdraw import QuickDrawDataModule

ROOT = Path(__file__).resolve().parents[3]


def scribble_categories(sample: Path = ROOT / "data" / "quickdraw") -> list[str]:
    """The 100 categories `python train.py +experiment=scribble` picks from `sample`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "+experiment=scribble",
                f"data.path={sample}",
                "paths.root_dir=.",
                "paths.output_dir=.",
            ],
        )
    data = instantiate(cfg.data)
    trained, held_out = data.choose_categories(data.category_files())
    return sorted(trained + held_out)


def category_split(data_path: str | Path) -> dict[str, list[str]]:
    """{"base": categories of `data_path` the base learns, "new": the scribble study's}."""
    new = scribble_categories()
    have = QuickDrawDataModule(str(data_path)).category_files()
    return {"base": sorted(set(have) - set(new)), "new": new}
