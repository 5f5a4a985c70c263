"""The web UI: `python ui.py` (tiny model, CPU) or `python ui.py model=sd15` (see conf/ui.yaml)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import sdft.ui  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="ui")
def main(cfg: DictConfig) -> None:
    sdft.ui.run(cfg)


if __name__ == "__main__":
    main()
