"""Everything cheap, first: the checks a job runs before any training, so that a mistake ends
the job in seconds with a message naming it, not after an hour. Imports nothing heavy (torch,
MLflow, Ray) unless a check needs it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cycle.config import PHANTOM_LUNG_MODEL, Config
from cycle.store import store_problem


def input_problem(cfg: Config) -> str | None:
    """What stops this config from running, or None: the data root, the lung model on real
    data, a writable output_dir and Ray storage path (a bucket too), an MLflow server that
    answers."""
    if cfg.data.root is not None and not Path(cfg.data.root).exists():
        return f"data.root={cfg.data.root} does not exist"
    # lungseg.weights=phantom trains its model from nothing if needed: nothing to check here.
    phantom_model = cfg.lungseg.weights == PHANTOM_LUNG_MODEL
    if (cfg.data.root is not None or cfg.lungseg.weights) and not phantom_model:
        from cycle.lungseg import LungModelMissing, ensure_lung_model  # torch: only when needed

        try:
            # With these set it only checks, never trains.
            ensure_lung_model(cfg, log=lambda *_: None)
        except LungModelMissing as err:
            return str(err)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        return f"output_dir {out} is not writable: {err.strerror or err}"
    storage = cfg.storage_path()
    if "://" not in storage:
        try:
            Path(storage).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"resources.storage_path {storage} is not writable: {err.strerror or err}"
    else:
        problem = uri_storage_problem(storage)
        if problem:
            return problem
    return store_problem(cfg)


def uri_storage_problem(storage: str, timeout_s: float = 20.0) -> str | None:
    """A wrong bucket, missing credentials or an endpoint that does not answer, found by writing,
    reading back and deleting one small object where Ray Train will write its checkpoints
    (s3://, gs://, ...: pyarrow's file systems, as Ray uses them): in seconds, not after the
    first epoch. None when it works."""
    import uuid

    from pyarrow import fs as pafs

    probe = f"{storage.rstrip('/')}/.cycle-preflight-{uuid.uuid4().hex[:12]}"
    hint = (
        "check the bucket's name and region, this machine's credentials (an instance profile, "
        "IRSA, AWS_PROFILE) and, for an S3-compatible store, AWS_ENDPOINT_URL"
    )
    try:
        if probe.startswith("s3://"):
            # pyarrow's own S3 retries for minutes: short timeouts, two tries, then the message.
            filesystem, path = _quick_s3(probe, timeout_s), probe.split("://", 1)[1].split("?")[0]
        else:
            filesystem, path = pafs.FileSystem.from_uri(probe)
        with filesystem.open_output_stream(path) as handle:
            handle.write(b"cycle preflight")
        with filesystem.open_input_stream(path) as handle:
            written = handle.read()
        filesystem.delete_file(path)
    except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ... by backend
        return f"resources.storage_path {storage} is not writable ({err}); {hint}"
    if written != b"cycle preflight":
        return f"resources.storage_path {storage} does not read back what was written; {hint}"
    return None


def _quick_s3(uri: str, timeout_s: float):
    """An S3 file system like the one Ray gets from the URI, with short timeouts and few retries
    (the endpoint from AWS_ENDPOINT_URL, as pyarrow and boto3 read it)."""
    import os
    from urllib.parse import parse_qs, urlparse

    from pyarrow import fs as pafs

    query = {k: v[0] for k, v in parse_qs(urlparse(uri).query).items()}
    endpoint = (
        query.get("endpoint_override")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or (os.environ.get("AWS_ENDPOINT_URL"))
    )
    region = query.get("region") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and endpoint is None:
        try:  # AWS: the bucket's own region (a wrong one answers with a redirect, not the data)
            region = pafs.resolve_s3_region(urlparse(uri).netloc)
        except OSError:
            region = None  # the write below says what is wrong
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=endpoint,
        connect_timeout=timeout_s,
        request_timeout=timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    )
