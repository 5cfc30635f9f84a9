"""What every job shares: --config/--set parsing and a friendly exit on user errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Jobs run as scripts (`python jobs/x.py`, `ray job submit -- python jobs/x.py`): make the package
# importable from a plain checkout without installing it. The jobs folder itself leaves sys.path:
# Ray hands the driver's path to its workers, where `jobs/cycle.py` would shadow the package.
_JOBS = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _JOBS]
sys.path.insert(0, str(_JOBS.parent))

from cycle.config import Config, ConfigError, load_config  # noqa: E402


def config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    return parser


def inprocess_shards_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--inprocess-shards",
        action="store_true",
        help="build shards in this process, not with Ray Data; with --set resources.num_workers=0 "
        "the job needs no Ray at all (e.g. a single GPU box)",
    )
    return parser


def config_from(args: argparse.Namespace) -> Config:
    try:
        # Absolute paths first: Ray Train and Tune run each worker in a folder of its own.
        return load_config(args.config, args.overrides).with_absolute_paths()
    except ConfigError as err:
        sys.exit(f"error: {err}")
