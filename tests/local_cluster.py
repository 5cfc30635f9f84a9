"""Several Ray nodes on one machine, the way Ray tests itself: a head that schedules nothing
(`--num-cpus=0`, as in cluster.yaml) and worker nodes that join with `ray start --address` on
loopback, each with its own `--temp-dir` (nodes sharing one session folder share
`runtime_resources`, and one node's clean-up deletes the job's working directory under the driver).

Ray's daemons ignore SIGTERM: a node is stopped by SIGKILL to its `ray start --block`, every
process whose command line names its temp dir, and all their children (read from /proc).
Only what this class started is touched."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port, head_ports, node_ports, short_temp_dir

ROOT = Path(__file__).resolve().parent.parent
# Every node and the GCS on loopback. Not 127.0.0.1: Ray rewrites that (and "localhost") to the
# machine's outward address; another address of 127/8 it keeps, and Linux answers it on lo.
LOOPBACK = "127.0.0.2"


@dataclass
class Node:
    name: str
    temp_dir: str
    process: subprocess.Popen
    node_id: str = ""


@dataclass
class LocalCluster:
    logs: Path
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, Node] = field(default_factory=dict)
    # Token auth on, as the README's recipes and the cluster files set it, with a token of this
    # cluster's own (given to every node and client): ~/.ray/auth_token stays untouched.
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict:
        return {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_ADDRESS": self.address,
        }

    # -- nodes ------------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> Node:
        # Unix socket paths must stay under 108 bytes: a short folder under /tmp.
        temp_dir = short_temp_dir(f"rn-{name}-")
        # Not the test's $RAY_TMPDIR either: the node outlives that test, whose clean-up kills
        # what names it.
        env = {k: v for k, v in self.env.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
        process = subprocess.Popen(
            [
                "ray",
                "start",
                "--block",
                f"--node-ip-address={LOOPBACK}",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                *node_ports(),
                *args,
            ],
            cwd=self.logs,
            env=env,
            start_new_session=True,
            stdout=open(self.logs / f"ray-{name}.log", "a"),
            stderr=subprocess.STDOUT,
        )
        node = Node(name, temp_dir, process)
        self.nodes[name] = node
        return node

    def start_head(self, timeout: float = 180) -> None:
        self._start(
            "head",
            [
                "--head",
                "--num-cpus=0",  # as cluster.yaml's head: it runs drivers, never training
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                *head_ports(),
            ],
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.nodes["head"].process.poll() is not None:
                raise RuntimeError(f"ray head exited; see {self.logs / 'ray-head.log'}")
            if self._alive_nodes(quiet=True) is not None:
                return
            time.sleep(2)
        raise TimeoutError("the Ray head did not answer")

    def add_workers(self, *names: str, cpus: int = 2) -> None:
        """Worker nodes joining the head at once, `cpus` CPUs each (as an autoscaler adds them);
        returns once all are alive, each node id known. Each carries a resource named after it
        (`node-w1: 1`), which tells the nodes apart: on one machine they share an address."""
        # A node killed a moment ago stays ALIVE in the list until the GCS misses its heartbeats.
        known = {n["node_id"] for n in self._alive_nodes() or []}
        for name in names:
            tag = json.dumps({f"node-{name}": 1})
            self._start(
                name,
                [
                    f"--address={LOOPBACK}:{self.gcs_port}",
                    f"--num-cpus={cpus}",
                    f"--resources={tag}",
                ],
            )
        deadline = time.time() + 180
        while time.time() < deadline:
            for name in names:
                if self.nodes[name].process.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited; see {self.logs}/ray-{name}.log")
            alive = self._alive_nodes() or []
            for name in names:
                for n in alive:
                    if f"node-{name}" in n["resources_total"] and n["node_id"] not in known:
                        self.nodes[name].node_id = n["node_id"]
            if all(self.nodes[name].node_id for name in names):
                return
            time.sleep(2)
        raise TimeoutError(f"ray nodes {names} did not join")

    def kill(self, name: str) -> None:
        """SIGKILL a node: its raylet, agents and workers, as a machine that dies."""
        node = self.nodes.pop(name)
        kill_tree_naming(node.temp_dir, also={node.process.pid})
        node.process.wait()
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.kill(name)

    # -- Ray's CLI, as a user calls it: jobs go in and are stopped this way ---------------------

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ray", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- Ray's REST API, for looking: a poll is one request in this process, not a `ray` CLI
    # process (a second or two of CPU each on 2 cores, taken from the jobs under test)

    def api(self, path: str, timeout: float = 60):
        request = urllib.request.Request(
            self.address + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def _listed(self, resource: str, detail: bool) -> list[dict]:
        """Ray's state API (what `ray list <resource>` reads)."""
        query = f"limit=10000&timeout=30&detail={str(detail).lower()}"
        answer = self.api(f"/api/v0/{resource}?{query}")
        assert answer["result"], answer.get("msg")
        return answer["data"]["result"]["result"]

    def _alive_nodes(self, quiet: bool = False) -> list[dict] | None:
        try:
            listed = self._listed("nodes", detail=False)
        except OSError:
            if quiet:
                return None  # the head is still starting
            raise
        return [n for n in listed if n["state"] == "ALIVE"]

    def actors(self) -> list[dict]:
        """Every actor the cluster has seen (dead ones too), with its class, node and pid."""
        return self._listed("actors", detail=True)

    def node_of(self, pid: int, class_name: str) -> str:
        """The node id Ray's state API gives for the actor of that class with that pid."""
        found = [a for a in self.actors() if a["pid"] == pid and a["class_name"] == class_name]
        assert len(found) == 1, f"{class_name} pid {pid}: {found}"
        return found[0]["node_id"]

    def name_of(self, node_id: str) -> str:
        return next(n.name for n in self.nodes.values() if n.node_id == node_id)

    def submit(self, submission_id: str, entrypoint: list[str], env_vars: dict | None = None):
        """`ray job submit --no-wait --working-dir .` from the checkout's root."""
        runtime_env = {"env_vars": env_vars or {}}
        submitted = self.ray(
            "job",
            "submit",
            "--address",
            self.address,
            "--no-wait",
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entrypoint,
        )
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]

    def status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (what `ray job status` says)."""
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def logs_of(self, submission_id: str) -> str:
        """What `ray job logs` prints."""
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def wait(self, submission_id: str, timeout: float = 900) -> tuple[str, str]:
        """(final status, the job's logs) once the job has ended."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, self.logs_of(submission_id)
            time.sleep(2)
        self.ray("job", "stop", "--address", self.address, submission_id)
        raise TimeoutError(f"job {submission_id} did not end in {timeout:.0f} s")


def kill_tree_naming(text: str, also: set[int] | None = None) -> None:
    """SIGKILL every process whose command line names `text` (a node's temp dir), the pids in
    `also`, and all their children; returns once none naming `text` is left."""
    for pid in _tree(set(also or ()) | _naming(text)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while _naming(text) and time.time() < deadline:
        time.sleep(0.2)  # killed processes linger until reaped


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line and environment) of every live process, from /proc. The
    environment too: Ray's agents rename themselves (`ray::DashboardAgent`), so their command line
    no longer names the temp dir, while $RAY_TMPDIR they inherited still does."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/environ", "rb") as handle:
                cmdline += " " + handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if fields[0] != "Z":  # a zombie is dead already
            found[int(entry)] = (int(fields[1]), cmdline)
    return found


def _naming(text: str) -> set[int]:
    return {pid for pid, (_, cmdline) in _processes().items() if text in cmdline}


def _tree(roots: set[int]) -> set[int]:
    """The roots and all their descendants."""
    processes = _processes()
    tree, grew = set(roots), True
    while grew:
        children = {pid for pid, (ppid, _) in processes.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return tree
