"""RUN/config.yaml: the run's own configuration, read as the base of every stage and rewritten on a
change."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config.load import load_config, load_yaml
from ..config.schema import INVOCATION_KEYS, Config, all_keys, get_key
from ..config.values import diff_values, run_config_dict
from ..errors import ConfigError
from ..fileio import atomic_open

RUN_CONFIG = "config.yaml"


# ----------------------------------------------------------------------------- the run's configuration


def read_run_config(run_dir: Path) -> dict | None:
    """``RUN/config.yaml`` as a mapping, None when the run has none yet."""
    p = run_dir / RUN_CONFIG
    if not p.is_file():
        return None
    try:
        data = load_yaml(p.read_text(encoding="utf-8"), str(p))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p} is unreadable ({e.__class__.__name__}): fix it or delete it to start the run's "
                          "configuration again from -c files") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def write_run_config(run_dir: Path, cfg: Config) -> None:
    """Write ``RUN/config.yaml`` atomically (invocation keys left out, secrets redacted)."""
    text = ("# The run's configuration: a stage given only --run uses it; -c files and key=value overrides\n"
            "# change it (the stage says which keys changed and which stages that makes out of date).\n"
            + yaml.safe_dump(run_config_dict(cfg), sort_keys=False, default_flow_style=False))
    with atomic_open(run_dir / RUN_CONFIG) as fh:
        fh.write(text)


def run_config_changes(saved: dict | None, cfg: Config) -> list[str]:
    """``["lut.tolerance: 0.005 -> 0.01", ...]``: what ``cfg`` changes in the saved run configuration."""
    if saved is None:
        return []
    base = load_config(base=saved) if saved else Config()
    keys = [k for k in all_keys() if k not in INVOCATION_KEYS]
    old = {k: get_key(base, k) for k in keys}
    new = {k: get_key(cfg, k) for k in keys}
    return diff_values(old, new)
