"""The scale-out files a user edits: cluster.yaml passes Ray's own schema, the KubeRay manifests
parse and run our jobs with arguments our jobs accept, the upload ignores data and outputs."""

import shlex
from pathlib import Path

import pytest
import yaml

from cycle.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_schema_with_a_cpu_only_head_and_gpu_workers_from_zero():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    nodes = raw["available_node_types"]
    assert nodes[raw["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != raw["head_node_type"]]
    assert workers and all(n["min_workers"] == 0 for n in workers)
    assert any(
        n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for n in workers
    )
    assert raw["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    options = " ".join(raw["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "CYCLE_STORAGE_PATH=" in options
    assert any("requirements.txt" in c for c in raw["setup_commands"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server --host 127.0.0.1" in head


@pytest.mark.parametrize(
    "name, job", [("rayjob.yaml", "jobs/cycle.py"), ("rayjob-sweep.yaml", "jobs/sweep.py")]
)
def test_kuberay_jobs_parse_and_name_a_real_entrypoint_with_valid_arguments(name, job):
    doc = yaml.safe_load((ROOT / "k8s" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", job] and (ROOT / job).is_file()
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_config(ROOT / config, overrides)  # the job would accept these
    if "--space" in argv:
        from cycle.config import Config
        from cycle.sweep import read_space, validate_space

        validate_space(read_space(ROOT / argv[argv.index("--space") + 1]), Config())
    cluster = doc["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_uploads_leave_data_outputs_and_tracking_stores_behind():
    ignored = (ROOT / ".rayignore").read_text().split()
    for path in ("/outputs/", "/data/", "/mlruns/", "/mlflow.db"):
        assert path in ignored
    assert "data/" not in ignored  # unanchored, it would also drop cycle/data/ from the upload
