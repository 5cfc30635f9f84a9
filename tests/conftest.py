"""Shared fixtures: a small phantom tree (made once per session) and one shared Ray session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A tiny Kaggle-layout phantom tree: train/val/test/test_cf with masks."""
    from cycle.data.phantom import PhantomSpec, write_dataset

    spec = PhantomSpec.from_config(seed=5, n_train=48, n_val=8, n_test=16, n_test_cf=16, size=96)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token: Ray's token auth is on)
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def stop(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and everything in its group: an
    `mlflow server` leaves its uvicorn workers and job runners behind when only it exits."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is still there
    except ProcessLookupError:
        pass  # the group is gone already
    process.wait()


def start_mlflow_server(root: Path, port: int, log: Path) -> subprocess.Popen:
    """`jobs/mlflow_server.sh` on loopback with its store under `root`; returns once it answers."""
    env = {**os.environ, "MLFLOW_SERVER_ROOT": str(root)}
    server = subprocess.Popen(
        ["bash", str(ROOT / "jobs" / "mlflow_server.sh"), "--port", str(port)],
        cwd=root.parent,
        env=env,
        start_new_session=True,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )
    wait_for(f"http://127.0.0.1:{port}/health", server)
    return server


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow-server", port, tmp_path / "mlflow.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)
