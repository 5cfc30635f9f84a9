"""Everything cheap, first: the checks a job runs before any training, so that a mistake ends
the job in seconds with a message naming it, not after an hour. Imports nothing heavy (torch,
MLflow, Ray) unless a check needs it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cycle.config import PHANTOM_LUNG_MODEL, Config
from cycle.store import store_problem


def input_problem(cfg: Config) -> str | None:
    """What stops this config from running, or None: the data root, the lung model on real
    data, a writable output_dir and Ray storage path, an MLflow server that answers."""
    if cfg.data.root is not None and not Path(cfg.data.root).exists():
        return f"data.root={cfg.data.root} does not exist"
    # lungseg.weights=phantom trains its model from nothing if needed: nothing to check here.
    phantom_model = cfg.lungseg.weights == PHANTOM_LUNG_MODEL
    if (cfg.data.root is not None or cfg.lungseg.weights) and not phantom_model:
        from cycle.lungseg import LungModelMissing, ensure_lung_model  # torch: only when needed

        try:
            # With these set it only checks, never trains.
            ensure_lung_model(cfg, log=lambda *_: None)
        except LungModelMissing as err:
            return str(err)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        return f"output_dir {out} is not writable: {err.strerror or err}"
    storage = cfg.storage_path()
    if "://" not in storage:
        try:
            Path(storage).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"resources.storage_path {storage} is not writable: {err.strerror or err}"
    return store_problem(cfg)
