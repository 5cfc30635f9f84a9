"""The evidence that the cycle, not just more training, moves the model: for every enhancement
mode and one control (the same fine-tuning on the original films), baseline vs last cycle over
several seeds, with paired bootstrap intervals.

Per seed the baseline (cycle 0) is trained once and copied into every variant's run, so the
variants differ only in what the fine-tuning saw. The interval of a change is a two-level
bootstrap: seeds drawn with replacement, then test films within each drawn seed, on the paired
per-film differences (same films, same seed, baseline vs last cycle).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cycle.config import Config
from cycle.data.records import ScanResult, records_of
from cycle.evaluate import evaluate_localization
from cycle.layout import (
    MLFLOW_RUN,
    PER_IMAGE,
    RAY_CHECKPOINT,
    RECORDS,
    RunLayout,
    per_image_at_depth,
    predictions,
)
from cycle.probe import context_gap
from cycle.registry import ENHANCE_MODES
from cycle.report import EVIDENCE_METRICS, predictions_table, write_cycle_report
from cycle.runner import Runner

EVIDENCE_KEYS = tuple(metric.key for metric in EVIDENCE_METRICS)


def all_variants() -> dict[str, dict[str, object]]:
    """Variant name -> config overrides: the control, then one per registered enhancement mode
    (read when called: a mode registered later is a variant too). The control keeps the config's
    mode at strength 0: the enhanced film *is* the original film, and everything else (shards,
    epochs, lr, selection) is the same."""
    modes = {mode: {"enhance.mode": mode} for mode in ENHANCE_MODES.names()}
    return {"control": {"enhance.strength": 0.0}, **modes}


def variant_config(cfg: Config, seed: int, variant: str) -> Config:
    known = all_variants()
    if variant not in known:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(known)}")
    return cfg.with_overrides({"seed": seed, **known[variant]})


def run_name(prefix: str, seed: int, variant: str) -> str:
    return f"{prefix}-s{seed}-{variant}"


def share_baseline(source: Path, target: Path) -> None:
    """Copy a finished cycle 0 into another variant's run (its MLflow bookkeeping stays behind)."""
    source, target = RunLayout(source), RunLayout(target)
    if target.cycle(0).exists() or not source.cycle(0).exists():
        return
    tmp = target.root / "cycle_0.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source.cycle(0), tmp, ignore=shutil.ignore_patterns(MLFLOW_RUN, RAY_CHECKPOINT))
    shutil.copy2(source.file(RECORDS), target.file(RECORDS))
    tmp.rename(target.cycle(0))


def run_evidence(
    cfg: Config,
    seeds: list[int],
    variants: list[str],
    prefix: str,
    log=print,
    inprocess_shards: bool = False,
) -> Path:
    """Run every (seed, variant) cycle job; returns the folder of the evidence report."""
    out = Path(cfg.output_dir)
    for seed in seeds:
        first = None
        for variant in variants:
            name = run_name(prefix, seed, variant)
            root = out / name
            root.mkdir(parents=True, exist_ok=True)
            if first is not None:
                share_baseline(out / first, root)
            log(f"[evidence] seed {seed}, {variant}: {root}")
            runner = Runner(
                variant_config(cfg, seed, variant), name, inprocess_shards=inprocess_shards
            )
            with runner.claim():
                state = runner.run()
                write_cycle_report(
                    runner.paths, state.results, state.stopped, "tracking: see the evidence report"
                )
            first = first or name
    return out / prefix


# ---------------------------------------------------------------------------------------------
# Reading finished runs back


def _correct(path: Path) -> dict[str, float]:
    table = predictions_table(path) or {"path": [], "label": [], "prob_pneumonia": []}
    return {
        film: float((prob >= 0.5) == (label == 1))
        for film, label, prob in zip(table["path"], table["label"], table["prob_pneumonia"])
    }


def per_film(
    run_root: Path, arch: str, k: int, per_image: str = PER_IMAGE
) -> dict[str, np.ndarray]:
    """Per-test-film values of one (run, arch, cycle), keyed by metric, in a fixed film order;
    `per_image` names the localisation file (see rescore_at_depth)."""
    layout = RunLayout(run_root)
    train = layout.train(k, arch)
    loc = np.load(layout.evaluate(k, arch) / per_image)
    order = [str(p) for p in loc["paths"]]
    values = {name: loc[name].astype(np.float64) for name in loc.files if name != "paths"}
    test = _correct(train / predictions("test"))
    values["test_accuracy"] = np.array([test[p] for p in order])
    cf_file = train / predictions("test_cf")
    cf = _correct(cf_file) if cf_file.is_file() else {}
    if cf:
        cf_order = sorted(cf)
        values["test_cf_accuracy"] = np.array([cf[p] for p in cf_order])
    return values


def last_cycle(run_root: Path, arch: str) -> int:
    done = RunLayout(run_root).finished_cycles(arch)
    if not done:
        raise FileNotFoundError(f"no finished cycle of {arch} in {run_root}")
    return max(done)


def finished_runs(out_dir: Path, prefix: str, seeds: list[int], variants: list[str], arch: str):
    """(seed, variant, run folder, last finished cycle) of each run with a finished cycle of
    `arch`, variant by variant, seed by seed."""
    for variant in variants:
        for seed in seeds:
            root = out_dir / run_name(prefix, seed, variant)
            try:
                last = last_cycle(root, arch)
            except FileNotFoundError:
                continue
            yield seed, variant, root, last


def paired_bootstrap(
    before: list[np.ndarray], after: list[np.ndarray], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean change and 95% interval: seeds resampled, then films within each seed."""
    diffs = [np.asarray(a, np.float64) - np.asarray(b, np.float64) for b, a in zip(before, after)]
    diffs = [d[~np.isnan(d)] for d in diffs]
    diffs = [d for d in diffs if len(d)]
    if not diffs:
        return (np.nan, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(0, len(diffs), size=len(diffs))
        means[b] = np.mean(
            np.concatenate(
                [diffs[s][rng.integers(0, len(diffs[s]), len(diffs[s]))] for s in picked]
            )
        )
    low, high = np.quantile(means, [0.025, 0.975])
    return float(np.mean(np.concatenate(diffs))), float(low), float(high)


def collect(
    out_dir: Path,
    prefix: str,
    seeds: list[int],
    variants: list[str],
    archs: list[str],
    per_image: str = PER_IMAGE,
) -> dict:
    """{arch: {variant: {metric: {baseline, last, change, low, high, seeds}}}} over finished
    runs."""
    table: dict = {}
    for arch in archs:
        for variant in variants:
            before, after = {}, {}
            used = []
            for seed, _, root, k in finished_runs(out_dir, prefix, seeds, [variant], arch):
                if k == 0:
                    continue
                b, a = per_film(root, arch, 0, per_image), per_film(root, arch, k, per_image)
                used.append(seed)
                for metric in EVIDENCE_KEYS:
                    if metric in b and metric in a:
                        before.setdefault(metric, []).append(b[metric])
                        after.setdefault(metric, []).append(a[metric])
            if not used:
                continue
            row = {}
            for metric in EVIDENCE_KEYS:
                if metric not in before:
                    continue
                change, low, high = paired_bootstrap(before[metric], after[metric])
                row[metric] = {
                    "baseline": float(np.nanmean(np.concatenate(before[metric]))),
                    "last": float(np.nanmean(np.concatenate(after[metric]))),
                    "change": change,
                    "low": low,
                    "high": high,
                    "seeds": used,
                }
            table.setdefault(arch, {})[variant] = row
    return table


# ---------------------------------------------------------------------------------------------
# The same checkpoints, mapped at another CAM depth


def rescore_at_depth(
    cfg: Config,
    prefix: str,
    seeds: list[int],
    variants: list[str],
    depth: int,
    log=print,
) -> str:
    """Localisation of every finished (run, arch, cycle) at CAM depth `depth`, on the same
    checkpoints and test films, into per_image_depth{depth}.npz beside per_image.npz (kept
    once written, so a rerun resumes). Returns that file name, for `collect`.

    With the trust rule off (the default), control and context_swap build their training films
    without the CAM, so this equals running them at that depth; highlight and suppress drew
    their overlays from depth-0 CAMs, so for them it scores models trained on those."""
    name, out = per_image_at_depth(depth), Path(cfg.output_dir)
    for arch in cfg.cycles.archs:
        for seed, variant, root, last in finished_runs(out, prefix, seeds, variants, arch):
            layout = RunLayout(root)
            test = records_of(ScanResult.load(layout.file(RECORDS)).records, "test")
            for k in range(last + 1):
                target = layout.evaluate(k, arch) / name
                if target.is_file():
                    continue
                log(f"[evidence] cam.depth {depth}: seed {seed}, {variant}, {arch}, cycle {k}")
                evaluate_localization(
                    layout.best(k, arch),
                    test,
                    cfg.cam.method,
                    seed=seed,
                    per_image_npz=target,
                    batch_size=cfg.cam.batch_size,
                    cam_depth=depth,
                )
    return name


# ---------------------------------------------------------------------------------------------
# Does the probe track the truth?


def probe_points(
    out_dir: Path, prefix: str, seeds: list[int], variants: list[str], archs: list[str]
) -> list[dict]:
    """One point per evaluated (arch, seed, variant, cycle) of the finished runs: the probe's
    context reliance on test beside the phantom truth it must track, the counterfactual gap
    (test accuracy minus test_cf accuracy). A seed's baseline, shared by its variants, counts
    once."""
    points = []
    for arch in archs:
        baselines = set()  # seeds whose cycle 0 is counted
        for seed, variant, root, last in finished_runs(out_dir, prefix, seeds, variants, arch):
            for k in range(0 if seed not in baselines else 1, last + 1):
                values = per_film(root, arch, k)
                if "context_reliance" not in values or "test_cf_accuracy" not in values:
                    continue
                baselines.add(seed)
                gap = np.mean(values["test_accuracy"]) - np.mean(values["test_cf_accuracy"])
                points.append(
                    {
                        "arch": arch,
                        "seed": seed,
                        "variant": "baseline" if k == 0 else variant,
                        "cycle": k,
                        "context_reliance": float(np.nanmean(values["context_reliance"])),
                        "seam_control_accuracy": float(np.nanmean(values["seam_control_accuracy"])),
                        # derived, not read: runs from before it was logged have it too
                        "context_gap": float(
                            np.nanmean(
                                context_gap(
                                    values["seam_control_accuracy"],
                                    values["lung_consistent_accuracy"],
                                )
                            )
                        ),
                        "cf_gap": float(gap),
                    }
                )
    return points
