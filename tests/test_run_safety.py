"""The pieces that keep a run honest, without Ray: absolute paths, resource sizing, the stall
watchdog, one config per run folder, folder locks, and fixed-size inference batches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle.config import load_config
from cycle.io import LockHeld, folder_lock
from cycle.resources import (
    MAX_SHARD_ACTORS,
    decide_gpu,
    nodes_can_join,
    plan_shard_pool,
    trainer_cpus,
    trainer_request,
    waiting_message,
)
from cycle.run_config import RunConfigMismatch, changed_keys, check_run_config, record_run_config
from cycle.watchdog import Watchdog

ROOT = Path(__file__).resolve().parent.parent


def test_every_path_in_the_config_becomes_absolute(tmp_path):
    cfg = load_config(
        overrides=[
            "data.root=films",
            "data.phantom.out_dir=ph",
            "model.weights_path=w.pt",
            "lungseg.weights=~/lung.pt",
            "resources.storage_path=s3://bucket/x",
        ]
    )
    out = cfg.with_absolute_paths(tmp_path)
    assert out.output_dir == str(tmp_path / "outputs")
    assert out.data.root == str(tmp_path / "films")
    assert out.data.phantom.out_dir == str(tmp_path / "ph")
    assert out.model.weights_path == str(tmp_path / "w.pt")
    assert out.lungseg.weights == str(Path("~/lung.pt").expanduser())
    assert out.resources.storage_path == "s3://bucket/x"  # a URI is left alone
    assert out.with_absolute_paths("/elsewhere") == out  # idempotent


@pytest.mark.parametrize(
    "cluster, expect",
    [
        # A 2-CPU `ray start --head`: one actor, one CPU left for the read/decode tasks.
        ({"CPU": 2.0}, (1, 1.0, 1.0)),
        # The local Ray's 4 declared CPUs: 3 actors + the tasks' CPU.
        ({"CPU": 4.0}, (3, 1.0, 1.0)),
        # A 64-CPU node: at most 8 actors, more threads each.
        ({"CPU": 64.0}, (8, 7.0, 1.0)),
        # One CPU: halves, so both kinds of work can be scheduled.
        ({"CPU": 1.0}, (1, 0.5, 0.5)),
        # A head with 0 CPUs and workers that scale from zero: one actor, the autoscaler adds a
        # node.
        ({"CPU": 0.0}, (1, 1.0, 1.0)),
    ],
)
def test_shard_pool_never_takes_every_cpu(cluster, expect):
    pool = plan_shard_pool(cluster)
    assert (pool.actors, pool.cpus_per_actor, pool.task_cpus) == expect
    if cluster["CPU"] > 0:
        assert pool.actors * pool.cpus_per_actor + pool.task_cpus <= cluster["CPU"]


def test_shard_pool_on_gpus_and_with_a_cap():
    pool = plan_shard_pool({"CPU": 16.0, "GPU": 2.0}, gpus_per_actor=0.5)
    assert pool.actors == 4 and pool.gpus_per_actor == 0.5
    # A job that asks for GPUs on a cluster with none yet (GPU workers from zero): one actor
    # asks for one and the autoscaler adds a node; it never falls back to CPUs silently.
    waiting = plan_shard_pool({"CPU": 16.0}, gpus_per_actor=0.5)
    assert (waiting.actors, waiting.gpus_per_actor) == (1, 0.5)
    assert plan_shard_pool({"CPU": 0.0}, gpus_per_actor=1.0).gpus_per_actor == 1.0
    assert plan_shard_pool({"CPU": 16.0, "GPU": 2.0}).gpus_per_actor == 0.0  # not asked: none
    assert plan_shard_pool({"CPU": 16.0}, wanted=2).actors == 2


def test_trainers_side_by_side_leave_room_to_decode_their_films():
    # `ray start --head` on 2 cores: two 1-CPU trainers would leave their Ray Data decode tasks
    # nothing (a silent hang); each asks for a little less.
    assert trainer_cpus(1.0, 2, 2.0) == 0.75
    assert trainer_cpus(2.0, 1, 2.0) == 1.75
    # Room enough, or the cluster still at zero: what was asked.
    assert trainer_cpus(1.0, 2, 4.0) == 1.0 and trainer_cpus(1.5, 2, 4.0) == 1.5
    assert trainer_cpus(1.0, 2, 0.0) == 1.0
    # Asked for more than there is: unchanged, so that the stall watchdog names the request.
    assert trainer_cpus(3.0, 1, 2.0) == 3.0


def test_the_shard_pool_grows_onto_nodes_that_join_unless_its_size_is_fixed():
    # A head of 0 CPUs (workers from zero): one actor to start, room to grow as nodes join.
    empty = plan_shard_pool({"CPU": 0.0})
    assert (empty.actors, empty.max_actors) == (1, MAX_SHARD_ACTORS)
    assert "up to 8 as nodes join" in empty.describe()
    assert plan_shard_pool({"CPU": 4.0}).max_actors == MAX_SHARD_ACTORS
    fixed = plan_shard_pool({"CPU": 16.0}, wanted=2)
    assert (fixed.actors, fixed.max_actors) == (2, 2) and "join" not in fixed.describe()
    assert plan_shard_pool({"CPU": 0.0}, wanted=3).max_actors == 3
    # A local Ray, which nothing joins: the pool stays at its start (actors added there only
    # take the CPUs of the read tasks and the other builds, each with a torch start).
    local = plan_shard_pool({"CPU": 4.0}, can_grow=False)
    assert (local.actors, local.max_actors) == (3, 3) and "join" not in local.describe()
    assert plan_shard_pool({"CPU": 1.0}, can_grow=False).max_actors == 1


def test_a_pool_may_grow_on_a_cluster_of_nodes_or_under_a_head_that_schedules_nothing():
    def node(name, cpus, alive=True):
        return {"NodeID": name, "Alive": alive, "Resources": {"CPU": cpus} if cpus else {}}

    assert not nodes_can_join([node("me", 2.0)], "me")  # `ray start --head`, ray.init()
    assert not nodes_can_join([node("me", 2.0), node("gone", 2.0, alive=False)], "me")
    assert nodes_can_join([node("me", 0.0)], "me")  # cluster.yaml's head, before workers come
    assert nodes_can_join([node("me", 2.0), node("w1", 2.0)], "me")


def test_gpus_are_decided_once_and_said_never_silently_dropped():
    head_only = {"CPU": 0.0}  # a CPU-less head, GPU workers that scale from zero
    assert decide_gpu(True, head_only)[0] is True  # waits for the autoscaler
    assert decide_gpu(False, {"CPU": 8.0, "GPU": 4.0})[0] is False
    assert decide_gpu("auto", {"CPU": 8.0, "GPU": 4.0}) == (
        True,
        "GPUs: 4 in the cluster, used (resources.use_gpu=auto)",
    )
    use, line = decide_gpu("auto", head_only)
    assert use is False and "run on CPUs" in line and "resources.use_gpu=true" in line


def test_trainer_request_and_the_waiting_message():
    request = trainer_request(2, 1.0, 1.0, use_gpu=True)
    assert request == {"CPU": 2.0, "GPU": 2.0}
    message = waiting_message("training x", 61, request, {"CPU": 2.0}, {"CPU": 0.0}, "add GPUs")
    assert (
        "2 CPU, 2 GPU" in message
        and "2 CPU in all, 0 CPU free" in message
        and "add GPUs" in message
    )


def test_watchdog_names_the_stall_and_stops_only_when_stalled():
    fired = []
    with Watchdog(
        "x", 0.3, describe=lambda waited: f"waited {waited:.1f}", on_stall=fired.append, poll_s=0.05
    ) as dog:
        for _ in range(8):  # beating: no stall
            time.sleep(0.1)
            dog.beat()
        assert not fired
        time.sleep(0.6)
    assert len(fired) == 1 and fired[0].startswith("waited")

    vetoed = []
    with Watchdog(
        "y", 0.2, describe=str, stalled=lambda: False, on_stall=vetoed.append, poll_s=0.05
    ):
        time.sleep(0.5)  # no beats, but the veto says it is working (e.g. a long epoch)
    assert not vetoed


def test_watchdog_default_ends_the_process_with_the_message():
    code = (
        f"import time, sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from cycle.watchdog import Watchdog\n"
        "with Watchdog('s', 0.2, describe=lambda w: 'the stage waits for 3 CPU', poll_s=0.05):\n"
        "    time.sleep(30)\n"
    )
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "error: the stage waits for 3 CPU" in proc.stderr
    assert time.time() - started < 20


def test_a_run_folder_refuses_another_config(tmp_path):
    cfg = load_config()
    record_run_config(tmp_path, cfg)
    check_run_config(tmp_path, cfg)  # the same: fine
    # Where and how it runs may change between the first run and a resume.
    check_run_config(
        tmp_path,
        load_config(
            overrides=["resources.num_workers=0", "tracking.enabled=false", "output_dir=/else"]
        ),
    )
    changed = load_config(overrides=["train.lr=0.01", "cycles.archs=[resnet18]"])
    with pytest.raises(RunConfigMismatch) as err:
        check_run_config(tmp_path, changed)
    assert "train.lr: 0.001 -> 0.01" in str(err.value) and "cycles.archs" in str(err.value)
    assert "--resume" in str(err.value) and "--run-name" in str(err.value)
    assert changed_keys(cfg, changed) == [
        "cycles.archs: ['tinyvgg', 'resnet18'] -> ['resnet18']",
        "train.lr: 0.001 -> 0.01",
    ]


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
            "from cycle.io import folder_lock\n"
            f"with folder_lock({str(folder)!r}, 'run', wait=False):\n"
            "    print('held', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"in use by process {holder.pid}"):
            with folder_lock(folder, "run", wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    said = []
    with folder_lock(folder, "run", wait=False, log=said.append):  # the kernel released it on death
        pass
    assert len(said) == 1 and f"left by process {holder.pid}" in said[0]
    said.clear()
    with folder_lock(folder, "run", wait=False, log=said.append):  # a clean release leaves nothing
        pass
    assert not said


def test_inference_does_not_depend_on_how_many_films_come_together():
    """CPU convolutions round differently at other batch sizes: the shard builder must give a
    film the same CAM and lung mask whether Ray Data batched it with 7 films or 32."""
    from cycle.cam import compute_cam
    from cycle.lungseg.masks import predict
    from cycle.lungseg.unet import build_unet
    from cycle.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", image_size=64).eval()
    x = torch.randn(40, 1, 64, 64)
    whole = compute_cam(model, x, batch_size=16)
    alone = torch.cat([compute_cam(model, x[i : i + 1], batch_size=16) for i in range(0, 40, 5)])
    assert torch.equal(whole[::5], alone)

    unet = build_unet().eval()
    unet.image_size = 64
    rng = np.random.default_rng(0)
    films = [rng.integers(0, 255, (80, 80), dtype=np.uint8) for _ in range(20)]
    with torch.no_grad():
        together = predict(unet, films, batch_size=8, clean=False)
        one_by_one = [predict(unet, [f], batch_size=8, clean=False)[0] for f in films[:5]]
    for a, b in zip(together, one_by_one):
        assert np.array_equal(a, b)


def test_relative_output_dir_is_resolved_by_the_jobs(tmp_path):
    """What a Train worker receives: absolute paths, from the folder the job was started in."""
    code = (
        "import sys; sys.path.insert(0, {!r}); import _common, argparse\n"
        "p = _common.config_arguments(argparse.ArgumentParser())\n"
        "print(_common.config_from(p.parse_args(['--set', 'output_dir=rel/out']))"
        ".output_dir)\n".format(str(ROOT / "jobs"))
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path.resolve() / "rel" / "out")


def test_a_server_that_answers_health_but_refuses_the_jobs_host_fails_fast(tmp_path):
    """MLflow 3 answers /health to any Host header but 403 to API calls from a name not in
    --allowed-hosts (a Kubernetes service name, say): the preflight asks a real endpoint."""
    from conftest import free_port, stop, wait_for

    from cycle.store import store_problem

    port = free_port()
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
            "--allowed-hosts",
            f"mlflow.example.svc:{port}",
        ],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        cfg = load_config(None, [f"tracking.uri=http://127.0.0.1:{port}"])
        problem = store_problem(cfg)
        assert problem and "403" in problem and "--allowed-hosts" in problem, problem
    finally:
        stop(server)


def test_a_checkpoint_bucket_that_cannot_be_written_is_refused_before_anything_starts(
    tmp_path, s3, own_ray_temp_dir
):
    """The preflight writes, reads back and deletes one object where Ray Train will keep its
    checkpoints (the suite's moto S3): a bucket that works is left as it was; one that does not
    exist ends the job before any training or Ray, naming it."""
    from conftest import SMOKE, run_job

    from cycle.preflight import uri_storage_problem

    good = s3("checkpoints")
    assert uri_storage_problem(f"s3://{good}/ray") is None
    left = s3.client.list_objects_v2(Bucket=good).get("Contents", [])
    assert not [o["Key"] for o in left if "preflight" in o["Key"]]  # the probe is gone
    problem = uri_storage_problem("s3://no-such-bucket-of-the-suite/ray")
    assert "no-such-bucket-of-the-suite" in problem and "not writable" in problem

    proc = run_job(
        "cycle.py",
        [
            *SMOKE,
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "resources.storage_path=s3://no-such-bucket-of-the-suite/ray",
        ],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "resources.storage_path s3://no-such-bucket-of-the-suite/ray is not writable" in (
        proc.stderr
    ), proc.stderr[-2000:]
    assert "training" not in proc.stdout + proc.stderr
    assert not os.listdir(own_ray_temp_dir)  # refused before Ray started
