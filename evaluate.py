"""Evaluate a saved adapter: `python evaluate.py adapter=outputs/scribble/<run>` (see conf/)."""

import hydra
from omegaconf import DictConfig

import sdft.eval.evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    sdft.eval.evaluate.run(cfg)


if __name__ == "__main__":
    main()
