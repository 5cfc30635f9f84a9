"""The tracker: one place that knows the MLflow store, the experiment and what a run records, and
which run a resumed job reopens (`SavedRun`: the run id kept in an `mlflow_run.json`).

With `tracking.enabled: false` every call is a no-op, so library code logs unconditionally.
Which store a config logs to is `cycle.store`'s. `mlflow` is imported where it is used: with
tracking off, the cycle runs where it is not installed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cycle import faults
from cycle.checkpoint import load_classifier
from cycle.config import Config, flatten
from cycle.console import log
from cycle.data.shards import file_sha256
from cycle.io import atomic_write_json
from cycle.mlflow_ui import runs_url
from cycle.model_refs import CHECKPOINT_FILE
from cycle.store import artifact_root, server_problem, tracking_store, tracking_uri

# Without it MLflow 3's UI opens an experiment on its GenAI overview (traces, token usage); with it,
# on the training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def model_requirements() -> list[str]:
    """What a logged classifier needs to load, pinned to the versions that wrote it (in CI those of
    constraints.txt). Handed to MLflow so that it does not infer them: inference loads the model
    again in a subprocess that imports torch and MLflow, seconds for every logged model."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "cloudpickle", "mlflow")]


def _experiment(name: str, artifacts: str | None):
    """The experiment, made active; created with its artifact root when it does not exist yet."""
    import mlflow

    if artifacts is not None and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:
            pass  # another job created it a moment ago: use that one
    return mlflow.set_experiment(name)


class Tracker:
    """A context manager around one MLflow run (nested under an active run when asked).

    A tracking server that stops answering mid-job does not stop the job: the first failed call
    switches tracking off for the rest of the process (`Tracker.lost` says why), and what was not
    logged stays on disk beside the run (every stage's files, `mlflow_run.json` marking a child
    run incomplete), so `--resume` logs it once the server is back."""

    lost: str | None = None  # shared by every Tracker of the process

    def __init__(
        self,
        cfg: Config,
        run_name: str,
        nested: bool = False,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ):
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
            experiment = _experiment(self.cfg.tracking.experiment, artifact_root(uri))
            for key, value in EXPERIMENT_KIND.items():
                if experiment.tags.get(key) != value:
                    mlflow.set_experiment_tag(key, value)
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
        log(
            f"warning: MLflow at {tracking_store(self.cfg)} stopped answering: {Tracker.lost}. "
            "The job goes on; what it could not log stays beside the run and is logged by "
            "--resume."
        )

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    @property
    def active(self) -> bool:
        return self.run is not None and not Tracker.lost

    def log_config(self, cfg: Config | None = None) -> None:
        self.log_params(config_params(cfg or self.cfg))

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:
            return
        import mlflow

        items = sorted(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self._guard(
                "log params",
                lambda chunk=dict(items[start : start + 100]): mlflow.log_params(chunk),
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import mlflow

        clean = numbers(metrics)
        if clean:
            self._guard("log metrics", lambda: mlflow.log_metrics(clean, step=step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            self._guard(
                "log an artifact",
                lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path),
            )

    def log_image(
        self, path: str | Path, key: str, step: int = 0, run_id: str | None = None
    ) -> None:
        """A PNG as an MLflow image under `key` at `step`, in this run or in `run_id` (another run
        of the job's). Once: a resumed job that logged it before an interruption adds no copy."""
        if self.active and Path(path).is_file():
            import cv2
            import mlflow

            client, run_id = mlflow.MlflowClient(), run_id or self.run_id

            def log() -> None:
                logged = (a.path for a in client.list_artifacts(run_id, "images"))
                if any(p.startswith(f"images/{key}+step+{step}+") for p in logged):
                    return
                rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
                client.log_image(run_id, rgb, key=key, step=step)

            self._guard("log an image", log)

    def log_table(self, columns: Mapping[str, list], artifact_file: str) -> None:
        """Columns of equal length as an MLflow table (JSON the UI shows as a table)."""
        if self.active:
            import mlflow

            self._guard(
                "log a table",
                lambda: mlflow.log_table(data=dict(columns), artifact_file=artifact_file),
            )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            import mlflow

            self._guard("set tags", lambda: mlflow.set_tags(dict(tags)))

    def log_model(
        self, model, input_example, name: str = "model", registered_model_name: str | None = None
    ):
        """MLflow 3 saves PyTorch models as exported graphs (pt2), traced on `input_example`."""
        if not self.active:
            return None
        import mlflow.pytorch

        return self._guard(
            "log a model",
            lambda: mlflow.pytorch.log_model(
                model.eval(),
                name=name,
                input_example=input_example,
                registered_model_name=registered_model_name,
                pip_requirements=model_requirements(),
                validate_serving_input=False,  # see _log_checkpoint
            ),
        )

    def log_classifier(self, checkpoint: str | Path, name: str = "model") -> str | None:
        """A classifier checkpoint -> a model of this run that `mlflow.pytorch.load_model` gives
        back, taking any batch size; returns its URI (None when not tracking)."""
        if not self.active:
            return None
        return self._guard("log a model", lambda: _log_checkpoint(checkpoint, name).model_uri)

    def register_classifier(
        self, checkpoint: str | Path, alias: str, name: str = "model"
    ) -> str | None:
        """A classifier checkpoint -> this run's model, registered as tracking.registered_model_name
        with `alias` pointing at the new version; returns the version (None when not tracking)."""
        if not self.active:
            return None
        return self._guard("register a model", lambda: self._register(checkpoint, alias, name))

    def _register(self, checkpoint: str | Path, alias: str, name: str) -> str | None:
        import mlflow

        registry = self.cfg.tracking.registered_model_name
        client = mlflow.MlflowClient()
        digest = file_sha256(checkpoint)
        # Exactly once per (run, checkpoint): a job killed after registering, then resumed, finds
        # its version instead of adding another.
        version = next(
            (
                v.version
                for v in self._versions_of_this_run(client, registry)
                if v.tags.get("checkpoint_sha256") == digest
            ),
            None,
        )
        if version is None:
            info = _log_checkpoint(checkpoint, name)
            # The tag comes with the version in one call: no version exists without it.
            version = mlflow.register_model(
                info.model_uri, registry, tags={"checkpoint_sha256": digest}
            ).version
            faults.reached("register")
        client.set_registered_model_alias(registry, alias, str(version))
        return str(version)

    def _versions_of_this_run(self, client, registry: str) -> list:
        try:
            return list(
                client.search_model_versions(f"name='{registry}' and run_id='{self.run_id}'")
            )
        except Exception:  # no such registered model yet
            return []


def config_params(cfg: Config) -> dict[str, str]:
    """A config as MLflow params: dotted keys, values as text (None as "null")."""
    dump = cfg.model_dump(mode="json")
    return {k: ("null" if v is None else str(v)) for k, v in flatten(dump).items()}


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The loggable part of a metrics dict: numbers that are not NaN (text left out)."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)
    }


class OpenRun:
    """A run of the job's experiment written through MLflow's client, not the active-run stack: a
    job can feed several at once (the architectures that train side by side) while its own run
    stays the active one. Calls go through `job`'s guard, so an outage switches them off too."""

    def __init__(self, job: Tracker, run_id: str):
        import mlflow

        self.job, self.run_id = job, run_id
        self.client = mlflow.MlflowClient()

    @classmethod
    def create(
        cls,
        job: Tracker,
        run_name: str,
        tags: Mapping[str, str],
        config: Config | None = None,
        params: Mapping[str, str] | None = None,
    ) -> OpenRun | None:
        """A new run nested in `job`'s run, RUNNING, with `config` (or `params`) as its params."""
        import mlflow
        from mlflow.entities import Param

        client = mlflow.MlflowClient()
        nested = {**tags, "mlflow.parentRunId": job.run_id}

        def create() -> str:
            run = client.create_run(job.run.info.experiment_id, run_name=run_name, tags=nested)
            items = sorted((config_params(config) if config else dict(params or {})).items())
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
                chunk = items[start : start + 100]
                client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in chunk])
            return run.info.run_id

        run_id = job._guard("start a run", create)
        return None if run_id is None else cls(job, run_id)

    def finish(self, tags: Mapping[str, str]) -> None:
        """Set `tags` and mark the run FINISHED."""

        def finish() -> None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            self.client.set_terminated(self.run_id, "FINISHED")

        if self.job.active:
            self.job._guard("finish a run", finish)

    def log_steps(self, rows: list[tuple[int, Mapping[str, Any]]]) -> bool:
        """Metrics at steps, in one call; True when they were logged."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, value, now, step)
            for step, row in rows
            for key, value in numbers(row).items()
        ]
        if not batch or not self.job.active:
            return not batch
        return (
            self.job._guard(
                "log metrics", lambda: self.client.log_batch(self.run_id, metrics=batch) or True
            )
            is True
        )


def _log_checkpoint(checkpoint: str | Path, name: str):
    """Log a classifier checkpoint as an MLflow 3 PyTorch model: an exported graph for
    `mlflow.pytorch.load_model` (its input example holds two films: torch.export keeps a batch of
    one as a fixed size), with the checkpoint itself inside (what `load_classifier("models:/...")`
    and the jobs' `--model` read: architecture, input geometry, weights) and that geometry as the
    model's metadata, so the UI shows it."""
    import tempfile

    import mlflow.pytorch

    model, pre = load_classifier(checkpoint)
    example = np.zeros((2, 1, pre.size, pre.size), np.float32)
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    with tempfile.TemporaryDirectory() as folder:
        inside = Path(folder) / CHECKPOINT_FILE
        shutil.copyfile(checkpoint, inside)
        return mlflow.pytorch.log_model(
            model.eval(),
            name=name,
            input_example=example,
            pip_requirements=model_requirements(),
            # MLflow would load the model back and run the example through it, seconds of the
            # driver's CPU a model; the tests load every logged model back and compare logits.
            validate_serving_input=False,
            extra_files=[str(inside)],
            metadata={**meta, "cam_layer": "features", "cam_method": model.cam_method},
        )


class SavedRun(Tracker):
    """A Tracker whose MLflow run is kept in a json file beside the job's files (`mlflow_run.json`),
    so that a resumed job reopens the same run instead of starting a second one.

    `belongs`: what the saved run must match to be reopened (the job run's store, a child run's
    parent); one saved under another store or parent is left alone and the file rewritten. The file
    is written as soon as the run exists, before anything is logged to it; a new run logs `config`
    (default: `cfg`) as its params. With `completes`, the file also says whether everything was
    logged: `complete` is True when nothing is left to log, and `mark_complete()` says so."""

    def __init__(
        self,
        cfg: Config,
        record: Path,
        run_name: str,
        *,
        belongs: Mapping[str, Any] | None = None,
        config: Config | None = None,
        completes: bool = False,
        nested: bool = False,
        tags: Mapping[str, str] | None = None,
    ):
        self.record = Path(record)
        self.belongs = dict(belongs or {})
        saved = json.loads(self.record.read_text()) if self.record.is_file() else {}
        self.previous = saved if all(saved.get(k) == v for k, v in self.belongs.items()) else {}
        self.config = config
        self.completes = completes
        super().__init__(
            cfg, run_name, nested=nested, tags=tags, run_id=self.previous.get("run_id")
        )

    @property
    def complete(self) -> bool:
        return bool(self.previous.get("complete"))

    def __enter__(self) -> SavedRun:
        super().__enter__()
        if self.run is not None:
            kept = {
                k: v for k, v in self.previous.items() if k != "run_id" and k not in self.belongs
            }
            self.save(**{**kept, **({"complete": False} if self.completes else {})})
            if not self.previous:
                self.log_config(self.config)
        return self

    def save(self, **extra: Any) -> None:
        """Rewrite the file: this run, what it belongs to, and `extra`."""
        atomic_write_json(self.record, {"run_id": self.run_id, **self.belongs, **extra})

    def mark_complete(self) -> None:
        if self.run is not None and not Tracker.lost:  # else --resume logs it from the files
            self.save(complete=True)


def run_note(tracker: Tracker) -> str:
    """Where a job's run is, for its report and its last lines."""
    if tracker.run is None:
        return "tracking disabled"
    return f"MLflow run {tracker.run_id} at {tracking_store(tracker.cfg)}"


def browse_hint(tracker: Tracker) -> str:
    """How to see this run: the UI command for a local store, and the address of the training
    runs (MLflow 3's UI would otherwise open the experiment's GenAI overview)."""
    if tracker.run is None:
        return ""
    store = tracking_store(tracker.cfg)
    experiment = tracker.run.info.experiment_id
    if store.startswith(("http://", "https://")):
        return f"open {runs_url(store, experiment)}"
    return (
        f"mlflow ui --host 127.0.0.1 --backend-store-uri {store}, then open "
        f"{runs_url('http://127.0.0.1:5000', experiment)}"
    )


def latest_job_runs(store: str, experiment: str) -> tuple[str, str, list[str]] | None:
    """(experiment id, name of the latest finished cycle job run, names of its (cycle, arch)
    runs), or None when the experiment holds none."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    jobs = client.search_runs(
        [found.experiment_id],
        "tags.job = 'cycle' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not jobs:
        return None
    job = jobs[0]
    children = client.search_runs(
        [found.experiment_id], f"tags.mlflow.parentRunId = '{job.info.run_id}'"
    )
    names = sorted(c.info.run_name for c in children)
    return found.experiment_id, job.info.run_name, names
