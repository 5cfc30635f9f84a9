"""Write tests/data/kuberay-1.7-crd-schemas.json: the openAPIV3Schema of KubeRay's RayJob and
RayCluster CRDs (apiVersion ray.io/v1), read from a KubeRay git clone at a tag.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python tests/data/make_kuberay_schemas.py /tmp/kuberay v1.7.0 \
        > tests/data/kuberay-1.7-crd-schemas.json

What is kept is the CRD's own text, rearranged to be small: `status` is dropped (a manifest has
none), and every subtree that occurs more than once (the Pod template under the head group, the
worker groups and the submitter; RayCluster's spec inside RayJob's) is stored once under `$defs`
and referenced with `$ref`. Nothing is added: tests/test_deploy_files.py makes the schema strict
(no unknown fields) when it loads it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter

import yaml

CRDS = {
    "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
    "RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
}
VERSION = "v1"
MIN_SHARED = 1500  # characters of JSON: smaller repeated subtrees stay inline


def git(repo: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, *args], check=True, capture_output=True, text=True
    ).stdout


def key(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def count(node, seen: Counter) -> None:
    if isinstance(node, dict):
        text = key(node)
        if len(text) >= MIN_SHARED:
            seen[text] += 1
        for value in node.values():
            count(value, seen)
    elif isinstance(node, list):
        for value in node:
            count(value, seen)


def share(node, seen: Counter, defs: dict, names: dict, hint: str):
    """Top-down: the largest repeated subtree is replaced first, then its inside once."""
    if isinstance(node, dict):
        text = key(node)
        if seen.get(text, 0) > 1:
            if text not in names:
                name = f"{hint}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
                names[text] = name
                defs[name] = {k: share(v, seen, defs, names, k) for k, v in node.items()}
            return {"$ref": f"#/$defs/{names[text]}"}
        return {k: share(v, seen, defs, names, k) for k, v in node.items()}
    if isinstance(node, list):
        return [share(v, seen, defs, names, hint) for v in node]
    return node


def refs(node, found: Counter) -> None:
    if isinstance(node, dict):
        if "$ref" in node:
            found[node["$ref"].rsplit("/", 1)[1]] += 1
        for value in node.values():
            refs(value, found)
    elif isinstance(node, list):
        for value in node:
            refs(value, found)


def inline(node, defs: dict, once: set):
    """Put back the subtrees that, once their parent is shared, are referenced only once."""
    if isinstance(node, dict):
        if "$ref" in node and node["$ref"].rsplit("/", 1)[1] in once:
            return inline(defs[node["$ref"].rsplit("/", 1)[1]], defs, once)
        return {k: inline(v, defs, once) for k, v in node.items()}
    if isinstance(node, list):
        return [inline(v, defs, once) for v in node]
    return node


def main() -> None:
    repo, tag = sys.argv[1], sys.argv[2]
    commit = git(repo, "rev-parse", f"{tag}^{{commit}}").strip()
    schemas = {}
    for kind, path in CRDS.items():
        crd = yaml.safe_load(git(repo, "show", f"{commit}:{path}"))
        assert crd["spec"]["names"]["kind"] == kind, path
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
        schema = version["schema"]["openAPIV3Schema"]
        schema["properties"].pop("status", None)
        schemas[kind] = schema
    seen: Counter = Counter()
    for schema in schemas.values():
        count(schema, seen)
    defs: dict = {}
    names: dict = {}
    shared = {kind: share(s, seen, defs, names, kind) for kind, s in schemas.items()}
    found: Counter = Counter()
    refs([shared, defs], found)
    once = {name for name in defs if found[name] == 1}
    shared = inline(shared, defs, once)
    defs = {name: inline(d, defs, once) for name, d in defs.items() if name not in once}
    out = {
        "source": "https://github.com/ray-project/kuberay",
        "tag": tag,
        "commit": commit,
        "files": list(CRDS.values()),
        "apiVersion": f"ray.io/{VERSION}",
        "made_by": "tests/data/make_kuberay_schemas.py (see its docstring)",
        "note": "the CRDs' openAPIV3Schema without status; repeated subtrees moved to $defs",
        "$defs": dict(sorted(defs.items())),
        "schemas": shared,
    }
    json.dump(out, sys.stdout, separators=(",", ":"), sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
