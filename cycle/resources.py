"""What a stage asks Ray for, sized from what the cluster has, and what to say when it waits.

Pure functions of a resources dict (`ray.cluster_resources()`), so the sizing rules are tested
without Ray: a 2-CPU `ray start --head` must not hand every CPU to actors while Ray Data's read
tasks wait for one more (a silent hang, see shared/RAY_NOTES.md).
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ShardPool:
    actors: int  # EnhanceWorker actors to start with: what the cluster holds now
    max_actors: int  # what the pool may grow to, onto nodes that join during the build
    cpus_per_actor: float
    gpus_per_actor: float
    task_cpus: float  # what each read/decode task asks for
    threads_per_actor: int  # torch threads inside an actor

    def describe(self) -> str:
        gpu = f", {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        grows = f" (up to {self.max_actors} as nodes join)" if self.max_actors > self.actors else ""
        return (
            f"{self.actors} actor(s){grows} x ({self.cpus_per_actor:g} CPU{gpu}), "
            f"decode tasks {self.task_cpus:g} CPU"
        )


MAX_SHARD_ACTORS = 8  # past this, more threads per actor beat more copies of both models


def decide_gpu(setting: bool | str, cluster: dict) -> tuple[bool, str]:
    """Whether the job's stages ask Ray for GPUs, and the plan's line saying so.

    `true` always asks, on a cluster with no GPU node yet too: the stage waits for the
    autoscaler to add one (cluster files whose GPU workers scale from zero say `true`). `false`
    never asks. `auto` asks when the cluster has GPUs when the job starts; on a cluster with none
    it trains on CPUs and the plan says so, naming the setting that waits for GPUs instead."""
    if setting is True:
        return True, "GPUs: asked for (resources.use_gpu=true); stages wait for GPU nodes"
    if setting is False:
        return False, "GPUs: not used (resources.use_gpu=false)"
    gpus = float(cluster.get("GPU", 0.0))
    if gpus > 0:
        return True, f"GPUs: {gpus:g} in the cluster, used (resources.use_gpu=auto)"
    return False, (
        "GPUs: none in the cluster now, so every stage will run on CPUs "
        "(resources.use_gpu=auto); where GPU workers scale from zero, "
        "--set resources.use_gpu=true waits for them instead"
    )


def plan_shard_pool(
    cluster: dict, gpus_per_actor: float = 0.0, wanted: int | None = None, can_grow: bool = True
) -> ShardPool:
    """Size the EnhanceWorker pool so that actors never hold every CPU: one CPU (or half the
    cluster, when it has fewer than two) is left to the read and decode tasks. On GPUs, one actor
    per `gpus_per_actor` share of the GPUs. A cluster with no CPU yet (workers that scale from
    zero) starts with one 1-CPU actor: the autoscaler adds a node for it, and the stall watchdog
    speaks if none comes. `gpus_per_actor` > 0 (the job asks for GPUs) is honoured on a cluster
    without GPUs now as well: one actor asks for one, and the autoscaler adds a GPU node.

    The pool starts at that size and may grow to MAX_SHARD_ACTORS while the build runs: Ray
    Data adds actors where nodes join with room for one (an autoscaled cluster's new workers).
    `wanted` fixes the size (at most what fits now, at least one), start and end. Without
    `can_grow` (a local Ray: one node, which nothing joins) the pool stays at its start: Ray Data
    would otherwise add actors into the CPUs the read tasks and other builds need, each one a
    torch start and two models loaded, for no node gained."""
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    pool = _sized_pool(cpus, gpus, gpus_per_actor, wanted)
    return pool if can_grow else replace(pool, max_actors=pool.actors)


def _sized_pool(cpus: float, gpus: float, gpus_per_actor: float, wanted: int | None) -> ShardPool:
    grow = max(1, wanted) if wanted else MAX_SHARD_ACTORS
    if cpus <= 0:
        return ShardPool(1, max(1, grow), 1.0, gpus_per_actor, 1.0, 1)
    if cpus < 2:
        half = cpus / 2
        return ShardPool(1, 1 if wanted else grow, half, gpus_per_actor, half, 1)
    usable = cpus - 1.0
    if gpus_per_actor > 0:
        fit = int(gpus / gpus_per_actor) if gpus else 1  # none yet: one, the autoscaler adds more
        actors = max(1, min(fit, int(usable), MAX_SHARD_ACTORS))
    else:
        actors = max(1, min(int(usable), MAX_SHARD_ACTORS))
    if wanted:
        actors = max(1, min(actors, wanted))
        grow = actors
    per_actor = max(1.0, math.floor(usable / actors))
    return ShardPool(actors, max(actors, grow), per_actor, gpus_per_actor, 1.0, int(per_actor))


def nodes_can_join(nodes: list[dict], driver_node_id: str) -> bool:
    """Whether a build's pool should leave room to grow: the cluster has several nodes, or its
    driver's node schedules no work (a head started with 0 CPUs, as the cluster files start it:
    its workers come and go). A lone node with CPUs is a local Ray, which nothing joins.
    `nodes`: `ray.nodes()`."""
    alive = [n for n in nodes if n.get("Alive")]
    mine = next((n for n in alive if n.get("NodeID") == driver_node_id), None)
    return len(alive) > 1 or (mine is not None and not mine.get("Resources", {}).get("CPU"))


# What each trainer leaves free for the Ray Data tasks that read and decode its films (one task at
# a time at least: cycle.data.films.INGEST_TASK_CPUS).
INGEST_RESERVE_CPUS = 0.25


def trainer_cpus(asked: float, workers: int, cluster_cpus: float) -> float:
    """CPUs per Ray Train worker for `workers` workers side by side (every architecture's), so
    that their films can still be decoded: on a cluster where the asked-for CPUs fit but leave
    less than INGEST_RESERVE_CPUS a worker (2 trainers of 1 CPU on `ray start --head`'s 2 CPUs),
    a little less each; otherwise what was asked. A request that does not fit at all is left as
    it is: the stall watchdog names it (a cluster still scaling up, or a mistake)."""
    if workers <= 0 or cluster_cpus <= 0 or asked * workers > cluster_cpus:
        return asked
    room = cluster_cpus - INGEST_RESERVE_CPUS * workers
    return asked if asked * workers <= room else max(room / workers, INGEST_RESERVE_CPUS)


def trainer_request(
    num_workers: int, cpus_per_worker: float, gpus_per_worker: float, use_gpu: bool
) -> dict:
    """What one TorchTrainer's worker group holds while it runs."""
    request = {"CPU": num_workers * cpus_per_worker}
    if use_gpu:
        request["GPU"] = num_workers * gpus_per_worker
    return request


def format_resources(resources: dict) -> str:
    shown = {
        k: v
        for k, v in sorted(resources.items())
        if k in ("CPU", "GPU", "memory") or k.startswith("accelerator")
    }
    parts = []
    for name, value in shown.items():
        parts.append(f"{value / 2**30:.1f} GiB memory" if name == "memory" else f"{value:g} {name}")
    return ", ".join(parts) or "nothing"


def waiting_message(
    what: str, waited_s: float, request: dict, cluster: dict, available: dict, remedy: str
) -> str:
    """The error a stalled stage ends with: what it waits for, what the cluster has, what to do."""
    return (
        f"{what} made no progress for {waited_s:.0f} s, waiting for resources.\n"
        f"  it asks for:        {format_resources(request)}\n"
        f"  the cluster has:    {format_resources(cluster)} in all, "
        f"{format_resources(available)} free now\n"
        f"  to go on: {remedy}\n"
        f"  (resources.stall_timeout_s sets how long a stage may wait; a rerun with --resume keeps "
        f"finished stages)"
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux and macOS report it in KiB and
    bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Hand the memory this process has freed back to the OS. glibc keeps freed film-sized blocks
    in its heaps and, in a pass over many batches, reuses them so poorly that a worker's resident
    memory grew with the length of the pass (+100 MB over 480 val films, measured); trimming
    after each batch keeps it at what a batch needs. Milliseconds a call."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def arrow_returns_freed_memory() -> None:
    """Have pyarrow allocate from the system allocator in this process, so that what it frees
    (a shard file's column, read for a batch's rows) is what `release_freed_memory` hands back.
    Arrow's own allocator keeps freed memory for reuse; a worker reading val rows spread over
    every file of an 8x larger build held +58 MB more (measured), with the system's +13 MB."""
    import pyarrow

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
