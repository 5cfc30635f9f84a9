"""Join the configured Ray cluster, or start a local one that is safe on a 2-core laptop."""

from __future__ import annotations

import os

from cycle.config import Config


def init_ray(cfg: Config):
    """`resources.ray_address` or $RAY_ADDRESS joins a cluster; otherwise a local Ray that never
    joins a stray cluster, declares more logical CPUs than cores (Train + Data on 2 cores
    deadlock otherwise) and binds its dashboard to loopback."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    # Workers import `cycle` from the driver's tree when they run on this machine.
    runtime_env = {"env_vars": {"PYTHONPATH": _package_parent()}} if not address else None
    if address:
        return ray.init(address=address, log_to_driver=True)
    return ray.init(
        address="local",
        num_cpus=cfg.resources.local_num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        # Idle workers kept a minute, not a second: the next stage's tasks reuse them instead of
        # starting (and importing torch in) new processes, seconds each on a laptop.
        _system_config={"idle_worker_killing_time_threshold_ms": 60_000},
    )


def _package_parent() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    existing = os.environ.get("PYTHONPATH")
    return f"{here}{os.pathsep}{existing}" if existing else here
