"""Reading a run folder that may come from anyone (a download, a colleague's share): its
`config.yaml` supplies values only. Which class each part builds (`_target_`) always comes
from sdft's own config groups in `conf/`, so a config.yaml whose `_target_` is `torch.load`,
`builtins.open` or `os.system` is refused before anything is instantiated."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RUN_GROUPS = ("model", "method", "data")  # what a run's settings decide about its adapter


class UntrustedConfigError(ValueError):
    """A run folder's config.yaml names code that is not one of sdft's config options."""


def group_targets(group: str) -> set[str]:
    """The classes and functions that sdft's own options of `group` instantiate."""
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    return {t for f in files if (t := OmegaConf.load(f).get("_target_"))}


def _nested_targets(node: object, where: str) -> list[str]:
    """Keys below the group's top level that would make Hydra instantiate something."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                found.append(where)
            found += _nested_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _nested_targets(value, f"{where}[{i}]")
    return found


def check_values_only(node: object, group: str, source: Path) -> None:
    """Raise UntrustedConfigError unless `node` builds one of sdft's own `group` options."""
    why = "a run folder's config.yaml supplies values only, never code to run"
    if not isinstance(node, DictConfig):
        raise UntrustedConfigError(f"{source}: {group} is not a mapping of settings")
    target, allowed = node.get("_target_"), group_targets(group)
    if target not in allowed:
        raise UntrustedConfigError(
            f"{source}: refused {group}._target_={target!r}, which is not one of sdft's "
            f"{group} options {sorted(allowed)} ({why})"
        )
    values = OmegaConf.to_container(node, resolve=False)
    nested = [w for k, v in values.items() for w in _nested_targets(v, f"{group}.{k}")]
    if nested:
        raise UntrustedConfigError(f"{source}: refused {nested[0]}._target_ ({why})")


def read_run_config(run_dir: Path, groups: tuple[str, ...] = RUN_GROUPS) -> DictConfig | None:
    """The `groups` settings of a run folder's config.yaml, checked to build only sdft's own
    options; None when the folder has no config.yaml."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return None
    try:
        run_cfg = OmegaConf.load(saved)
    except (YAMLError, OmegaConfBaseException) as e:
        raise ValueError(f"{saved}: not a readable config ({type(e).__name__}: {e})") from None
    if isinstance(run_cfg, ListConfig):
        raise ValueError(f"{saved}: not a run config (a list, not a mapping)")
    out = {}
    for group in groups:
        if group in run_cfg:
            check_values_only(run_cfg[group], group, saved)
            out[group] = run_cfg[group]
    return OmegaConf.create(out)
