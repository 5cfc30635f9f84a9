"""The studies' MLflow runs: a sweep (a parent run, a nested run per trial, the best trial's model
registered once) and an evidence study (its changes and report files)."""

from __future__ import annotations

from pathlib import Path

from cycle.config import Config
from cycle.tracking.tracker import SavedRun, Tracker


def track_sweep(
    cfg: Config,
    name: str,
    rows: list[dict],
    sweep_dir: Path,
    files: list[Path],
    best_model: Path | None,
) -> str | None:
    """A parent run for the sweep (kept in <sweep>/mlflow_run.json), a nested run per trial not
    logged yet, the sweep's `files`, and the best trial's model (`best_model`, rows[0]'s)
    registered once. Written from the driver only (one SQLite writer); returns what was
    registered."""
    record = sweep_dir / "mlflow_run.json"
    with SavedRun(cfg, record, f"sweep-{name}", tags={"job": "sweep"}) as parent:
        if parent.run is None:
            return None
        logged = set(parent.previous.get("trials", []))
        for row in rows:
            if row["trial_id"] not in logged:
                _track_trial(cfg, name, row)
                logged.add(row["trial_id"])
        registered = parent.previous.get("registered")
        parent.save(trials=sorted(logged), registered=registered)
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
            parent.save(
                trials=sorted(logged), registered={"trial_id": best["trial_id"], "message": message}
            )
            return message
    return None


def _track_trial(cfg: Config, sweep: str, row: dict) -> None:
    tags = {"trial_id": row["trial_id"], "status": row["status"], "sweep": sweep}
    with Tracker(cfg, run_name=f"trial-{row['trial_id']}", nested=True, tags=tags) as child:
        child.log_params({k: str(v) for k, v in row["values"].items()})
        for step, report in enumerate(row["history"]):
            child.log_metrics(
                {
                    k: v
                    for k, v in report.items()
                    if isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and k not in ("training_iteration",)
                },
                step=step,
            )


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
