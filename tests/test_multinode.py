"""A cluster of several nodes on this machine, as in cluster.yaml: a head that schedules nothing
(`--num-cpus=0`) and worker nodes of 2 CPUs that join later with `ray start --address`, each with
its own temp dir, on loopback. Jobs go in with `ray job submit --working-dir .`, as a user sends
them; where things ran is read from Ray's state API.

  (d) a job submitted before any worker node exists waits, and runs once nodes join;
  (a) its two architectures train side by side, each trainer's worker on a different node;
  (b) one architecture with two Ray Train workers: DDP (gloo) across the two nodes;
  (c) a worker node SIGKILLed mid-epoch and started again: the run resumes from Ray's storage;
  (e) a sweep whose two trials run on the two nodes at once;
  (f) a node that joins while the shard build runs gets shard actors, and writes shards.

Where the work that grows with the films ran is read from the files that say it (the CAMs and the
probe of each trainer's chosen weights: localized.json; each shard file: the manifest) and from
Ray's state API: on the worker nodes, never in the driver on the head.

Each trainer asks for 1.5 CPUs of a worker node's 2, so two trainers (or trials) at once must be
on two nodes, and each node keeps room for the Ray Data tasks that read and decode its films.
The jobs share one output_dir, and reuse the phantoms and lung U-Net of the session's smoke run
(`smoke_assets`), as they would reuse those the first job on a cluster made."""

import json
import math
import time
from pathlib import Path

import pytest
from local_cluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Each trainer takes most of a 2-CPU worker node: two cannot share one.
ONE_NODE_EACH = ["--set", "resources.cpus_per_worker=1.5"]
REQUEST = "Requesting resources: {'CPU': 1.5} * 1"  # a Ray Train controller asking for a worker


def cycle_job(out: Path, assets: list[str], run: str, *sets: str) -> list[str]:
    return [
        "python",
        "jobs/cycle.py",
        "--config",
        "configs/smoke.yaml",
        "--set",
        f"output_dir={out}",  # absolute: a relative one lands in the job's copy of the checkout
        "--set",
        "tracking.enabled=false",
        *assets,
        *ONE_NODE_EACH,
        *sets,
        "--run-name",
        run,
    ]


def wait_until(what: str, check, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)  # a look is one request to the dashboard
    raise TimeoutError(what)


def train_dir(out: Path, run: str, k: int, arch: str) -> Path:
    return out / run / f"cycle_{k}" / arch / "train"


def read_json(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start_head()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def from_zero(cluster, out, smoke_assets):
    """The default's shape (two architectures, one Ray Train worker each) submitted to the head
    alone; the worker nodes join once the job waits for them."""
    assert [n for n in cluster.nodes if n != "head"] == []
    cluster.submit(
        "from-zero",
        cycle_job(
            out,
            smoke_assets,
            "from-zero",
            "--set",
            "resources.num_workers=1",
            "--set",
            "cycles.archs=[tinyvgg,resnet18]",
        ),
    )
    # Waiting, on evidence: both trainers have asked Ray for their worker and neither has one.
    wait_until(
        "both trainers ask for a worker",
        lambda: cluster.logs_of("from-zero").count(REQUEST) == 2,
        timeout=600,
    )
    waiting = cluster.logs_of("from-zero"), cluster.status("from-zero")
    cluster.add_workers("w1", "w2")
    status, logs = cluster.wait("from-zero")
    return {"status": status, "logs": logs, "waiting_logs": waiting[0], "waiting": waiting[1]}


def test_d_a_job_submitted_before_any_worker_node_waits_then_runs(from_zero, out):
    assert from_zero["waiting"] == "RUNNING"
    # It had asked for its trainers and none had started: nothing in the cluster had a CPU.
    assert REQUEST in from_zero["waiting_logs"]
    assert "training done" not in from_zero["waiting_logs"]
    assert from_zero["status"] == "SUCCEEDED", from_zero["logs"][-5000:]
    assert (out / "from-zero" / "report.md").is_file()
    assert "| resnet18 | 1 |" in from_zero["logs"]


def test_a_two_architectures_train_side_by_side_on_two_nodes(from_zero, cluster, out):
    assert from_zero["status"] == "SUCCEEDED", from_zero["logs"][-5000:]
    # Side by side: both trainers asked for their worker before either had one.
    assert from_zero["waiting_logs"].count(REQUEST) == 2
    for k in (0, 1):
        nodes = {}
        for arch in ("tinyvgg", "resnet18"):
            reads = read_json(train_dir(out, "from-zero", k, arch) / "reads-rank0.json")
            node = cluster.node_of(reads["pid"], "RayTrainWorker")  # Ray's state API
            assert node == reads["node_id"]
            nodes[arch] = cluster.name_of(node)
            # The CAMs, lung masks and probe of its chosen weights: measured by the same worker.
            localized = read_json(train_dir(out, "from-zero", k, arch) / "localized.json")
            assert (localized["pid"], localized["node_id"]) == (reads["pid"], node)
        assert sorted(nodes.values()) == ["w1", "w2"], f"cycle {k}: {nodes}"
    # Cycle 1's shards were written by Ray Data actors on the worker nodes, none on the head.
    for arch in ("tinyvgg", "resnet18"):
        manifest = read_json(
            out / "from-zero" / "cycle_1" / arch / "shards" / "data" / "manifest.json"
        )
        writers = {cluster.name_of(shard["node_id"]) for shard in manifest["shards"]}
        assert writers and writers <= {"w1", "w2"}, writers


def test_b_ddp_across_two_nodes_reads_disjoint_data(from_zero, cluster, out, smoke_assets):
    cluster.submit(
        "ddp",
        cycle_job(
            out,
            smoke_assets,
            "ddp",
            "--set",
            "resources.num_workers=2",
            "--set",
            "cycles.archs=[tinyvgg]",
            "--set",
            "cycles.max=0",
        ),
    )
    status, logs = cluster.wait("ddp")
    assert status == "SUCCEEDED", logs[-5000:]
    # One process group (gloo on CPUs) over both workers: each rank says so once it is formed.
    assert all(f"DDP: rank {r} of 2 workers (gloo)" in logs for r in (0, 1)), logs[-5000:]

    stage = train_dir(out, "ddp", 0, "tinyvgg")
    ranks = [read_json(stage / f"reads-rank{r}.json") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    nodes = {cluster.node_of(r["pid"], "RayTrainWorker") for r in ranks}
    assert nodes == {r["node_id"] for r in ranks} and len(nodes) == 2
    films = [set(r["films"]) for r in ranks]
    n = ranks[0]["of"]
    assert not films[0] & films[1]  # disjoint parts
    assert len(films[0]) == len(films[1]) == n // 2 and len(films[0] | films[1]) == n - n % 2

    # Within noise of one worker (the same config's cycle 0 in the from-zero job).
    # Three standard errors of a difference of two accuracies on the same test films.
    one = read_json(train_dir(out, "from-zero", 0, "tinyvgg") / "metrics.json")["splits"]["test"]
    two = read_json(stage / "metrics.json")["splits"]["test"]
    p = one["accuracy"]
    noise = 3 * math.sqrt(max(p * (1 - p), 0.05) * 2 / one["n"])
    assert abs(two["accuracy"] - p) <= noise, (one, two)


def test_c_a_node_killed_mid_epoch_resumes_from_ray_storage(
    from_zero, cluster, out, tmp_path, smoke_assets
):
    hold = tmp_path / "held"
    # 144 training films in batches of 32: 5 steps an epoch; step 7 is in the middle of epoch 2.
    cluster.submit(
        "killed",
        cycle_job(
            out,
            smoke_assets,
            "killed",
            "--set",
            "resources.num_workers=1",
            "--set",
            "cycles.archs=[tinyvgg]",
            "--set",
            "cycles.max=0",
            "--set",
            "train.epochs=3",
            "--set",
            "train.early_stopping_patience=5",
        ),
        env_vars={"CYCLE_HOLD_AT": "train:step@7", "CYCLE_HOLD_FILE": str(hold)},
    )
    # The file is written whole (its pid) before the worker holds: no pause needed after it.
    wait_until("the worker is held mid-epoch", lambda: hold.is_file() and hold.read_text(), 600)
    held_pid = int(hold.read_text())
    victim = cluster.name_of(cluster.node_of(held_pid, "RayTrainWorker"))
    stage = train_dir(out, "killed", 0, "tinyvgg")
    assert [line.split()[0] for line in (stage / "epochs.log").read_text().splitlines()] == ["1"]
    cluster.kill(victim)
    cluster.add_workers(victim)  # the machine comes back

    status, logs = cluster.wait("killed")
    assert status == "SUCCEEDED", logs[-5000:]
    ran = [line.split() for line in (stage / "epochs.log").read_text().splitlines()]
    assert [int(e) for e, _ in ran] == [1, 2, 3], ran  # none lost, none repeated
    assert int(ran[0][1]) == held_pid and int(ran[1][1]) != held_pid
    started = read_json(stage / "started.json")
    assert started["resume_source"] == "Ray storage checkpoint", started
    assert started["resumed_after_epoch"] == 1
    assert [row["epoch"] for row in read_json(stage / "history.json")] == [1, 2, 3]


def test_e_a_sweep_runs_two_trials_on_two_nodes_at_once(
    from_zero, cluster, out, tmp_path, smoke_assets
):
    space = tmp_path / "two.yaml"
    space.write_text("enhance.strength: {grid_search: [0.5, 1.0]}\n")
    cluster.submit(
        "sweep",
        [
            "python",
            "jobs/sweep.py",
            "--space",
            str(space),
            "--config",
            "configs/smoke.yaml",
            "--set",
            f"output_dir={out}",
            "--set",
            "tracking.enabled=false",
            "--set",
            "sweep.cpus_per_trial=2",
            "--set",
            "sweep.max_concurrent_trials=2",
            *smoke_assets,
            "--name",
            "two",
        ],
    )
    status, logs = cluster.wait("sweep")
    assert status == "SUCCEEDED", logs[-5000:]
    results = sorted((out / "ray" / "sweep-two").glob("*/result.json"))
    assert len(results) == 2, results
    spans = []  # (node, start, end) of each trial, from Tune's own results
    for path in results:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        node = cluster.name_of(cluster.node_of(rows[0]["pid"], "ImplicitFunc"))
        start = rows[0]["timestamp"] - rows[0]["time_this_iter_s"]
        spans.append((node, start, rows[-1]["timestamp"]))
    (node_a, start_a, end_a), (node_b, start_b, end_b) = spans
    assert {node_a, node_b} == {"w1", "w2"}, spans
    assert start_a < end_b and start_b < end_a, f"the trials did not overlap: {spans}"


def test_f_a_node_that_joins_during_the_shard_build_gets_actors(
    cluster, out, tmp_path, smoke_run, smoke_assets
):
    """Every shard actor holds at its first batch (CYCLE_RELEASE_FILE) so the pool is busy with
    films still queued; a node joins; Ray Data starts actors on it (the state API shows them),
    and once released they write part of the build (the manifest names their node)."""
    if not [n for n in cluster.nodes if n != "head"]:
        cluster.add_workers("w1")  # this test alone: the build starts on one node
    smoke_out = smoke_run[0]
    (classifier,) = (smoke_out / "smoke" / "cycle_0" / "tinyvgg" / "train").glob("best.pt")
    (lung_model,) = (smoke_out / "lungseg").glob("*/best.pt")
    held, release = tmp_path / "held", tmp_path / "release"
    shards = out / "grow" / "shards"
    cluster.submit(
        "grow",
        [
            "python",
            "jobs/build_shards.py",
            "--config",
            "configs/smoke.yaml",
            "--set",
            "tracking.enabled=false",
            "--set",
            "cam.batch_size=4",  # many batches: films stay queued while the actors hold
            *smoke_assets,
            "--model",
            str(classifier),
            "--lung-model",
            str(lung_model),
            "--out",
            str(shards),
        ],
        env_vars={
            "CYCLE_HOLD_AT": "shards:batch",
            "CYCLE_HOLD_FILE": str(held),
            "CYCLE_RELEASE_FILE": str(release),
        },
    )
    wait_until("the shard actors hold", lambda: held.is_file() and held.read_text(), 600)
    before = {cluster.name_of(a["node_id"]) for a in shard_actors(cluster)}
    cluster.add_workers("w3")
    try:
        wait_until(
            "a shard actor on the node that joined",
            lambda: "w3" in {cluster.name_of(a["node_id"]) for a in shard_actors(cluster)},
            timeout=300,
        )
    finally:
        release.write_text("go")
    status, logs = cluster.wait("grow")
    assert status == "SUCCEEDED", logs[-5000:]
    assert "w3" not in before and "as nodes join" in logs
    manifest = read_json(shards / "manifest.json")
    writers = {cluster.name_of(shard["node_id"]) for shard in manifest["shards"]}
    assert "w3" in writers and "head" not in writers, writers
    cluster.kill("w3")


def shard_actors(cluster) -> list[dict]:
    """The live Ray Data actors that hold the models and write the shards."""
    return [
        a
        for a in cluster.actors()
        if "ShardWriter" in a["class_name"] and a["state"] == "ALIVE" and a["node_id"]
    ]
