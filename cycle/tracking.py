"""MLflow tracking: one place that knows the store, the experiment and what a run records.

With `tracking.enabled: false` every call is a no-op, so library code logs unconditionally.
The store is `tracking.uri`, else $MLFLOW_TRACKING_URI, else MLflow's local default (a SQLite
file, `mlflow.db`, in the working directory; no server needed).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cycle import faults
from cycle.config import Config


def tracking_uri(cfg: Config) -> str | None:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def server_problem(uri: str | None) -> str | None:
    """Why a tracking server does not answer its /health, or None (also for a local store: a
    file does not go away)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        return None
    except OSError as err:
        return str(err)


class Tracker:
    """A context manager around one MLflow run (nested under an active run when asked).

    A tracking server that stops answering mid-job does not stop the job: the first failed call
    switches tracking off for the rest of the process (`Tracker.lost` says why), and what was not
    logged stays on disk beside the run (every stage's files, `mlflow_run.json` marking a child
    run incomplete), so `--resume` logs it once the server is back."""

    lost: str | None = None  # shared by every Tracker of the process

    def __init__(self, cfg: Config, run_name: str, nested: bool = False, tags: Mapping[str, str] | None = None,
                 run_id: str | None = None):
        """`run_id`: reopen that run (a resumed job keeps its MLflow run)."""
        self.cfg = cfg
        self.resume_id = run_id
        self.enabled = cfg.tracking.enabled
        self.run_name = run_name
        self.nested = nested
        self.tags = dict(tags or {})
        self.run = None

    def __enter__(self) -> Tracker:
        if not self.enabled or Tracker.lost:
            return self
        import mlflow

        uri = tracking_uri(self.cfg)
        if uri and uri.startswith(("http://", "https://")):
            # Fail in seconds, not MLflow's default of minutes of retries per call.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

        def start():
            if uri:
                mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(self.cfg.tracking.experiment)
            if self.resume_id is not None:
                return mlflow.start_run(run_id=self.resume_id, nested=self.nested)
            return mlflow.start_run(run_name=self.run_name, nested=self.nested, tags=self.tags)

        self.run = self._guard("start a run", start)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            import mlflow

            self.run = None
            if Tracker.lost:
                return  # left RUNNING on the server; --resume reopens and finishes it
            try:
                mlflow.end_run(status="FAILED" if exc_type else "FINISHED")
            except Exception as err:
                self._lose(err, "end a run")

    def _guard(self, what: str, call: Callable):
        """Run one MLflow call; if the server has gone, note it and carry on without tracking."""
        if Tracker.lost:
            return None
        try:
            return call()
        except Exception as err:
            if server_problem(tracking_uri(self.cfg)) is None:
                raise  # the server is there: a real mistake, not an outage
            self._lose(err, what)
            return None

    def _lose(self, err: Exception, what: str) -> None:
        Tracker.lost = f"could not {what} ({type(err).__name__}: {str(err)[:200]})"
        print(f"warning: MLflow at {tracking_uri(self.cfg)} stopped answering: {Tracker.lost}. The job goes on; "
              "what it could not log stays beside the run and is logged by --resume.", file=sys.stderr, flush=True)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    @property
    def active(self) -> bool:
        return self.run is not None and not Tracker.lost

    def log_config(self, cfg: Config | None = None) -> None:
        if not self.active:
            return
        import mlflow

        params = {k: ("null" if v is None else str(v)) for k, v in flatten((cfg or self.cfg).model_dump(mode="json")).items()}
        items = sorted(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self._guard("log params", lambda chunk=dict(items[start : start + 100]): mlflow.log_params(chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import math

        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        if clean:
            self._guard("log metrics", lambda: mlflow.log_metrics(clean, step=step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            self._guard("log an artifact", lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            import mlflow

            self._guard("set tags", lambda: mlflow.set_tags(dict(tags)))

    def log_model(self, model, input_example, name: str = "model", registered_model_name: str | None = None):
        """MLflow 3 saves PyTorch models as exported graphs (pt2), traced on `input_example`."""
        if not self.active:
            return None
        import mlflow.pytorch

        return self._guard("log a model", lambda: mlflow.pytorch.log_model(
            model.eval(), name=name, input_example=input_example, registered_model_name=registered_model_name))

    def register_classifier(self, checkpoint: str | Path, alias: str, name: str = "model") -> str | None:
        """A classifier checkpoint -> this run's model, registered as tracking.registered_model_name
        with `alias` pointing at the new version; returns the version (None when not tracking)."""
        if not self.active:
            return None
        return self._guard("register a model", lambda: self._register(checkpoint, alias, name))

    def _register(self, checkpoint: str | Path, alias: str, name: str) -> str | None:
        import mlflow
        import mlflow.pytorch
        import numpy as np

        from cycle.checkpoint import load_classifier
        from cycle.data.shards import file_sha256

        registry = self.cfg.tracking.registered_model_name
        client = mlflow.MlflowClient()
        digest = file_sha256(checkpoint)
        # Exactly once per (run, checkpoint): a job killed after registering, then resumed, finds
        # its version instead of adding another.
        version = next((v.version for v in self._versions_of_this_run(client, registry)
                        if v.tags.get("checkpoint_sha256") == digest), None)
        if version is None:
            model, pre = load_classifier(checkpoint)
            example = np.zeros((1, 1, pre.size, pre.size), np.float32)
            info = mlflow.pytorch.log_model(model.eval(), name=name, input_example=example)
            # The tag comes with the version in one call: no version exists without it.
            version = mlflow.register_model(info.model_uri, registry, tags={"checkpoint_sha256": digest}).version
            faults.reached("register")
        client.set_registered_model_alias(registry, alias, str(version))
        return str(version)

    def _versions_of_this_run(self, client, registry: str) -> list:
        try:
            return list(client.search_model_versions(f"name='{registry}' and run_id='{self.run_id}'"))
        except Exception:  # no such registered model yet
            return []

