"""Shared fixtures: a small phantom tree (made once per session) and one shared Ray session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A tiny Kaggle-layout phantom tree: train/val/test/test_cf with masks."""
    from cycle.data.phantom import PhantomParams, PhantomSpec, write_dataset

    spec = PhantomSpec(seed=5, n_train=48, n_val=8, n_test=16, n_test_cf=16, params=PhantomParams(size=96))
    return write_dataset(tmp_path_factory.mktemp("phantoms"), spec, workers=1)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it: starting Ray on 2 cores takes tens of seconds."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,  # over-declared on purpose: see shared/RAY_NOTES.md (2-CPU deadlocks)
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray
    ray.shutdown()
