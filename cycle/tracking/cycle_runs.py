"""The cycle job's MLflow runs: a run per job, a nested run per (cycle, architecture) with its
curves, metrics, pictures and weights, and the best model registered. Each takes the run's layout
and results, never the runner; every file it reads is named by `cycle.layout`."""

from __future__ import annotations

import json
from pathlib import Path

from cycle import faults
from cycle.config import Config
from cycle.data.shards import MANIFEST
from cycle.io import atomic_write_json
from cycle.layout import (
    BEST,
    CURVES,
    HISTORY,
    METRICS,
    MLFLOW_RUN,
    RECORDS,
    REGISTERED,
    REPORT,
    SAVED_CONFIG,
    RunLayout,
    stage_config,
)
from cycle.mlflow_ui import compare_url
from cycle.report import cycle_pictures, job_note
from cycle.store import tracking_uri
from cycle.tracking.tracker import SavedRun, Tracker


def cycle_job_run(cfg: Config, run_name: str) -> SavedRun:
    """The cycle job's run, kept in <run>/mlflow_run.json: `--resume` reopens it while the store
    is the same."""
    return SavedRun(
        cfg,
        RunLayout.of(cfg, run_name).file(MLFLOW_RUN),
        run_name,
        belongs={"uri": tracking_uri(cfg)},
        tags={"job": "cycle"},
    )


def child_run_name(k: int, arch: str) -> str:
    """How a (cycle, arch) run reads in the UI's runs table."""
    return f"cycle {k} · {arch}"


def track_cycle(
    job: Tracker,
    cfg: Config,
    layout: RunLayout,
    k: int,
    arch: str,
    metrics: dict,
    shards: Path | None,
) -> None:
    """One evaluated (cycle, arch) -> a run nested in the job's run: the stage's config, per-epoch
    curves, metrics, pictures, the shard manifest. A child run cut off half-way is reopened and
    completed, never left beside a second one; one logged in full before an interruption is left
    as it is. Written from the driver's thread only."""
    train_dir = layout.train(k, arch)
    child = SavedRun(
        cfg,
        layout.evaluate(k, arch) / MLFLOW_RUN,
        child_run_name(k, arch),
        belongs={"parent": job.run_id},
        config=stage_config(cfg, layout, k, arch),
        completes=True,
        nested=True,
        tags={"cycle": str(k), "arch": arch, "job_run": layout.name},
    )
    if child.complete:
        return  # logged before the interruption
    with child:
        for row in json.loads((train_dir / HISTORY).read_text()):
            child.log_metrics(
                {key: v for key, v in row.items() if key != "epoch"}, step=row["epoch"]
            )
        child.log_metrics(metrics)
        for picture in cycle_pictures(layout, k, arch):
            child.log_artifact(picture, "pictures")
        if shards is not None:
            child.log_artifact(shards / MANIFEST, "shards")
        faults.reached("track")
        child.log_artifact(train_dir / METRICS)
        if cfg.tracking.log_models == "every":
            child.log_classifier(train_dir / BEST)  # the weights this cycle chose, on val
        child.mark_complete()


def register_best(
    tracker: Tracker, layout: RunLayout, results: dict[str, list[dict]]
) -> str | None:
    """The job's product -> registry: each architecture's last cycle (what the refinement made),
    and of those the one with the highest val accuracy (test never chooses)."""
    if not tracker.active:
        return None
    best = max(
        (
            (cycles[-1]["val_accuracy"], len(cycles) - 1, arch)
            for arch, cycles in results.items()
            if cycles
        ),
        default=None,
    )
    if best is None:
        return None
    _, k, arch = best
    # A finished run resumed again registers nothing new: same run, same winner, same version.
    record = layout.file(REGISTERED)
    done = json.loads(record.read_text()) if record.is_file() else {}
    if done.get("run_id") == tracker.run_id and (done.get("arch"), done.get("cycle")) == (arch, k):
        return done["message"]
    version = tracker.register_classifier(layout.best(k, arch), alias="best")
    tracker.set_tags({"best_arch": arch, "best_cycle": str(k)})
    if version is None or Tracker.lost:
        return None
    registry = tracker.cfg.tracking.registered_model_name
    message = f"{registry} v{version} (alias 'best'): {arch}, cycle {k}"
    atomic_write_json(
        record, {"run_id": tracker.run_id, "arch": arch, "cycle": k, "message": message}
    )
    return message


def describe_job_run(
    tracker: Tracker,
    cfg: Config,
    layout: RunLayout,
    results: dict[str, list[dict]],
    stopped: dict[str, str],
) -> None:
    """The job run's description in the UI (`mlflow.note.content`, markdown, see
    `report.job_note`), with a link that opens MLflow's comparison of every (cycle, arch) run."""
    if not tracker.active:
        return
    children = []
    for arch, cycles in results.items():
        for k in range(len(cycles)):
            record = layout.evaluate(k, arch) / MLFLOW_RUN
            if record.is_file():
                children.append(json.loads(record.read_text())["run_id"])
    compare = compare_url("", tracker.run.info.experiment_id, children)
    note = job_note(layout.name, cfg.enhance.mode, results, stopped, compare)
    tracker.set_tags({"mlflow.note.content": note})


def log_job_files(tracker: Tracker, layout: RunLayout) -> None:
    """A finished cycle job's own files (report, curves, config, records) -> its run."""
    for name in (REPORT, CURVES, SAVED_CONFIG, RECORDS):
        tracker.log_artifact(layout.file(name))
