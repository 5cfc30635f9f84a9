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
import sys
import time

import _common
import numpy as np

from cycle.config import ConfigError
from cycle.console import log
from cycle.preflight import input_problem
from cycle.report import write_sweep_report
from cycle.sweep import (
    best_config,
    best_overrides,
    check_objective,
    read_space,
    run_sweep,
    sweep_folder,
    trial_model,
    validate_space,
)
from cycle.tracking.studies import LiveTrials, sweep_run, track_sweep


def main() -> None:
    parser = _common.config_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    parser.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--name", help="name of a new sweep (default: sweep-<time>)")
    group.add_argument(
        "--resume", metavar="NAME", help="continue the sweep NAME: finished trials are kept"
    )
    args = parser.parse_args()
    cfg = _common.config_from(args)
    try:
        space = read_space(args.space)
        validate_space(space, cfg, source=args.space)
        check_objective(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    name = args.resume or args.name or time.strftime("%Y%m%d-%H%M%S")
    print(f"sweep        {name}: {len(space)} setting(s) from {args.space}: {', '.join(space)}")
    print(
        f"trials       {cfg.sweep.num_samples} draw(s) per grid point, "
        f"baseline + {cfg.cycles.max} cycle(s) each, "
        f"ASHA (grace {cfg.sweep.grace_period}, reduction {cfg.sweep.reduction_factor})"
    )
    print(
        f"objective    {cfg.sweep.objective} ({cfg.sweep.mode}; "
        f"lung_weight {cfg.sweep.lung_weight}), on val",
        flush=True,
    )
    problem = input_problem(cfg)
    if problem:
        sys.exit(f"error: {problem}")

    started = time.perf_counter()
    sweep_dir = sweep_folder(cfg, name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # The sweep's MLflow run first: the trials' runs nest in it and get results as they come.
    with sweep_run(cfg, name, sweep_dir) as parent:
        LiveTrials.sweep_run = parent
        try:
            rows, sweep_dir = run_sweep(
                cfg,
                space,
                name,
                resume=bool(args.resume),
                log=log,
                callbacks=[LiveTrials(list(space), name)],
            )
        except ConfigError as err:
            sys.exit(f"error: {err}")
        if not rows or all(np.isnan(r["objective"]) for r in rows):
            sys.exit(f"error: no trial reported an objective; see {sweep_dir}")
        best = rows[0]
        written = write_sweep_report(
            cfg, name, rows, space, sweep_dir, best_config(cfg, best), best_overrides(best)
        )
        registered = track_sweep(parent, cfg, rows, written.files, trial_model(sweep_dir, best))
    stopped = sum(r["status"] == "stopped early" for r in rows)
    print("\n" + written.table)
    print(
        f"\ntrials       {len(rows)} ({stopped} stopped early by ASHA, "
        f"{sum(r['status'] == 'error' for r in rows)} failed)"
    )
    print(f"best         {best['trial_id']}: {cfg.sweep.objective} {best['objective']:.4f}")
    print(f"best --set   {written.best_flags}")
    config_file = written.best_config
    print(f"best config  {config_file}  (python jobs/cycle.py --config {config_file})")
    if registered:
        print(f"registered   {registered}")
    print(f"summary      {written.summary}")
    print(f"finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
