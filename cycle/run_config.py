"""A run folder belongs to one config: a rerun or --resume with other settings is refused.

The folder keeps `config.yaml` (the resolved config) and `run.json` (its hash over the keys that
change results). Keys that cannot change results, where the job runs and how it is tracked, may
differ between the first run and a resume.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from cycle.config import (
    Config,
    ConfigError,
    config_hash,
    dump_yaml,
    flatten,
    validate_config,
)
from cycle.console import log
from cycle.io import atomic_write_json, atomic_write_text, folder_lock
from cycle.layout import RUN_INFO, SAVED_CONFIG

# Where and how a run executes, not what it computes.
NEUTRAL_KEYS = ("output_dir", "run_name", "resources", "tracking", "sweep")


class RunConfigMismatch(ConfigError):
    """The run folder was made with another config."""


def _relevant(cfg: Config) -> dict[str, Any]:
    flat = flatten(cfg.model_dump(mode="json"))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == n or k.startswith(n + ".") for n in NEUTRAL_KEYS)
    }


def result_hash(cfg: Config) -> str:
    sections = [name for name in Config.model_fields if name not in NEUTRAL_KEYS]
    return config_hash(cfg, *sections)


def changed_keys(saved: Config, new: Config) -> list[str]:
    """`key: old -> new` for every result-relevant key that differs."""
    a, b = _relevant(saved), _relevant(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def saved_config(run_dir: str | Path) -> Config | None:
    path = Path(run_dir) / SAVED_CONFIG
    if not path.is_file():
        return None
    try:
        return validate_config(yaml.safe_load(path.read_text()) or {}, source=str(path))
    except (yaml.YAMLError, ConfigError):
        return None  # unreadable: the run's own copy is rewritten, nothing to compare against


def check_run_config(run_dir: str | Path, cfg: Config) -> None:
    """Raise RunConfigMismatch, naming the keys, when `run_dir` was made with another config."""
    run_dir = Path(run_dir)
    saved = saved_config(run_dir)
    if saved is None:
        return
    changes = changed_keys(saved, cfg)
    if changes:
        shown = "\n  ".join(changes[:20]) + (
            f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else ""
        )
        raise RunConfigMismatch(
            f"run {run_dir.name} ({run_dir}) was made with another config; changed:\n  {shown}\n"
            f"resume it as it was with `--resume {run_dir.name}` "
            "and no --config/--set (its config.yaml is used), "
            f"or start a new run with another --run-name"
        )


def record_run_config(run_dir: str | Path, cfg: Config) -> None:
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / SAVED_CONFIG, dump_yaml(cfg))
    info = {
        "config_hash": result_hash(cfg),
        "neutral_keys": list(NEUTRAL_KEYS),
        "written": time.time(),
    }
    atomic_write_json(run_dir / RUN_INFO, info)


def claim_run(root: Path):
    """Hold a run's folder for the block: a second job on the same run is refused at once."""
    return folder_lock(root, f"run {root.name}", wait=False, log=log)
