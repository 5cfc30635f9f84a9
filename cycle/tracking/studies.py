"""The studies' MLflow runs: a sweep (a parent run, a nested run per trial, the best trial's model
registered once) and an evidence study (its changes and report files)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from cycle.config import Config
from cycle.layout import MLFLOW_RUN
from cycle.tracking.tracker import OpenRun, SavedRun, Tracker


def sweep_run(cfg: Config, name: str, sweep_dir: Path) -> SavedRun:
    """The sweep's run, kept in <sweep>/mlflow_run.json (a resumed sweep reopens it). Opened before
    the trials start, so that their runs nest in it as they run (`LiveTrials`)."""
    return SavedRun(cfg, sweep_dir / MLFLOW_RUN, f"sweep-{name}", tags={"job": "sweep"})


def _save(parent: SavedRun, **changes: Any) -> None:
    """Update the sweep run's record (trials logged, live runs, registered) and keep it in
    `parent.previous`, which the record's readers use."""
    parent.previous = {**parent.previous, **changes, "run_id": parent.run_id}
    parent.save(**{k: v for k, v in parent.previous.items() if k not in ("run_id",)})


def _trial_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in report.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "training_iteration"
    }


class LiveTrials(Callback):
    """The trials' runs while the sweep runs: each trial gets its run, nested in the sweep's, when
    it starts (its values as params), and every result Tune reports reaches it as it comes (step =
    the report's index, as `track_sweep` logs them). The runs and their logged steps are kept in
    the sweep run's record, so a resumed sweep feeds the same runs and `track_sweep` completes
    them instead of making others. Tune calls this in the driver.

    `sweep_run` is the driver's open sweep run, set before `fit()`: a restored Tuner unpickles its
    own copy of this callback, which finds the run here."""

    sweep_run: SavedRun | None = None

    def __init__(self, keys: list[str], sweep: str):
        self.keys, self.sweep = list(keys), sweep

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        parent, live = self._open(trial)
        if live is None:
            return
        step = int(result.get("training_iteration", 1)) - 1
        runs = dict(parent.previous.get("live", {}))
        if step < runs[trial.trial_id]["steps"]:
            return  # logged before a resume
        if live.log_steps([(step, _trial_metrics(result))]):
            runs[trial.trial_id] = {"run_id": live.run_id, "steps": step + 1}
            _save(parent, live=runs)

    def _open(self, trial) -> tuple[SavedRun | None, OpenRun | None]:
        parent = LiveTrials.sweep_run
        if parent is None or not parent.active:
            return parent, None
        runs = dict(parent.previous.get("live", {}))
        if trial.trial_id in runs:
            return parent, OpenRun(parent, runs[trial.trial_id]["run_id"])
        tags = {"trial_id": trial.trial_id, "status": "running", "sweep": self.sweep}
        values = {k: str(trial.config.get(k)) for k in self.keys}
        live = OpenRun.create(parent, f"trial-{trial.trial_id}", tags, params=values)
        if live is not None:
            runs[trial.trial_id] = {"run_id": live.run_id, "steps": 0}
            _save(parent, live=runs)
        return parent, live


def track_sweep(
    parent: SavedRun,
    cfg: Config,
    rows: list[dict],
    files: list[Path],
    best_model: Path | None,
) -> str | None:
    """The sweep's run (`sweep_run`, open): each trial's run completed (created if it did not run
    live), the sweep's `files`, and the best trial's model (`best_model`, rows[0]'s) registered
    once. Written from the driver only (one SQLite writer); returns what was registered."""
    if parent.run is None:
        return None
    logged = set(parent.previous.get("trials", []))
    for row in rows:
        if row["trial_id"] not in logged:
            _track_trial(parent, row)
            logged.add(row["trial_id"])
            _save(parent, trials=sorted(logged))
    registered = parent.previous.get("registered")
    for file in files:
        parent.log_artifact(file, "sweep")
    best = rows[0]
    parent.log_metrics({"best_objective": best["objective"]})
    parent.set_tags({"best_trial": best["trial_id"]})
    if (registered or {}).get("trial_id") == best["trial_id"]:
        return registered["message"]  # a resumed sweep with the same winner: no new version
    if best_model is None:
        return None
    version = parent.register_classifier(best_model, alias="sweep_best", name="best_model")
    if version is not None:
        message = f"{cfg.tracking.registered_model_name} v{version} (alias 'sweep_best')"
        _save(parent, registered={"trial_id": best["trial_id"], "message": message})
        return message
    return None


def _track_trial(parent: SavedRun, row: dict) -> None:
    """A trial's run, finished: its live run (the steps it did not get yet), else a new one."""
    sweep = parent.run_name.removeprefix("sweep-")
    tags = {"trial_id": row["trial_id"], "status": row["status"], "sweep": sweep}
    known = parent.previous.get("live", {}).get(row["trial_id"])
    if known is not None:
        run = OpenRun(parent, known["run_id"])
        done = known["steps"]
    else:
        values = {k: str(v) for k, v in row["values"].items()}
        run = OpenRun.create(parent, f"trial-{row['trial_id']}", tags, params=values)
        done = 0
    if run is None:
        return
    steps = [(step, _trial_metrics(report)) for step, report in enumerate(row["history"])]
    run.log_steps(steps[done:])
    run.finish(tags)


def track_evidence(cfg: Config, name: str, table: dict, report: Path) -> None:
    """The evidence study's run: the config, each (arch, variant, metric) change, and the report
    folder's files (the report, its tables as JSON, the probe's points and its plot)."""
    with Tracker(cfg, run_name=name, tags={"job": "evidence"}) as tracker:
        tracker.log_config()
        for arch, rows in table.items():
            for variant, row in rows.items():
                tracker.log_metrics(
                    {f"{arch}.{variant}.{metric}_change": m["change"] for metric, m in row.items()}
                )
        for path in sorted(report.parent.iterdir()):
            if path.is_file() and path.suffix in (".md", ".json", ".png"):
                tracker.log_artifact(path)
