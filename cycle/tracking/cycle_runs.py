"""The cycle job's MLflow runs: a run per job, a nested run per (cycle, architecture) with its
curves, metrics, pictures and weights, and the best model registered. Each takes the run's layout
and results, never the runner; every file it reads is named by `cycle.layout`."""

from __future__ import annotations

import json
from pathlib import Path

from cycle import faults
from cycle.config import Config
from cycle.data.shards import MANIFEST
from cycle.evaluate import EVAL_SPLITS
from cycle.io import atomic_write_json
from cycle.layout import (
    BEST,
    CAM_BEFORE_AFTER,
    CAM_GRID,
    CURVES,
    HISTORY,
    METRICS,
    MLFLOW_RUN,
    RECORDS,
    REGISTERED,
    REPORT,
    ROC_PR,
    SAVED_CONFIG,
    RunLayout,
    predictions,
    stage_config,
)
from cycle.mlflow_ui import compare_url
from cycle.report import cycle_pictures, job_note, predictions_table
from cycle.store import tracking_uri
from cycle.tracking.tracker import OpenRun, SavedRun, Tracker


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


def cam_by_cycle(arch: str) -> str:
    """The job run's image key for an architecture's CAM grids, one step per cycle."""
    return f"cam_by_cycle_{arch}"


def child_run_name(k: int, arch: str) -> str:
    """How a (cycle, arch) run reads in the UI's runs table."""
    return f"cycle {k} · {arch}"


def child_run(job: Tracker, cfg: Config, layout: RunLayout, k: int, arch: str) -> SavedRun:
    """The (cycle, arch) run nested in the job's run, kept in the evaluate stage's
    mlflow_run.json: created when its training starts (`LiveCurves`), completed once the stage is
    evaluated (`track_cycle`), reopened by a resumed job, never made twice: a run the store
    holds but the record does not (the server went away between making it and answering) is
    found by its tags and taken up."""
    record = layout.evaluate(k, arch) / MLFLOW_RUN
    known = json.loads(record.read_text()) if record.is_file() else {}
    if job.active and known.get("parent") != job.run_id:
        found = _existing_child(job, k, arch)
        if found:
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record, {"run_id": found, "parent": job.run_id, "complete": False})
    return SavedRun(
        cfg,
        record,
        child_run_name(k, arch),
        belongs={"parent": job.run_id},
        config=stage_config(cfg, layout, k, arch),
        completes=True,
        nested=True,
        tags={"cycle": str(k), "arch": arch, "job_run": layout.name},
    )


def _existing_child(job: Tracker, k: int, arch: str) -> str | None:
    """The id of the job run's (cycle k, arch) child run in the store, if one exists."""
    import mlflow

    def search() -> str | None:
        runs = mlflow.MlflowClient().search_runs(
            [job.run.info.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{job.run_id}' and tags.cycle = '{k}' "
                f"and tags.arch = '{arch}'"
            ),
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    return job._guard("look up a run", search)


class LiveCurves:
    """The (cycle, arch) runs of a training stage while it trains: each is created before its
    training starts, and every `follow()` logs the epochs that history.json (written by the
    training's rank 0 after each epoch) shows since the last call, so the UI's charts move
    during training. The count of epochs logged is kept in the run's record: a resumed job logs
    each epoch once. Driver thread only (one writer for SQLite stores)."""

    def __init__(self, job: Tracker, cfg: Config, layout: RunLayout, k: int, archs: list[str]):
        self.layout, self.k = layout, k
        self.runs: dict[str, tuple[SavedRun, OpenRun]] = {}
        if not job.active:
            return
        for arch in archs:
            saved = child_run(job, cfg, layout, k, arch)
            if saved.complete:
                continue
            if saved.previous.get("run_id"):
                live = OpenRun(job, saved.previous["run_id"])
            else:
                live = OpenRun.create(job, saved.run_name, saved.tags, saved.config)
                if live is None:
                    return  # the server is gone: the job goes on, --resume logs the rest
                saved.previous = {"run_id": live.run_id, **saved.belongs, "epochs": 0}
                saved.record.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(saved.record, {**saved.previous, "complete": False})
            self.runs[arch] = (saved, live)

    def follow(self) -> None:
        for arch, (saved, live) in self.runs.items():
            history = self.layout.train(self.k, arch) / HISTORY
            logged = saved.previous.get("epochs", 0)
            rows = _epochs_after(history, logged) if history.is_file() else []
            if rows and live.log_steps(rows):
                saved.previous["epochs"] = rows[-1][0]
                atomic_write_json(saved.record, {**saved.previous, "complete": False})


def _epochs_after(history: Path, logged: int) -> list[tuple[int, dict]]:
    """(epoch, metrics) of history.json's rows after epoch `logged`."""
    try:
        rows = json.loads(history.read_text())
    except (OSError, ValueError):  # replaced under us: read it next time
        return []
    return [
        (row["epoch"], {key: v for key, v in row.items() if key != "epoch"})
        for row in rows
        if row["epoch"] > logged
    ]


def track_cycle(
    job: Tracker,
    cfg: Config,
    layout: RunLayout,
    k: int,
    arch: str,
    metrics: dict,
    shards: Path | None,
) -> bool:
    """One evaluated (cycle, arch) -> its run nested in the job's run: the epochs not logged live,
    metrics, pictures, the shard manifest, the weights. A child run cut off half-way is reopened
    and completed, never left beside a second one; one logged in full before an interruption is
    left as it is (False: nothing logged now). Written from the driver's thread only."""
    train_dir = layout.train(k, arch)
    child = child_run(job, cfg, layout, k, arch)
    if child.complete:
        return False  # logged before the interruption
    logged = child.previous.get("epochs", 0)
    with child:
        rows = _epochs_after(train_dir / HISTORY, logged)
        for epoch, row in rows:
            child.log_metrics(row, step=epoch)
        if child.active:  # the count survives a kill between here and the end
            child.save(complete=False, epochs=rows[-1][0] if rows else logged)
        child.log_metrics(metrics)
        for picture in cycle_pictures(layout, k, arch):
            child.log_artifact(picture, "pictures")
        # MLflow's image view shows each run's image at the slider's step, exactly: every
        # (cycle, arch) run logs its pictures at one step, so one card lines up every cycle and
        # architecture side by side; the job run keeps each architecture's CAM grids with the
        # cycle as the step (its slider walks through the cycles).
        evaluated = layout.evaluate(k, arch)
        for key, picture in (("cam_grid", CAM_GRID), ("roc_pr", ROC_PR)):
            child.log_image(evaluated / picture, key=key)
        if k:
            child.log_image(evaluated / CAM_BEFORE_AFTER, key="cam_before_after")
        child.log_image(evaluated / CAM_GRID, key=cam_by_cycle(arch), step=k, run_id=job.run_id)
        for split in EVAL_SPLITS:
            table = predictions_table(train_dir / predictions(split))
            if table is not None:
                child.log_table(table, f"predictions/{split}.json")
        if shards is not None:
            child.log_artifact(shards / MANIFEST, "shards")
        faults.reached("track")
        child.log_artifact(train_dir / METRICS)
        if cfg.tracking.log_models == "every":
            child.log_classifier(train_dir / BEST)  # the weights this cycle chose, on val
        child.mark_complete()
    return True


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
