"""Train an adapter: `python train.py +experiment=scribble` (see conf/ for every option)."""

import hydra
from omegaconf import DictConfig

import sdft.train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    sdft.train.run(cfg)


if __name__ == "__main__":
    main()
