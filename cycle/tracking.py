"""MLflow tracking: one place that knows the store, the experiment and what a run records.

With `tracking.enabled: false` every call is a no-op, so library code logs unconditionally.
The store is `tracking.uri`, else $MLFLOW_TRACKING_URI, else MLflow's local default (a SQLite
file, `mlflow.db`, in the working directory; no server needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


class Tracker:
    """A context manager around one MLflow run (nested under an active run when asked)."""

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
        if not self.enabled:
            return self
        import mlflow

        uri = tracking_uri(self.cfg)
        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.cfg.tracking.experiment)
        if self.resume_id is not None:
            self.run = mlflow.start_run(run_id=self.resume_id, nested=self.nested)
        else:
            self.run = mlflow.start_run(run_name=self.run_name, nested=self.nested, tags=self.tags)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            import mlflow

            mlflow.end_run(status="FAILED" if exc_type else "FINISHED")
            self.run = None

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    def log_config(self, cfg: Config | None = None) -> None:
        if self.run is None:
            return
        import mlflow

        params = {k: ("null" if v is None else str(v)) for k, v in flatten((cfg or self.cfg).model_dump(mode="json")).items()}
        items = sorted(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            mlflow.log_params(dict(items[start : start + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run is None:
            return
        import math

        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run is not None and Path(path).exists():
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_model(self, model, input_example, name: str = "model", registered_model_name: str | None = None):
        """MLflow 3 saves PyTorch models as exported graphs (pt2), traced on `input_example`."""
        if self.run is None:
            return None
        import mlflow.pytorch

        return mlflow.pytorch.log_model(model.eval(), name=name, input_example=input_example,
                                        registered_model_name=registered_model_name)

    def register_classifier(self, checkpoint: str | Path, alias: str, name: str = "model") -> str | None:
        """A classifier checkpoint -> this run's model, registered as tracking.registered_model_name
        with `alias` pointing at the new version; returns the version (None when not tracking)."""
        if self.run is None:
            return None
        import mlflow
        import numpy as np

        from cycle.checkpoint import load_classifier

        model, pre = load_classifier(checkpoint)
        example = np.zeros((1, 1, pre.size, pre.size), np.float32)
        registry = self.cfg.tracking.registered_model_name
        info = self.log_model(model, example, name=name, registered_model_name=registry)
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            mlflow.MlflowClient().set_registered_model_alias(registry, alias, str(version))
        return None if version is None else str(version)

