"""Shared fixtures: a small phantom tree, the smoke job's run (its phantoms and lung U-Net reused by
every job a test starts) and one shared Ray session, each made once per session; and the fences
that keep a test run to itself: no caller's cluster, tracking server or storage, a Ray temp dir
of each test's own, no MLflow state carried from one test to the next."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# What points a process at the caller's cluster, tracking server, storage or fault injection. Gone
# from this process, so from every job a test starts: a developer whose shell names a cluster or a
# server runs the suite without a test killing a driver there or logging into it. A test that
# needs one sets its own.
CALLERS_ENVIRONMENT = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_TMPDIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "CYCLE_STORAGE_PATH",
    "CYCLE_KILL_AT",
    "CYCLE_HOLD_AT",
    "CYCLE_HOLD_FILE",
    "CYCLE_RELEASE_FILE",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The suite's S3: moto's server on loopback (the `s3` fixture starts it on this port when a test
# needs it). Named here, before any Ray starts, so every Ray worker and job has it too.
S3_ENDPOINT = f"http://127.0.0.1:{_unused_port()}"
# And the suite's own: a local `ray.init()` turns token auth on and, finding no token, writes one
# to ~/.ray/auth_token; with this one in the environment it writes nothing there. The S3 API
# that pyarrow (Ray's storage), boto3 and MLflow's artifact client talk to is the suite's own,
# with its made-up keys: no test can reach a real bucket.
SUITE_ENVIRONMENT = {
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
    "AWS_ENDPOINT_URL": S3_ENDPOINT,
    "MLFLOW_S3_ENDPOINT_URL": S3_ENDPOINT,
    "AWS_ACCESS_KEY_ID": "suite",
    "AWS_SECRET_ACCESS_KEY": "suite",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-profile lookups on a laptop
}


def _suite_environment() -> None:
    for name in CALLERS_ENVIRONMENT:
        os.environ.pop(name, None)
    os.environ.update(SUITE_ENVIRONMENT)


_suite_environment()


def short_temp_dir(prefix: str) -> str:
    """A folder for a Ray session. Short, under /tmp: Ray's Unix sockets sit at
    `<temp dir>/session_<time>_<pid>/sockets/plasma_store`, a socket path over 107 bytes cannot be
    bound, and a pytest tmp_path (`/tmp/pytest-of-<user>/pytest-<n>/<test name>/`) makes one."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def kill_processes_naming(text: str) -> None:
    """SIGKILL every process whose command line or environment names `text` (a Ray temp dir), and
    its children: Ray's daemons ignore SIGTERM, and those of a job killed by a test outlive it."""
    from local_cluster import kill_tree_naming

    kill_tree_naming(text)


CACHES = {".pytest_cache", ".ruff_cache", "__pycache__", ".hypothesis", ".benchmarks"}
STORES = {"mlruns", "mlflow.db", "outputs", "mlartifacts"}  # what a stray job leaves in its cwd


def _checkout_entries() -> dict[str, int]:
    """The checkout's top-level names, with the modification time of those a job would write."""
    return {
        p.name: (p.stat().st_mtime_ns if p.name in STORES else 0)
        for p in ROOT.iterdir()
        if p.name not in CACHES
    }


@pytest.fixture(scope="session", autouse=True)
def nothing_written_outside_the_tests():
    """Every test writes under its own tmp: no MLflow store, artifacts or outputs appear in (or
    change) the checkout, whichever folder the suite runs from, and no Ray token in ~/.ray."""
    token = Path.home() / ".ray" / "auth_token"
    before, had_token = _checkout_entries(), token.exists()
    yield
    after = _checkout_entries()
    changed = sorted(name for name in after if before.get(name) != after[name])
    assert not changed, f"the test run wrote into the checkout: {changed}"
    assert had_token or not token.exists(), f"the test run wrote {token}"


@pytest.fixture(autouse=True)
def own_ray_temp_dir(monkeypatch):
    """Every local Ray a job of this test starts (`ray.init` reads $RAY_TMPDIR) lives in a folder
    of the test's own, and goes with the test: nothing piles up under /tmp/ray, and two suites on
    one machine never share a session folder."""
    temp_dir = short_temp_dir("rt-")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    try:
        yield temp_dir
    finally:
        if os.listdir(temp_dir):
            kill_processes_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_mlflow_state_between_tests():
    """A tracking URI or experiment set, or a run left active, by one test does not reach the next
    test, nor the jobs it starts: `mlflow.set_tracking_uri` and `set_experiment` also export
    $MLFLOW_TRACKING_URI and $MLFLOW_EXPERIMENT_ID to every later subprocess."""
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        import mlflow.tracking.fluent

        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # MLflow's own default again, the variable unset
        mlflow.set_registry_uri(None)  # the registry follows the tracking URI again
        mlflow.tracking.fluent._active_experiment_id = None
    temp_dir = os.environ.get("RAY_TMPDIR")  # own_ray_temp_dir's, put back by monkeypatch
    _suite_environment()
    if temp_dir is not None:
        os.environ["RAY_TMPDIR"] = temp_dir


def pytest_collection_modifyitems(items):
    """The tests on the shared in-process Ray run last, together: it is started once, and no other
    test's Ray runs beside it."""
    items.sort(key=lambda item: "ray_session" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A tiny Kaggle-layout phantom tree: train/val/test/test_cf with masks."""
    from cycle.data.phantom import PhantomSpec, write_dataset

    spec = PhantomSpec.from_config(seed=5, n_train=48, n_val=8, n_test=16, n_test_cf=16, size=96)
    return write_dataset(tmp_path_factory.mktemp("phantoms"), spec, workers=1)


def run_job(script: str, args: list[str], cwd: Path, timeout: float = 600, env=None):
    """`python jobs/<script> ARGS` from `cwd`, as a user starts it; its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


SMOKE = ["--config", str(ROOT / "configs" / "smoke.yaml")]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`jobs/cycle.py --config configs/smoke.yaml` from nothing (phantoms and lung U-Net made on
    first use), tracked in a SQLite store of its own: (output dir, store, the finished process)."""
    out = tmp_path_factory.mktemp("cycle")
    db = out / "mlflow.db"
    sets = ["--set", f"output_dir={out}", "--set", f"tracking.uri=sqlite:///{db}"]
    proc = run_job("cycle.py", [*SMOKE, *sets, "--run-name", "smoke"], out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, db, proc


@pytest.fixture(scope="session")
def smoke_assets(smoke_run) -> list[str]:
    """`--set` flags that hand a job the smoke run's phantoms and lung U-Net: every later job of
    the smoke config reuses them instead of making its own."""
    out = smoke_run[0]
    (lung_model,) = (out / "lungseg").glob("*/best.pt")
    return [
        "--set",
        f"data.phantom.out_dir={out / 'phantoms'}",
        "--set",
        f"lungseg.weights={lung_model}",
    ]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it: starting Ray on 2 cores takes tens of seconds."""
    import ray

    temp_dir = short_temp_dir("rs-")
    # Its processes must not carry the $RAY_TMPDIR of the test that happens to start it: that
    # test's clean-up kills whatever does.
    test_temp_dir = os.environ.pop("RAY_TMPDIR", None)
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,  # over-declared on purpose: see shared/RAY_NOTES.md (2-CPU deadlocks)
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
            _temp_dir=temp_dir,
        )
    if test_temp_dir is not None:
        os.environ["RAY_TMPDIR"] = test_temp_dir
    yield ray
    ray.shutdown()
    kill_processes_naming(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """`ray start` flags naming every port a node binds, each a free one: Ray's defaults (52365 for
    the dashboard agent, and so on) collide with a second suite's nodes, or a developer's Ray.
    Workers bind ports of the kernel's choosing (no --min-worker-port)."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def head_ports() -> list[str]:
    """The ports only a head binds, besides --port and --dashboard-port (the caller's)."""
    return [f"--ray-client-server-port={free_port()}"]


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


def start_mlflow_server(
    root: Path, port: int, log: Path, artifacts: str | None = None
) -> subprocess.Popen:
    """`jobs/mlflow_server.sh` on loopback with its store under `root` (its artifacts there too,
    or at `artifacts`, an s3:// URI of the suite's S3); returns once it answers."""
    env = {**os.environ, "MLFLOW_SERVER_ROOT": str(root)}
    where = ["--artifacts", artifacts] if artifacts else []
    server = subprocess.Popen(
        # One worker: each of MLflow's default four loads MLflow (seconds of CPU on 2 cores).
        [
            "bash",
            str(ROOT / "jobs" / "mlflow_server.sh"),
            "--port",
            str(port),
            "--workers",
            "1",
            *where,
        ],
        cwd=root.parent,
        env=env,
        start_new_session=True,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )
    wait_for(f"http://127.0.0.1:{port}/health", server)
    return server


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server at S3_ENDPOINT for the session (a real S3 API over HTTP, in a process of
    its own), and a function that makes a new empty bucket and returns its name."""
    import boto3

    log = tmp_path_factory.mktemp("s3") / "moto.log"
    port = S3_ENDPOINT.rsplit(":", 1)[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
        start_new_session=True,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(S3_ENDPOINT, timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto's S3 server did not start; see {log}") from None
            time.sleep(0.3)
    client = boto3.client("s3", endpoint_url=S3_ENDPOINT)
    made = []

    def bucket(name: str) -> str:
        name = f"{name}-{len(made)}"
        client.create_bucket(Bucket=name)
        made.append(name)
        return name

    bucket.client = client
    try:
        yield bucket
    finally:
        stop(server)


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow-server", port, tmp_path / "mlflow.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)
