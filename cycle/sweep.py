"""Ray Tune sweeps over the cycle's settings: search spaces, the objective, the trial, the winner.

A search space is a YAML mapping of config keys to one sampler each:

    model.arch: {grid_search: [tinyvgg, resnet18]}
    model.unfreeze: {choice: [1, 2, all]}
    enhance.strength: {uniform: [0.5, 1.0]}
    cycles.lr: {loguniform: [1.0e-5, 1.0e-3]}
    train.epochs: {randint: [2, 6]}          # high end excluded, as in Tune

Every key and every value a sampler can produce is validated against the config schema before
any trial starts. A trial is a short cycle (baseline -> shards -> fine-tune -> evaluate, resumable
from its own folder) that reports after every evaluated cycle, so ASHA can stop it early.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cycle.config import Config, ConfigError
from cycle.data.prepare import prepare_records
from cycle.io import atomic_write_text
from cycle.layout import RECORDS, RunLayout
from cycle.lungseg import ensure_lung_model
from cycle.ray_session import init_ray
from cycle.report import cell
from cycle.resources import decide_gpu
from cycle.runner import Runner

SAMPLERS = ("grid_search", "choice", "uniform", "loguniform", "randint")


# ---------------------------------------------------------------------------------------------
# Search spaces


def read_space(path: str | Path) -> dict[str, dict[str, list]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"search space {path} must map config keys to samplers, e.g. "
            "'enhance.strength: {uniform: [0.5, 1.0]}'"
        )
    return {str(k): v for k, v in raw.items()}


def validate_space(space: Mapping[str, Any], base: Config, source: str = "space") -> None:
    """Fail before any trial: unknown keys, malformed samplers, values the config refuses."""
    problems = []
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            problems.append(f"{key}: expected one sampler of {', '.join(SAMPLERS)}, got {spec!r}")
            continue
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            problems.append(f"{key}: {kind} needs a non-empty list, got {args!r}")
            continue
        if kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
            ):
                problems.append(f"{key}: {kind} needs [low, high] numbers, got {args!r}")
                continue
            low, high = args
            if not low < high or (kind == "loguniform" and low <= 0):
                problems.append(
                    f"{key}: {kind} needs 0 < low < high (low > 0 for loguniform), got {args!r}"
                )
                continue
            probes = [int(low), int(high) - 1] if kind == "randint" else [float(low), float(high)]
        else:
            probes = args
        for value in probes:
            try:
                apply_values(base, {key: value})
            except ConfigError as err:
                problems.append(str(err).split("\n", 1)[-1].strip())
                break
    if problems:
        raise ConfigError(f"invalid search space ({source}):\n  " + "\n  ".join(problems))


def apply_values(base: Config, values: Mapping[str, Any]) -> Config:
    return base.with_overrides(values, source="space")


def tune_space(space: Mapping[str, Any]) -> dict[str, Any]:
    from ray import tune

    samplers = {
        "grid_search": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {key: samplers[kind](args) for key, spec in space.items() for kind, args in spec.items()}


# ---------------------------------------------------------------------------------------------
# Objective


def objective(metrics: Mapping[str, Any], cfg: Config) -> float:
    """The sweep's score of one evaluated cycle, from val metrics only."""
    name = cfg.sweep.objective
    if name == "val_accuracy+lung":
        share = metrics.get("val_lung_energy_share", math.nan)
        return float(metrics["val_accuracy"] + cfg.sweep.lung_weight * share)
    if name not in metrics:
        raise KeyError(
            f"sweep.objective {name!r} is not among the logged metrics "
            f"({', '.join(sorted(k for k in metrics if k.startswith('val_')))})"
        )
    return float(metrics[name])


def check_objective(cfg: Config) -> None:
    name = cfg.sweep.objective
    if name != "val_accuracy+lung" and not name.startswith("val_"):
        raise ConfigError(
            f"sweep.objective {name!r}: use 'val_accuracy+lung' or a val_ metric "
            "(e.g. val_accuracy, val_lung_energy_share); settings are never chosen on test"
        )


# ---------------------------------------------------------------------------------------------
# The trial


def trial_config(base: Config, values: Mapping[str, Any], output_dir: str) -> Config:
    """A trial's config: the base with the trial's values; trains in the trial's own process
    (Tune gave it its CPU or GPU), one architecture, no tracking from the worker."""
    cfg = apply_values(base, values)
    return cfg.with_overrides(
        {
            "cycles.archs": [cfg.model.arch],
            "resources.num_workers": 0,
            "tracking.enabled": False,
            "output_dir": output_dir,
            "data.phantom.out_dir": str(base.phantom_dir().resolve()),
        }
    )


def run_trial(params: dict) -> None:
    """The Tune trainable: params = {"base": config dump, "sweep_dir": path, "records": path,
    "lung_model": path, plus the sampled keys}."""
    from ray import tune

    base = Config.model_validate(params["base"])
    values = {
        k: v for k, v in params.items() if k not in ("base", "sweep_dir", "records", "lung_model")
    }
    trial_id = tune.get_context().get_trial_id()
    base = base.with_overrides({"lungseg.weights": params["lung_model"]})
    cfg = trial_config(base, values, str(Path(params["sweep_dir"]) / "trials"))
    root = Path(cfg.output_dir) / trial_id
    root.mkdir(parents=True, exist_ok=True)
    if not (root / RECORDS).is_file():
        shutil.copy2(params["records"], root / RECORDS)  # scanned once by the driver

    def report(k: int, arch: str, metrics: dict) -> None:
        numbers = {
            key: float(v)
            for key, v in metrics.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and not key.endswith(("_ci_low", "_ci_high"))
        }
        tune.report({"objective": objective(metrics, cfg), "cycle": k, **numbers})

    Runner(cfg, trial_id, on_cycle=report, inprocess_shards=True).run()


def concurrency(cfg: Config) -> int | None:
    """Trials at once: sweep.max_concurrent_trials when set. Trials on GPUs: no cap (None), so
    Tune keeps as many pending as the cluster can grow to hold and the autoscaler adds GPU nodes
    up to its maximum (the GPUs present at submit, often none, say nothing). On CPUs: half the
    CPUs, leaving room for each trial's own threads."""
    import ray

    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    cluster = ray.cluster_resources()
    if decide_gpu(cfg.resources.use_gpu, cluster)[0]:
        return None
    return max(1, int(cluster.get("CPU", 1) // 2))


def trial_resources(cfg: Config) -> dict:
    """What one trial holds: its CPUs, and one GPU when the job asks for GPUs (on a cluster
    whose GPU workers scale from zero too: the trial waits for the autoscaler)."""
    import ray

    use_gpu = decide_gpu(cfg.resources.use_gpu, ray.cluster_resources())[0]
    return {"cpu": cfg.sweep.cpus_per_trial, "gpu": 1 if use_gpu else 0}


# ---------------------------------------------------------------------------------------------
# After the sweep


def trial_rows(results, space: Mapping[str, Any], max_t: int) -> list[dict]:
    """One dict per trial: id, values, objective of its last report, cycles, status."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        reports = 0 if history is None else len(history)
        status = "error" if result.error else ("stopped early" if reports < max_t else "finished")
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(result.path).name,
                "values": {k: result.config.get(k) for k in space},
                "objective": float(metrics.get("objective", np.nan)),
                "cycles": reports,
                "status": status,
                "history": [] if history is None else history.to_dict("records"),
            }
        )
    return sorted(
        rows, key=lambda r: -np.inf if np.isnan(r["objective"]) else r["objective"], reverse=True
    )


def best_overrides(row: dict) -> list[str]:
    return [f"{k}={cell(v)}" for k, v in row["values"].items()]


def best_config(base: Config, row: dict) -> Config:
    """The base config with the winner's values: ready for `jobs/cycle.py --config`."""
    return apply_values(base, row["values"])


# ---------------------------------------------------------------------------------------------
# The driver


def sweep_folder(cfg: Config, name: str) -> Path:
    return (Path(cfg.output_dir) / "sweeps" / name).resolve()


def run_sweep(
    cfg: Config,
    space: Mapping[str, Any],
    name: str,
    resume: bool = False,
    log=print,
    callbacks: list | None = None,
):
    """Prepare the shared inputs once, then run (or resume) the Tune experiment; returns
    (rows sorted best first, the sweep's folder). `callbacks`: Tune callbacks of a new sweep (a
    resumed one keeps those it was started with)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    check_objective(cfg)
    validate_space(space, cfg)
    sweep_dir = sweep_folder(cfg, name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "space.yaml", yaml.safe_dump(dict(space), sort_keys=False))
    init_ray(cfg)
    records = sweep_dir / RECORDS
    if not records.is_file():
        prepare_records(cfg, verbose=True).save(records)
    lung_model = ensure_lung_model(cfg, log=log)

    max_t = cfg.cycles.max + 1
    trainable = tune.with_resources(run_trial, trial_resources(cfg))
    storage = (
        str(Path(cfg.storage_path()).resolve())
        if "://" not in cfg.storage_path()
        else cfg.storage_path()
    )
    experiment = f"{storage.rstrip('/')}/sweep-{name}"
    if resume and tune.Tuner.can_restore(experiment):
        log(f"[sweep] resuming {experiment}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        param_space = {
            **tune_space(space),
            "base": cfg.model_dump(mode="json"),
            "sweep_dir": str(sweep_dir),
            "records": str(records),
            "lung_model": str(Path(lung_model).resolve()),
        }
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=min(cfg.sweep.grace_period, max_t),
            reduction_factor=cfg.sweep.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="objective",
                mode=cfg.sweep.mode,
                scheduler=scheduler,
                num_samples=cfg.sweep.num_samples,
                max_concurrent_trials=concurrency(cfg),
            ),
            run_config=tune.RunConfig(
                name=f"sweep-{name}",
                storage_path=storage,
                verbose=1,
                callbacks=callbacks,
                # A trial whose node is reclaimed (spot) restarts from its last checkpoint, up
                # to resources.max_failures times, instead of erroring.
                failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
            ),
        )
    results = tuner.fit()
    return trial_rows(results, space, max_t), sweep_dir


def trial_model(sweep_dir: Path, row: dict) -> Path | None:
    """The model a trial made: its last cycle's best.pt (None when it finished no training)."""
    cycles = RunLayout(sweep_dir / "trials" / row["trial_id"]).trained_cycles()
    return cycles[-1] if cycles else None
