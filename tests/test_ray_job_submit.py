"""Ray Jobs and an MLflow server, for real, on loopback: `ray start --head` with the machine's own
CPUs (2 here: no over-declared CPUs), `ray job submit --working-dir . -- python jobs/cycle.py
--config configs/smoke.yaml` in the default config's shape (two architectures side by side, one
Ray Train worker each, Ray Data shards) against a running `mlflow server` (started by
jobs/mlflow_server.sh), then the runs read back through MLflow's REST client. Token auth is on
(a token of the test's own), as the README's recipe sets it. Only what this test started is
stopped."""

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    free_port,
    head_ports,
    kill_processes_naming,
    node_ports,
    short_temp_dir,
    stop,
    wait_for,
)

from cycle.resources import plan_shard_pool

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture()
def ray_head(tmp_path):
    gcs, dashboard = free_port(), free_port()
    # A token of the test's own: `ray start` with RAY_AUTH_MODE=token and no ~/.ray/auth_token
    # (a fresh machine) refuses to start.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_TMPDIR", None)  # the head has a --temp-dir of its own
    temp_dir = short_temp_dir("rayjob-")
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            # Not 127.0.0.1, which Ray rewrites to the outward address: traffic stays on lo.
            "--node-ip-address=127.0.0.2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *head_ports(),
            *node_ports(),
        ],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "ray_head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", head, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        # SIGKILL first: Ray's daemons ignore the SIGTERM that stop() would send and wait out.
        kill_processes_naming(temp_dir)
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address, env, args, runtime_env=None, timeout=900):
    return subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps(runtime_env or {}),
            "--",
            "python",
            "jobs/cycle.py",
            "--config",
            "configs/smoke.yaml",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ray_job_submit_runs_the_smoke_cycle_against_an_mlflow_server(
    tmp_path, mlflow_server, ray_head, smoke_assets
):
    import mlflow

    address, env = ray_head
    out = tmp_path / "out"
    default_shape = ["--set", "resources.num_workers=1", "--set", "cycles.archs=[tinyvgg,resnet18]"]
    submit = _submit(
        address,
        env,
        [*default_shape, *smoke_assets, "--set", f"output_dir={out}", "--run-name", "submitted"],
        {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}},
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-3000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    assert "| tinyvgg | 1 |" in submit.stdout and "| resnet18 | 0 |" in submit.stdout
    assert (out / "submitted" / "report.md").is_file()
    # What `ray start --head` gives (2 on the development machine and in CI), split between the
    # two architectures' builds, which run at once; one node, which nothing joins: no growth.
    cpus = os.cpu_count()
    each = plan_shard_pool({"CPU": cpus / 2}, can_grow=False).describe()
    assert f"Ray Data: {each}" in submit.stdout + submit.stderr

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)  # over HTTP: the REST API
    experiment = client.get_experiment_by_name("cycle-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("job") == "cycle")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "submitted"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # Both cycles of both architectures (the stop rule cannot stop one after its baseline).
    assert sorted((r.data.tags["cycle"], r.data.tags["arch"]) for r in children) == [
        ("0", "resnet18"),
        ("0", "tinyvgg"),
        ("1", "resnet18"),
        ("1", "tinyvgg"),
    ]
    assert all("test_accuracy" in r.data.metrics for r in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "report.md",
        "cycle_curves.png",
    }
    assert (
        client.get_model_version_by_alias("cycle-classifier", "best").run_id == parent.info.run_id
    )

    # A trainer that asks for more CPUs than the cluster has: said and stopped, never a silent wait.
    started = time.time()
    stalled = _submit(
        address,
        env,
        [
            "--set",
            "resources.num_workers=1",
            "--set",
            f"resources.cpus_per_worker={cpus + 1}",
            "--set",
            "resources.stall_timeout_s=15",
            *smoke_assets,
            "--set",
            f"output_dir={out}",
            "--set",
            "tracking.enabled=false",
            "--run-name",
            "too-big",
        ],
        timeout=300,
    )
    said = stalled.stdout + stalled.stderr
    # `ray job submit` itself exits 0 for a failed job; the job's own exit code is in its status.
    assert "failed with exit code 3" in said, said[-3000:]
    assert "made no progress for 1" in said, said[-3000:]
    assert (
        f"it asks for:        {cpus + 1} CPU" in said and f"the cluster has:    {cpus} CPU" in said
    )
    assert time.time() - started < 240
