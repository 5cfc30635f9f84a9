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
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _common

from cycle.config import Config
from cycle.io import LockHeld, atomic_write_json
from cycle.run_config import RunConfigMismatch, check_run_config, saved_config
from cycle.runner import claim_run
from cycle.tracking import Tracker, server_problem, tracking_uri


def check_inputs(cfg: Config) -> None:
    """Everything cheap, first: a mistake fails in seconds, not after an hour of training."""
    from cycle.lungseg.train import LungModelMissing, ensure_lung_model

    if cfg.data.root is not None and not Path(cfg.data.root).exists():
        sys.exit(f"error: data.root={cfg.data.root} does not exist")
    if cfg.data.root is not None or cfg.lungseg.weights:
        try:
            ensure_lung_model(cfg, log=lambda *_: None)  # with these set it only checks, never trains
        except LungModelMissing as err:
            sys.exit(f"error: {err}")
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        sys.exit(f"error: output_dir {out} is not writable: {err.strerror or err}")
    storage = cfg.storage_path()
    if "://" not in storage:
        try:
            Path(storage).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            sys.exit(f"error: resources.storage_path {storage} is not writable: {err.strerror or err}")
    uri = tracking_uri(cfg)
    problem = server_problem(uri) if cfg.tracking.enabled else None
    if problem:
        sys.exit(f"error: MLflow tracking server {uri} is not reachable ({problem}); start it or unset "
                 "MLFLOW_TRACKING_URI / tracking.uri to use the local store")


def register_best(cfg: Config, runner, state, tracker) -> str | None:
    """The job's product -> registry: each architecture's last cycle (what the refinement made),
    and of those the one with the highest val accuracy (test never chooses)."""
    if not tracker.active:
        return None
    best = max(((cycles[-1]["val_accuracy"], len(cycles) - 1, arch) for arch, cycles in state.results.items()
                if cycles), default=None)
    if best is None:
        return None
    _, k, arch = best
    # A finished run resumed again registers nothing new: same run, same winner, same version.
    record = runner.paths.root / "registered.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    if done.get("run_id") == tracker.run_id and (done.get("arch"), done.get("cycle")) == (arch, k):
        return done["message"]
    version = tracker.register_classifier(runner.paths.stage(k, arch, "train") / "best.pt", alias="best")
    tracker.set_tags({"best_arch": arch, "best_cycle": str(k)})
    if version is None or Tracker.lost:
        return None
    message = f"{cfg.tracking.registered_model_name} v{version} (alias 'best'): {arch}, cycle {k}"
    atomic_write_json(record, {"run_id": tracker.run_id, "arch": arch, "cycle": k, "message": message})
    return message


def main() -> None:
    parser = _common.config_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="RUN", help="continue the run RUN (finished stages are skipped)")
    group.add_argument("--run-name", metavar="RUN", help="name of a new run (default: cycle-<time>)")
    _common.inprocess_shards_argument(parser)
    args = parser.parse_args()
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
    print(f"archs        {', '.join(cfg.cycles.archs)}; baseline + {cfg.cycles.max} cycle(s) "
          f"({cfg.enhance.mode}, strength {cfg.enhance.strength})")
    print(f"resources    {cfg.resources.num_workers} Ray Train worker(s) per arch, "
          f"ray: {cfg.resources.ray_address or os.environ.get('RAY_ADDRESS') or 'local'}")
    print(f"tracking     {tracking_uri(cfg) or 'MLflow default (sqlite:///mlflow.db)'}"
          f"{'' if cfg.tracking.enabled else ' (disabled)'}", flush=True)
    check_inputs(cfg)
    try:
        with claim_run(run_dir):
            run(cfg, run_name, args.inprocess_shards)
    except LockHeld as err:
        sys.exit(f"error: {err}")


def run(cfg: Config, run_name: str, inprocess_shards: bool) -> None:
    from cycle.runner import Runner, summary_table, write_report
    started = time.perf_counter()
    parent_file = Path(cfg.output_dir) / run_name / "mlflow_run.json"
    previous = json.loads(parent_file.read_text()) if parent_file.is_file() else {}
    same_store = previous.get("uri") == tracking_uri(cfg)
    with Tracker(cfg, run_name=run_name, tags={"job": "cycle"},
                 run_id=previous.get("run_id") if same_store else None) as tracker:
        if tracker.run is not None:
            atomic_write_json(parent_file, {"run_id": tracker.run_id, "uri": tracking_uri(cfg)})
        if not (previous and same_store):
            tracker.log_config()
        runner = Runner(cfg, run_name, tracker=tracker, inprocess_shards=inprocess_shards)
        state = runner.run()
        registered = register_best(cfg, runner, state, tracker)
        note = f"MLflow run {tracker.run_id} at {tracking_uri(cfg) or 'sqlite:///mlflow.db'}" if tracker.run else "tracking disabled"
        report = write_report(runner, state, note)
        tracker.log_artifact(report)
        tracker.log_artifact(runner.paths.root / "cycle_curves.png")
        tracker.log_artifact(runner.paths.root / "config.yaml")
        tracker.log_artifact(runner.paths.root / "records.json")
    print("\n" + summary_table(state.results))
    for arch, why in state.stopped.items():
        print(f"{arch} stopped {why}")
    if registered:
        print(f"registered   {registered}")
    print(f"report       {report}")
    print(f"mlflow       {note}  (browse: mlflow ui --host 127.0.0.1)")
    print(f"finished in {time.perf_counter() - started:.0f}s")
    if Tracker.lost:
        sys.exit(f"error: the run finished, but MLflow stopped answering ({Tracker.lost}); what it could not log "
                 f"is kept beside the run: once the server is back, `python jobs/cycle.py --resume {run_name}` "
                 "(with the same --config/--set) logs it")


if __name__ == "__main__":
    main()
