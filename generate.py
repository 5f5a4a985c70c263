"""Generate images with adapters (see conf/generate.yaml for every option):
`python generate.py prompts='["a scribble of apple <lora:scribble:0.8>"]' lora=[run_dir:0.5]`"""

import hydra
from omegaconf import DictConfig

import sdft.generate


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    sdft.generate.run(cfg)


if __name__ == "__main__":
    main()
