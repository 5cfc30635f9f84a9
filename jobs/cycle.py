"""The refinement cycle: baseline -> (shards -> fine-tune -> evaluate) x N, per architecture.

    python jobs/cycle.py [--config FILE] [--set k=v ...] [--resume RUN | --run-name RUN]
    ray job submit --working-dir . -- python jobs/cycle.py --config configs/smoke.yaml

With no arguments: phantom chest X-rays (generated if missing), a lung U-Net (trained once if
missing), baseline + 1 cycle for tinyvgg and resnet18 on a local Ray, tracked in the local
MLflow store. `--resume RUN` skips finished stages (alone, it uses the run's own config.yaml); a
run folder made with another config is refused, naming the keys that differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _common

# Only what the cheap checks need: a mistake in the config, the paths or the tracking server ends
# the job in about a second, before torch, Ray and MLflow load (in run()).
from cycle.config import Config
from cycle.console import quiet_libraries
from cycle.io import LockHeld
from cycle.preflight import input_problem
from cycle.run_config import RunConfigMismatch, check_run_config, claim_run, saved_config
from cycle.store import tracking_store


def main() -> None:
    parser = _common.config_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", metavar="RUN", help="continue the run RUN (finished stages are skipped)"
    )
    group.add_argument(
        "--run-name", metavar="RUN", help="name of a new run (default: cycle-<time>)"
    )
    _common.inprocess_shards_argument(parser)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also Ray's and MLflow's own lines (progress blocks, worker groups)",
    )
    args = parser.parse_args()
    if not args.verbose:
        quiet_libraries()
    cfg = _common.config_from(args)
    run_name = args.resume or args.run_name or cfg.run_name or time.strftime("cycle-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / run_name
    if args.resume and not run_dir.is_dir():
        sys.exit(f"error: nothing to resume: {run_dir} does not exist")
    if args.resume and not (args.config or args.overrides):
        # `--resume RUN` alone continues the run with the config it was made with.
        cfg = saved_config(run_dir) or cfg
        cfg = cfg.with_overrides({"output_dir": str(run_dir.parent)})
    try:
        check_run_config(run_dir, cfg)
    except RunConfigMismatch as err:
        sys.exit(f"error: {err}")

    print(f"run          {run_name} -> {Path(cfg.output_dir) / run_name}")
    print(f"data         {cfg.data.root or f'phantoms in {cfg.phantom_dir()}'}")
    print(
        f"archs        {', '.join(cfg.cycles.archs)}; baseline + {cfg.cycles.max} cycle(s) "
        f"({cfg.enhance.mode}, strength {cfg.enhance.strength})"
    )
    print(
        f"resources    {cfg.resources.num_workers} Ray Train worker(s) per arch, "
        f"ray: {cfg.resources.ray_address or os.environ.get('RAY_ADDRESS') or 'local'}"
    )
    print(
        f"tracking     {tracking_store(cfg)}{'' if cfg.tracking.enabled else ' (disabled)'}",
        flush=True,
    )
    problem = input_problem(cfg)
    if problem:
        sys.exit(f"error: {problem}")
    try:
        with claim_run(run_dir):
            run(cfg, run_name, args.inprocess_shards)
    except LockHeld as err:
        sys.exit(f"error: {err}")


def run(cfg: Config, run_name: str, inprocess_shards: bool) -> None:
    from cycle.report import cycle_table, timing_table, write_cycle_report
    from cycle.runner import Runner
    from cycle.tracking.cycle_runs import (
        cycle_job_run,
        describe_job_run,
        log_job_files,
        register_best,
    )
    from cycle.tracking.tracker import Tracker, browse_hint, run_note

    started = time.perf_counter()
    with cycle_job_run(cfg, run_name) as tracker:  # a resumed run reopens its MLflow run
        runner = Runner(cfg, run_name, tracker=tracker, inprocess_shards=inprocess_shards)
        state = runner.run()
        with runner.clock.timed("register", None, "best"):
            registered = register_best(tracker, runner.paths, state.results)
        note = run_note(tracker)
        with runner.clock.timed("report", None, "all"):
            report = write_cycle_report(runner.paths, state.results, state.stopped, note)
            describe_job_run(tracker, runner.cfg, runner.paths, state.results, state.stopped)
            log_job_files(tracker, runner.paths)
        hint = browse_hint(tracker)
    print("\nwhere the time went (wall seconds; archs trained side by side share a row):")
    print(timing_table(runner.clock.rows))
    print("\n" + cycle_table(state.results))
    for arch, why in state.stopped.items():
        print(f"{arch} stopped {why}")
    if registered:
        print(f"registered   {registered}")
    print(f"report       {report}")
    print(f"mlflow       {note}")
    if hint:
        print(f"browse       {hint}")
    print(f"finished in {time.perf_counter() - started:.0f}s")
    if Tracker.lost:
        sys.exit(
            f"error: the run finished, but MLflow stopped answering ({Tracker.lost}); "
            "what it could not log is kept beside the run: once the server is back, "
            f"`python jobs/cycle.py --resume {run_name}` "
            "(with the same --config/--set) logs it"
        )


if __name__ == "__main__":
    main()
