"""A cluster of several nodes on this machine, as in cluster.yaml: a head that schedules nothing
(`--num-cpus=0`) and worker nodes of 2 CPUs that join later with `ray start --address`, each with
its own temp dir, on loopback. Jobs go in with `ray job submit --working-dir .`, as a user sends
them; where things ran is read from Ray's state API.

  (d) a job submitted before any worker node exists waits, and runs once nodes join;
  (a) its two architectures train side by side, each trainer's worker on a different node;
  (b) one architecture with two Ray Train workers: DDP (gloo) across the two nodes;
  (c) a worker node SIGKILLed mid-epoch and started again: the run resumes from Ray's storage;
  (e) a sweep whose two trials run on the two nodes at once.

Each trainer asks for 2 CPUs, all a worker node has, so two trainers (or trials) at once must be
on two nodes. The jobs share one output_dir, and reuse the phantoms and lung U-Net of the session's
smoke run (`smoke_assets`), as they would reuse those the first job on a cluster made."""

import json
import math
import time
from pathlib import Path

import pytest
from local_cluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Each trainer (or trial) takes a whole 2-CPU worker node.
ONE_NODE_EACH = ["--set", "resources.cpus_per_worker=2"]
REQUEST = "Requesting resources: {'CPU': 2.0} * 1"  # a Ray Train controller asking for a worker


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
    assert "Requesting resources: {'CPU': 2.0}" in from_zero["waiting_logs"]
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
        assert sorted(nodes.values()) == ["w1", "w2"], f"cycle {k}: {nodes}"


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
    assert "world_size=2" in logs  # one process group (gloo on CPUs) over both workers

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
