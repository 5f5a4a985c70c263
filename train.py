"""Train an adapter: `python train.py +experiment=scribble` (see conf/ for every option)."""

import hydra
from omegaconf import DictConfig

import sdft.sweep
import sdft.train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # the value of cfg.optimized_metric, for sweeps; in a sweep a failed trial is recorded
    return sdft.sweep.run_trial(sdft.train.run, cfg)


if __name__ == "__main__":
    main()
