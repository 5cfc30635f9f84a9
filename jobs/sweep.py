"""Sweep the cycle's settings with Ray Tune (ASHA stops bad trials after their first cycles).

    python jobs/sweep.py --space tune_spaces/default.yaml [--config FILE] [--set k=v ...]
                         [--name NAME] [--resume NAME]
    ray job submit --working-dir . -- python jobs/sweep.py --space tune_spaces/architectures.yaml

Each trial is a short cycle with the trial's values, scored on val (sweep.objective). At the end:
a table of trials (best first), a settings-vs-objective plot, MLflow runs (a parent for the sweep,
a nested run per trial, the best trial's model registered), the best settings as a `--set` line
and as a config file for `python jobs/cycle.py --config`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common
import numpy as np

from cycle.config import ConfigError, dump_yaml


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def track(cfg, name: str, rows: list[dict], sweep_dir: Path, files: list[Path]) -> str | None:
    """Parent run for the sweep, a nested run per trial, the best trial's model registered.
    Written from this driver only (one SQLite writer)."""
    from cycle.sweep import trial_run_dir
    from cycle.tracking import Tracker

    parent_file = sweep_dir / "mlflow_run.json"
    previous = json.loads(parent_file.read_text()) if parent_file.is_file() else {}
    with Tracker(cfg, run_name=f"sweep-{name}", tags={"job": "sweep"}, run_id=previous.get("run_id")) as parent:
        if parent.run is None:
            return None
        import mlflow

        if not previous:
            parent.log_config()
        from cycle.io import atomic_write_json

        atomic_write_json(parent_file, {"run_id": parent.run_id})
        logged = set(previous.get("trials", []))
        for row in rows:
            if row["trial_id"] in logged:
                continue
            with Tracker(cfg, run_name=f"trial-{row['trial_id']}", nested=True,
                         tags={"trial_id": row["trial_id"], "status": row["status"], "sweep": name}) as child:
                mlflow.log_params({k: str(v) for k, v in row["values"].items()})
                for step, report in enumerate(row["history"]):
                    child.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))
                                       and not isinstance(v, bool) and k not in ("training_iteration",)}, step=step)
            logged.add(row["trial_id"])
        record = {"run_id": parent.run_id, "trials": sorted(logged), "registered": previous.get("registered")}
        atomic_write_json(parent_file, record)
        for file in files:
            parent.log_artifact(file, "sweep")
        best = rows[0]
        parent.log_metrics({"best_objective": best["objective"]})
        mlflow.set_tags({"best_trial": best["trial_id"]})
        if (record["registered"] or {}).get("trial_id") == best["trial_id"]:
            return record["registered"]["message"]  # a resumed sweep with the same winner: no new version
        root = trial_run_dir(sweep_dir, best)
        cycles = sorted(root.glob("cycle_*/*/train/best.pt"), key=lambda p: int(p.parts[-4].split("_")[1]))
        if not cycles:
            return None
        version = parent.register_classifier(cycles[-1], alias="sweep_best", name="best_model")
        if version is not None:
            message = f"{cfg.tracking.registered_model_name} v{version} (alias 'sweep_best')"
            atomic_write_json(parent_file, {**record, "registered": {"trial_id": best["trial_id"], "message": message}})
            return message
    return None


def main() -> None:
    parser = _common.config_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--name", help="name of a new sweep (default: sweep-<time>)")
    group.add_argument("--resume", metavar="NAME", help="continue the sweep NAME: finished trials are kept")
    args = parser.parse_args()
    cfg = _common.config_from(args)

    from cycle.sweep import (
        best_config,
        best_overrides,
        check_objective,
        read_space,
        run_sweep,
        summary_markdown,
        validate_space,
    )

    try:
        space = read_space(args.space)
        validate_space(space, cfg, source=args.space)
        check_objective(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    name = args.resume or args.name or time.strftime("%Y%m%d-%H%M%S")
    print(f"sweep        {name}: {len(space)} setting(s) from {args.space}: {', '.join(space)}")
    print(f"trials       {cfg.sweep.num_samples} draw(s) per grid point, baseline + {cfg.cycles.max} cycle(s) each, "
          f"ASHA (grace {cfg.sweep.grace_period}, reduction {cfg.sweep.reduction_factor})")
    print(f"objective    {cfg.sweep.objective} ({cfg.sweep.mode}; lung_weight {cfg.sweep.lung_weight}), on val", flush=True)

    from cycle import plots
    from cycle.io import atomic_write_json, atomic_write_text

    started = time.perf_counter()
    try:
        rows, sweep_dir = run_sweep(cfg, space, name, resume=bool(args.resume), log=log)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if not rows or all(np.isnan(r["objective"]) for r in rows):
        sys.exit(f"error: no trial reported an objective; see {sweep_dir}")
    table = summary_markdown(rows, space, cfg.sweep.objective)
    best = rows[0]
    overrides = best_overrides(best)
    config_file = atomic_write_text(sweep_dir / "best_config.yaml",
                                    f"# best trial {best['trial_id']} of sweep {name} ({cfg.sweep.objective} "
                                    f"{best['objective']:.4f})\n" + dump_yaml(best_config(cfg, best)))
    summary = atomic_write_text(sweep_dir / "summary.md", "\n".join([
        f"# Sweep {name}", "", f"Objective: {cfg.sweep.objective} ({cfg.sweep.mode}), on val; "
        "each trial's value at its last report (ASHA stops some after fewer cycles).", "",
        table, "", "![settings vs objective](settings_vs_objective.png)", "",
        "Best settings: `" + " ".join(f"--set {o}" for o in overrides) + "`", ""]))
    atomic_write_json(sweep_dir / "trials.json", [{k: v for k, v in r.items() if k != "history"} for r in rows])
    picture = plots.sweep_scatter(rows, list(space), cfg.sweep.objective, sweep_dir / "settings_vs_objective.png")
    registered = track(cfg, name, rows, sweep_dir, [summary, sweep_dir / "trials.json", picture, config_file,
                                                    sweep_dir / "space.yaml"])
    stopped = sum(r["status"] == "stopped early" for r in rows)
    print("\n" + table)
    print(f"\ntrials       {len(rows)} ({stopped} stopped early by ASHA, "
          f"{sum(r['status'] == 'error' for r in rows)} failed)")
    print(f"best         {best['trial_id']}: {cfg.sweep.objective} {best['objective']:.4f}")
    print("best --set   " + " ".join(f"--set {o}" for o in overrides))
    print(f"best config  {config_file}  (python jobs/cycle.py --config {config_file})")
    if registered:
        print(f"registered   {registered}")
    print(f"summary      {summary}")
    print(f"finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
