"""Which MLflow store a config logs to, and whether it can take a job's runs. Cheap to import (no
MLflow, torch or Ray): a job asks it before anything heavy loads, and fails in a second.

The store is `tracking.uri`, else $MLFLOW_TRACKING_URI, else MLflow's local default (a SQLite
file, `mlflow.db`, in the working directory; no server needed).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cycle.config import Config

DEFAULT_STORE = "sqlite:///mlflow.db"  # MLflow's own default: a SQLite file in the working folder


def tracking_uri(cfg: Config) -> str | None:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")


def tracking_store(cfg: Config) -> str:
    """The store this config logs to, for people to read: the URI, or MLflow's default store."""
    return tracking_uri(cfg) or DEFAULT_STORE


def artifact_root(uri: str | None) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (`<store's folder>/mlruns`)
    rather than MLflow's default `./mlruns` under whatever folder the process runs in, so one
    store's artifacts never scatter over the folders its jobs were started from. None (the
    server's or MLflow's own choice) for any other store."""
    store = uri or DEFAULT_STORE
    if not store.startswith("sqlite:///"):
        return None
    database = Path(store.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlruns").as_uri()


def server_problem(uri: str | None) -> str | None:
    """Why a tracking server cannot take this job's runs, or None (also for a local store: a file
    does not go away). Asks a real tracking endpoint, not only /health: MLflow 3 answers /health
    to any Host header but 403 "Invalid Host header" to API calls from a name it was not
    started with (`--allowed-hosts`)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    base = uri.rstrip("/")
    try:
        urllib.request.urlopen(base + "/health", timeout=5).read()
        urllib.request.urlopen(
            base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10
        ).read()
        return None
    except urllib.error.HTTPError as err:
        hint = ""
        if err.code == 403:
            host = urllib.parse.urlsplit(base).hostname
            hint = f"; start the server with --allowed-hosts naming {host}"
        return f"HTTP {err.code} {err.reason}{hint}"
    except OSError as err:
        return str(err)


def store_problem(cfg: Config) -> str | None:
    """Why this config cannot log (a tracking server that does not answer), or None."""
    uri = tracking_uri(cfg)
    problem = server_problem(uri) if cfg.tracking.enabled else None
    if problem:
        return (
            f"MLflow tracking server {uri} is not reachable ({problem}); start it or unset "
            "MLFLOW_TRACKING_URI / tracking.uri to use the local store"
        )
    return None
