"""A classifier named by a path or by MLflow: `models:/cycle-classifier@best`,
`models:/cycle-classifier/3` or `runs:/<run id>/model` resolve to the checkpoint logged inside
that MLflow model (beside its exported graph, see tracking.tracker), so CAMs and preprocessing
get what they need: the architecture, the input geometry, the weights.

Which store a URI is looked up in: the one given, else $MLFLOW_TRACKING_URI, else the jobs'
default (a SQLite file in the working folder), the same rule the jobs log by.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cycle.store import DEFAULT_STORE

MLFLOW_SCHEMES = ("models:/", "runs:/")
# A logged model's classifier checkpoint, in the model's folder (MLflow's extra_files).
CHECKPOINT_FILE = "classifier.pt"
CHECKPOINT_PATH = f"extra_files/{CHECKPOINT_FILE}"


def is_mlflow_uri(ref: str | Path) -> bool:
    return str(ref).startswith(MLFLOW_SCHEMES)


@contextmanager
def local_checkpoint(ref: str | Path, tracking_uri: str | None = None) -> Iterator[Path]:
    """The checkpoint file `ref` names: a path as it is, an MLflow URI downloaded to a temporary
    folder (removed on exit). Unknown names and models without a checkpoint are clear errors."""
    if not is_mlflow_uri(ref):
        yield Path(ref)
        return
    import mlflow

    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    folder = Path(tempfile.mkdtemp(prefix="cycle-model-"))
    try:
        try:
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=_artifact_uri(str(ref), store),
                dst_path=str(folder),
                tracking_uri=store,
            )
        except mlflow.exceptions.MlflowException as err:
            raise FileNotFoundError(f"{ref} not found in {store}: {err.message}") from err
        found = sorted(Path(got).rglob(CHECKPOINT_PATH))
        if not found:
            raise ValueError(
                f"{ref} (in {store}) holds no classifier checkpoint: it was logged by another "
                "tool or an older version of this project; pass the checkpoint file instead"
            )
        yield found[0]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _artifact_uri(ref: str, store: str) -> str:
    """Where the files of what `ref` names live (a file path, s3://..., mlflow-artifacts:/...),
    looked up through a client of `store` alone. MLflow's own `models:/` and `runs:/`
    resolvers read the process's tracking and registry URIs (by default ./mlflow.db, or whatever
    an earlier call set) instead of the store given, so every name is resolved here: a registry
    name (`models:/name@alias`, `models:/name/3`) to its version's logged model, a logged model
    (`models:/m-<id>`) to its artifact location, `runs:/<id>/<name>` to the model that run logged
    under that name (else that path among the run's files)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    if ref.startswith("runs:/"):
        run_id, _, inside = ref[len("runs:/") :].strip("/").partition("/")
        run = client.get_run(run_id)
        # MLflow 3 keeps a run's model as a logged model of that name, not in the run's files.
        logged = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{inside}'",
        )
        if logged:
            return logged[0].artifact_location
        return f"{run.info.artifact_uri.rstrip('/')}/{inside}".rstrip("/")
    name = ref[len("models:/") :].strip("/")
    if "@" in name:
        model, alias = name.split("@", 1)
        source = client.get_model_version_by_alias(model, alias).source
    elif "/" in name:
        model, number = name.rsplit("/", 1)
        source = client.get_model_version(model, number).source
    else:
        source = ref  # a logged model's id (models:/m-...)
    if source.startswith("models:/"):  # MLflow 3: a version's source is its logged model
        return client.get_logged_model(source[len("models:/") :].strip("/")).artifact_location
    return source


def ref_name(ref: str | Path) -> str:
    """A file-name-safe name for what `ref` names (`models:/cycle-classifier@best` ->
    `cycle-classifier@best`; a checkpoint path -> its folder's name)."""
    if not is_mlflow_uri(ref):
        return Path(ref).parent.name or Path(ref).stem
    text = str(ref).split(":/", 1)[1].strip("/")
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in text)


def checkpoint_into(ref: str | Path, folder: Path, tracking_uri: str | None = None) -> Path:
    """The checkpoint `ref` names as a file that outlives this call: a path as it is, an MLflow
    model's checkpoint copied to `folder/<ref_name>.pt` (atomically), for stages whose workers
    read it by path (shards)."""
    if not is_mlflow_uri(ref):
        return Path(ref)
    target = Path(folder) / f"{ref_name(ref)}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with local_checkpoint(ref, tracking_uri) as local:
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(local, tmp)
        tmp.replace(target)
    return target
