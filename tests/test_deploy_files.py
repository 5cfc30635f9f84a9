"""The scale-out files a user edits: cluster.yaml passes Ray's own schema, the KubeRay manifests
pass KubeRay 1.7's CRD schema with no unknown fields and run our jobs with arguments our jobs
accept, every real-data command names a lung model and asks for GPUs, MLflow on Kubernetes answers
the name the jobs use, images install the versions CI passed with, the upload and the image leave
data and outputs behind."""

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from cycle.config import load_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CRD_SCHEMAS = ROOT / "tests" / "data" / "kuberay-1.7-crd-schemas.json"
RUNTIME_UID, RUNTIME_GID = 1000, 100  # the rayproject image's user `ray` and group `users`


def k8s_documents() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def kuberay_documents() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in k8s_documents() if d["kind"] in ("RayJob", "RayCluster")]


KUBERAY = kuberay_documents()


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_documents() if d["kind"] == kind]
    found = [d for d in found if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found under k8s/"
    return found[0]


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


# ---------------------------------------------------------------------------------------------
# cluster.yaml (Ray cluster launcher, AWS)


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
    options = " ".join(raw["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options and "CYCLE_STORAGE_PATH=" in options
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server --host 127.0.0.1" in head


def test_cluster_yaml_names_an_ami_a_network_and_gives_workers_an_s3_identity():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = raw["available_node_types"]
    for name, node in nodes.items():
        config = node["node_config"]
        # Ray's default AMI is an Ubuntu 18.04 / CUDA 11 image: too old for the image's torch.
        assert config["ImageId"].startswith("ami-"), name
        # Ray's own security group leaves NFS (2049) closed: EFS would hang `ray up`.
        assert config["SubnetIds"] and config["SecurityGroupIds"], name
        if name != raw["head_node_type"]:  # Ray gives only the head an instance profile
            assert config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    mount = " ".join(raw["initialization_commands"])
    assert "mount -t nfs4" in mount and "timeout" in mount


def test_every_node_runs_the_dockerfile_image_which_installs_the_runtime_under_the_ci_constraints():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The runtime part of requirements.txt (the test tools stay out of the image).
    assert "-r requirements-runtime.txt -c constraints.txt" in dockerfile
    assert "requirements.txt " not in dockerfile.replace("requirements-runtime.txt", "")
    # The nodes pull that image and install nothing when they scale up (an index outage would
    # fail each new GPU node's setup, and the autoscaler would relaunch it in a loop).
    image = raw["docker"]["image"]
    assert image.startswith("CHANGE-registry/cycle:") and not image.endswith(":latest")
    assert not any(
        "pip install" in c for c in raw["setup_commands"] + raw.get("head_setup_commands", [])
    )
    mounts = raw["file_mounts"]
    # Mounts land inside the container, whose home is /home/ray (not the host's /home/ubuntu).
    assert all(not target.startswith("/home/ubuntu") for target in mounts)
    token = next(o for o in raw["docker"]["run_options"] if "RAY_AUTH_TOKEN_PATH=" in o)
    token_path = token.split("=", 1)[1]
    assert token_path in mounts
    assert any(c.startswith("chmod 600") and token_path in c for c in raw["setup_commands"])


def test_cluster_yaml_keeps_mlflow_runs_beyond_the_cluster_and_starts_one_server():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(raw["head_start_ray_commands"])
    # Postgres (its URI in a file the operator writes, copied to the head, never in this file):
    # `ray down` deletes the head's own disk, and SQLite on NFS breaks under several workers.
    backend = re.search(r'--backend-store-uri "\$\(cat (\S+)\)"', head).group(1)
    assert backend in raw["file_mounts"] and "sqlite" not in head
    assert "postgresql://" in (ROOT / "cluster.yaml").read_text()  # what goes in that file
    assert "while true; do mlflow server" in head  # supervised: restarted when it exits
    # A second `ray up` reruns these commands: a server that already answers is kept.
    assert head.index("/health") < head.index("mlflow server") and "||" in head


# ---------------------------------------------------------------------------------------------
# Every documented real-data command: a lung model, GPUs


def shell_commands(text: str) -> list[str]:
    """Commands of `# ` comments or code blocks, continuation lines (trailing backslash) joined."""
    lines = [re.sub(r"^#\s?", "", line).strip() for line in text.splitlines()]
    joined, out = "", []
    for line in lines:
        joined += " " + line.rstrip("\\").strip() if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            out.append(joined.strip())
            joined = ""
    return [c.split(" # ")[0] for c in out if re.search(r"jobs/(cycle|sweep)\.py", c)]


def readme_scale_out() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Scale out")
    return text[start : text.index("\n## ", start + 1)]


def code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.M | re.S))


def real_data_commands() -> list[tuple[str, list[str]]]:
    found = []
    for source, text in [
        ("cluster.yaml", (ROOT / "cluster.yaml").read_text()),
        ("README.md", code_blocks(readme_scale_out())),
    ]:
        for command in shell_commands(text):
            argv = shlex.split(command[command.index("python ") :])
            if "data.root" in overrides(argv):
                found.append((source, argv))
    for name, doc in kuberay_documents():
        found.append((name, shlex.split(doc["spec"]["entrypoint"])))
    return found


def test_every_documented_real_data_command_names_a_lung_model_and_asks_for_gpus():
    commands = real_data_commands()
    sources = {source for source, _ in commands}
    assert {"cluster.yaml", "README.md", "rayjob.yaml", "rayjob-sweep.yaml"} <= sources
    for source, argv in commands:
        sets = overrides(argv)
        # Real data without a lung model stops at the input check (LungModelMissing).
        assert sets.get("lungseg.weights", "").startswith("/mnt/shared/"), (source, argv)
        # `auto` decides from the GPUs present at submit: none while the workers are at zero.
        assert sets.get("resources.use_gpu") == "true", (source, argv)
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        load_config(ROOT / config if config else None, [f"{k}={v}" for k, v in sets.items()])
    for path in (ROOT / "cluster.yaml", K8S / "rayjob.yaml", K8S / "rayjob-sweep.yaml"):
        assert re.search(r"CHANGE.*lungseg\.weights|lungseg\.weights.*CHANGE", path.read_text())


# ---------------------------------------------------------------------------------------------
# KubeRay: the CRD's schema, strict


def strict(schema):
    """The CRD's schema as the API server applies it to a manifest: a KubeRay or Kubernetes object
    that lists its properties accepts no others (kubectl's strict field validation), unless it
    says x-kubernetes-preserve-unknown-fields; `nullable` admits null."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd():
    raw = json.loads(CRD_SCHEMAS.read_text())
    assert raw["tag"] == "v1.7.0" and re.fullmatch(r"[0-9a-f]{40}", raw["commit"])
    defs = {name: strict(s) for name, s in raw["$defs"].items()}
    return {kind: {"$defs": defs, **strict(s)} for kind, s in raw["schemas"].items()}


def schema_errors(schema: dict, doc: dict) -> list[str]:
    from jsonschema import Draft202012Validator

    errors = Draft202012Validator(schema).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def test_the_vendored_crd_schemas_are_small_and_name_their_source():
    raw = json.loads(CRD_SCHEMAS.read_text())
    assert CRD_SCHEMAS.stat().st_size < 1_000_000
    assert raw["source"] == "https://github.com/ray-project/kuberay"
    assert set(raw["schemas"]) == {"RayJob", "RayCluster"}


@pytest.mark.parametrize("name, doc", KUBERAY, ids=[f"{n}:{d['kind']}" for n, d in KUBERAY])
def test_every_rayjob_and_raycluster_passes_kuberay_1_7s_crd_with_no_unknown_fields(crd, name, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    assert schema_errors(crd[doc["kind"]], doc) == []


def test_the_strict_crd_schema_rejects_unknown_fields_where_kuberay_and_the_pod_spec_list_theirs(
    crd,
):
    doc = yaml.safe_load((K8S / "rayjob.yaml").read_text())
    for path, typo in [
        (["spec"], "entrypointt"),
        (["spec", "rayClusterSpec"], "enableInTreeAutoScaling"),
        (["spec", "rayClusterSpec", "workerGroupSpecs", 0], "maxReplica"),
        (["spec", "rayClusterSpec", "headGroupSpec", "template", "spec"], "serviceAcountName"),
    ]:
        bad = copy.deepcopy(doc)
        node = bad
        for key in path:
            node = node[key]
        node[typo] = True
        assert any(typo in e for e in schema_errors(crd["RayJob"], bad)), typo
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    assert schema_errors(crd["RayJob"], bad)


# ---------------------------------------------------------------------------------------------
# KubeRay: what the RayJobs run and on what


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


@pytest.mark.parametrize("name, doc", KUBERAY, ids=[f"{n}:{d['kind']}" for n, d in KUBERAY])
def test_gpu_worker_groups_autoscale_from_zero(name, doc):
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    # Without it KubeRay runs exactly `replicas` workers: min/max only clamp that number.
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def pods(doc: dict) -> list[dict]:
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def writable_by_the_runtime_user(pod: dict, mount_path: str) -> bool:
    """fsGroup (block volumes) and an init container that hands the folder to uid 1000 (NFS)."""
    if pod.get("securityContext", {}).get("fsGroup") != RUNTIME_GID:
        return False
    return any(
        f"chown {RUNTIME_UID}:{RUNTIME_GID} {mount_path}" in " ".join(c.get("command", []))
        and any(m["mountPath"] == mount_path for m in c.get("volumeMounts", []))
        for c in pod.get("initContainers", [])
    )


@pytest.mark.parametrize("name, doc", KUBERAY, ids=[f"{n}:{d['kind']}" for n, d in KUBERAY])
def test_ray_pods_have_an_s3_identity_and_a_shared_volume_they_can_write(name, doc):
    account = one("ServiceAccount", "cycle")
    identity = account["metadata"].get("annotations", {})
    assert "eks.amazonaws.com/role-arn" in identity  # IRSA (or Pod Identity: see shared.yaml)
    shared = one("PersistentVolumeClaim", "cycle-shared")
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]  # every node reads every shard
    head, *workers = pods(doc)
    for pod in [head, *workers]:
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert claims == {shared["metadata"]["name"]}
        assert pod["securityContext"]["fsGroup"] == RUNTIME_GID
    assert writable_by_the_runtime_user(head, "/mnt/shared")


# ---------------------------------------------------------------------------------------------
# MLflow on Kubernetes


def mlflow_server_args() -> list[str]:
    container = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    return [*container.get("command", []), *container.get("args", [])]


def mlflow_host_check():
    """MLflow's own Host-header check (mlflow/server/security_utils.py), loaded by itself:
    importing mlflow.server would load the whole server (seconds)."""
    import importlib.util

    origin = Path(importlib.util.find_spec("mlflow").origin).parent
    spec = importlib.util.spec_from_file_location(
        "_mlflow_security_utils", origin / "server" / "security_utils.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.is_allowed_host_header


def test_mlflow_on_kubernetes_answers_the_name_the_rayjobs_use():
    is_allowed_host_header = mlflow_host_check()

    service = one("Service", "mlflow")
    port = service["spec"]["ports"][0]["port"]
    namespace = service["metadata"].get("namespace", "default")
    args = mlflow_server_args()
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert args[args.index("--host") + 1] == "0.0.0.0"
    for name, doc in kuberay_documents():
        for pod in pods(doc):
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            uri = urlparse(env["MLFLOW_TRACKING_URI"])
            assert uri.hostname == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
            assert uri.port == port, name
            # The Host header a client sends; MLflow 3 answers 403 to a name not listed.
            assert is_allowed_host_header(allowed, uri.netloc), (uri.netloc, allowed)
    assert is_allowed_host_header(allowed, f"localhost:{port}")  # kubectl port-forward
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_mlflow_on_kubernetes_keeps_its_store_on_a_volume_uid_1000_can_write(crd):
    deployment = one("Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    root = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_SERVER_ROOT")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[root]]["persistentVolumeClaim"]["claimName"]
    assert one("PersistentVolumeClaim", claim)
    assert mlflow_server_args()[:2] == ["bash", "jobs/mlflow_server.sh"]
    assert "--backend" not in mlflow_server_args()  # SQLite under MLFLOW_SERVER_ROOT: the volume
    assert writable_by_the_runtime_user(pod, root)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one pod on a ReadWriteOnce disk
    # The pod template, checked against the (strict) Pod template schema in KubeRay's CRD.
    schema = {"$defs": crd["RayCluster"]["$defs"], **pod_template_schema(crd)}
    assert schema_errors(schema, deployment["spec"]["template"]) == []


def pod_template_schema(crd) -> dict:
    def resolve(node):
        while "$ref" in node:
            node = crd["RayCluster"]["$defs"][node["$ref"].rsplit("/", 1)[1]]
        return node

    spec = resolve(crd["RayCluster"]["properties"]["spec"])
    return resolve(resolve(spec["properties"]["headGroupSpec"])["properties"]["template"])


def test_mlflow_server_script_passes_allowed_hosts_through(tmp_path):
    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "MLFLOW_SERVER_ROOT": str(tmp_path / "store"),
    }

    def run(*args: str) -> list[str]:
        script = ROOT / "jobs" / "mlflow_server.sh"
        out = subprocess.run(
            ["bash", str(script), *args], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.splitlines()

    hosts = "mlflow.default.svc.cluster.local:5000,localhost:*"
    argv = run("--allowed-hosts", hosts)
    assert argv[0] == "server" and argv[argv.index("--allowed-hosts") + 1] == hosts
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # loopback unless told otherwise
    assert "--allowed-hosts" not in run()  # MLflow's default: localhost and private IPs
    default = run()
    assert default[default.index("--workers") + 1] == "4"  # MLflow's own default number
    one = run("--workers", "1")
    assert one[one.index("--workers") + 1] == "1"


# ---------------------------------------------------------------------------------------------
# Images and nodes that rebuild the same; uploads and images without data


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def test_requirements_split_runtime_from_test_tools_and_constraints_pin_what_ci_passed_with():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    top = requirement_lines(ROOT / "requirements.txt")
    assert "-r requirements-runtime.txt" in top  # `pip install -r requirements.txt`: everything
    runtime = [Requirement(r) for r in requirement_lines(ROOT / "requirements-runtime.txt")]
    tools = [Requirement(r) for r in top if not r.startswith("-")]
    runtime_names = {canonicalize_name(r.name) for r in runtime}
    test_tools = {"pytest", "pytest-timeout", "ruff", "grad-cam", "selenium"}
    assert test_tools <= {canonicalize_name(r.name) for r in tools}
    assert not runtime_names & test_tools
    assert {"torch", "torchvision", "ray", "mlflow", "scipy"} <= runtime_names
    pins = {}
    for line in requirement_lines(ROOT / "constraints.txt"):
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    for req in [*runtime, *tools]:
        version = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), (req, version)
    assert {k: pins[k] for k in ("torch", "torchvision", "ray", "mlflow")} == {
        "torch": "2.14.1",
        "torchvision": "0.29.1",
        "ray": "2.60.0",
        "mlflow": "3.17.2",
    }


def imported_top_level_modules(folder: Path) -> set[str]:
    """Every top-level module the files under `folder` import, at any depth of the code."""
    import ast

    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_every_package_the_code_imports_is_declared():
    """A package imported by the library or the jobs and named in no requirements file works here
    by accident (another package pulled it in) and breaks on the next image: the library and jobs
    declare it in requirements-runtime.txt, the benchmarks may use the test tools too."""
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def declared(path: Path) -> set[str]:
        lines = [r for r in requirement_lines(path) if not r.startswith("-")]
        return {canonicalize_name(Requirement(r).name) for r in lines}

    runtime = declared(ROOT / "requirements-runtime.txt")
    everything = runtime | declared(ROOT / "requirements.txt")
    distributions = packages_distributions()
    ours = {"cycle", "_common"}  # the package itself, and jobs/_common.py

    def undeclared(folder: str, allowed: set[str]) -> dict[str, list[str]]:
        third_party = {
            module: sorted({canonicalize_name(d) for d in distributions[module]})
            for module in imported_top_level_modules(ROOT / folder) - ours
            if module in distributions  # the standard library has no distribution
        }
        return {m: ds for m, ds in third_party.items() if not set(ds) & allowed}

    # selenium: only the screenshot helpers, a tool for people with a browser (requirements.txt)
    assert undeclared("cycle", runtime | {"selenium"}) == {}
    assert undeclared("jobs", runtime | {"selenium"}) == {}
    assert undeclared("bench", everything) == {}


def test_the_image_installs_the_runtime_part_under_the_constraints():
    steps = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # The base by an argument whose default is Ray's tag and which takes a digest (the header).
    assert steps[:2] == ["ARG BASE=rayproject/ray:2.60.0-py311-gpu", "FROM ${BASE}"]
    install = next(s for s in steps if "pip install" in s)
    assert "-r requirements-runtime.txt" in install and "-c constraints.txt" in install
    assert "requirements.txt" not in install.replace("requirements-runtime.txt", "")
    copied = next(s for s in steps if s.startswith("COPY") and "constraints.txt" in s)
    assert steps.index(copied) < steps.index(install)


def test_uploads_leave_data_outputs_and_tracking_stores_behind():
    ignored = (ROOT / ".rayignore").read_text().split()
    for path in ("/outputs/", "/data/", "/mlruns/", "/mlflow.db", "/chest_xray/", "/*.zip"):
        assert path in ignored  # chest_xray/: patient films unzipped inside the checkout
    assert "data/" not in ignored  # unanchored, it would also drop cycle/data/ from the upload


def test_the_image_leaves_data_outputs_stores_and_partial_folders_behind():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    entries = {line.rstrip("/") for line in lines if line and not line.startswith("#")}
    for entry in ("outputs", "data", "mlruns", "mlflow.db", "mlflow-server", ".gl", ".git"):
        assert entry in entries
    for entry in ("chest_xray", "*.zip"):  # patient films never go into an image
        assert entry in entries
    assert "**/*.partial" in entries  # half-written stage folders, at any depth
    assert "cycle" not in entries and "configs" not in entries


def test_readme_names_the_kuberay_release_that_has_auth_options():
    text = readme_scale_out()
    assert "KubeRay >= 1.5.1" in text and "KubeRay >= 1.5)" not in text
    for path in (K8S / "rayjob.yaml", K8S / "rayjob-sweep.yaml"):
        assert "KubeRay >= 1.5.1" in path.read_text()


# ---------------------------------------------------------------------------------------------
# What an operator applying the files tomorrow needs them to say (issue: storage that survives,
# GPUs on demand, a closed MLflow): each point a file can show


def all_images() -> list[tuple[str, str]]:
    found = []
    for name, doc in k8s_documents():
        text = json.dumps(doc)
        found += [(name, image) for image in re.findall(r'"image": "([^"]+)"', text)]
    found.append(
        ("cluster.yaml", yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"])
    )
    return found


def test_volumes_survive_a_delete_and_name_their_class():
    classes = {d["metadata"]["name"]: d for _, d in k8s_documents() if d["kind"] == "StorageClass"}
    assert classes and all(c["reclaimPolicy"] == "Retain" for c in classes.values())
    claims = [(n, d) for n, d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"]
    assert {d["metadata"]["name"] for _, d in claims} == {"cycle-shared", "mlflow-data"}
    for name, claim in claims:
        # In a file of their own: `kubectl delete -f` of the jobs or MLflow keeps them.
        assert name == "volumes.yaml", name
        # New EKS clusters have no default class: a claim without one stays Pending.
        assert claim["spec"]["storageClassName"] in classes
    assert {n for n, d in k8s_documents() if d["kind"] == "StorageClass"} == {"volumes.yaml"}


def test_images_are_pinned_and_the_same_everywhere():
    images = all_images()
    assert len(images) >= 6
    for name, image in images:
        assert ":" in image and not image.endswith(":latest"), (name, image)
    assert len({image for _, image in images}) == 1  # head, workers, MLflow, loader: one build


def test_gpu_nodes_are_on_demand_unless_spot_is_chosen_and_survive_reclaims():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = {n: v for n, v in raw["available_node_types"].items() if n != raw["head_node_type"]}
    spot = {n: v for n, v in nodes.items() if "InstanceMarketOptions" in v["node_config"]}
    on_demand = {n: v for n, v in nodes.items() if n not in spot}
    assert on_demand and all(v["max_workers"] > 0 for v in on_demand.values())
    for node in spot.values():
        # Off until chosen, and never a twin of an on-demand type (ties go by name).
        assert node["max_workers"] == 0
        for other in on_demand.values():
            assert node["resources"] != other["resources"]
            assert node["node_config"]["InstanceType"] != other["node_config"]["InstanceType"]
    for source, argv in real_data_commands():
        assert int(overrides(argv).get("resources.max_failures", 1)) >= 2, (source, argv)


def test_nodes_use_imdsv2_and_scoped_roles_in_two_zones():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for name, node in raw["available_node_types"].items():
        config = node["node_config"]
        assert config["MetadataOptions"]["HttpTokens"] == "required", name
        assert config["MetadataOptions"]["HttpPutResponseHopLimit"] == 1, name
        assert config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert len(config["SubnetIds"]) >= 2, name
    assert raw["provider"]["use_internal_ips"] is True
    text = (ROOT / "cluster.yaml").read_text()
    assert "0777" not in text and "chmod 0775 /mnt/shared" in text


def test_jobs_have_deadlines_and_cpu_pods_stay_off_gpu_nodes():
    for name, doc in kuberay_documents():
        assert doc["spec"]["activeDeadlineSeconds"] > 0, name
        head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["nodeSelector"], name
    mlflow_pod = one("Deployment", "mlflow")["spec"]["template"]["spec"]
    assert mlflow_pod["nodeSelector"] == head["nodeSelector"]
    loader = one("Job", "cycle-load-data")
    assert loader["spec"]["activeDeadlineSeconds"] > 0
    assert loader["spec"]["template"]["spec"]["nodeSelector"] == head["nodeSelector"]
    assert {
        v["persistentVolumeClaim"]["claimName"]
        for v in loader["spec"]["template"]["spec"]["volumes"]
    } == {"cycle-shared"}
    for command in shell_commands((ROOT / "cluster.yaml").read_text()):
        assert re.search(r"-- timeout \d+h python jobs/", command), command


def test_only_the_rayjobs_pods_may_reach_mlflow():
    policy = one("NetworkPolicy")
    service = one("Service", "mlflow")
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    admitted = source["podSelector"]["matchLabels"]
    assert "namespaceSelector" not in source  # this namespace only
    for name, doc in kuberay_documents():
        for group in pods_with_metadata(doc):
            labels = group.get("metadata", {}).get("labels", {})
            assert admitted.items() <= labels.items(), name
    assert rule["ports"] == [{"protocol": "TCP", "port": service["spec"]["ports"][0]["port"]}]


def pods_with_metadata(doc: dict) -> list[dict]:
    cluster = doc["spec"]["rayClusterSpec"]
    return [g["template"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]
