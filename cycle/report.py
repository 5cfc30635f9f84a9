"""Reports: what a cycle run, an evidence study and a sweep tell a person, as markdown files, tables
and pictures.

Every table is built by `markdown_table`; every file is written atomically.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cycle import plots
from cycle.config import Config, dump_yaml
from cycle.io import atomic_write_json, atomic_write_text
from cycle.layout import (
    CAM_BEFORE_AFTER,
    CAM_GRID,
    CURVES,
    PANEL,
    REPORT,
    ROC_PR,
    SAMPLES,
    RunLayout,
    predictions,
)
from cycle.layout import (
    METRICS as METRICS_FILE,
)
from cycle.metrics import spearman


@dataclass(frozen=True)
class Metric:
    key: str  # as logged (MLflow) and stored (metrics.json)
    label: str  # as a column reads
    evidence: bool = True  # compared, baseline -> last cycle, in the evidence table
    localization: bool = False  # a property of the CAM, re-scored at other CAM depths


# The headline metrics, in the order every table shows them: the cycle report, the job run's
# description in MLflow and the evidence study all read this list.
METRICS = (
    Metric("test_accuracy", "test acc"),
    Metric("test_sensitivity", "sens", evidence=False),
    Metric("test_specificity", "spec", evidence=False),
    Metric("test_auc", "AUC", evidence=False),
    Metric("test_cf_accuracy", "cf acc"),
    Metric("lung_energy_share", "lung share", localization=True),
    Metric("lesion_pointing_game", "pointing", localization=True),
    Metric("confounder_energy_share", "confounder share", localization=True),
    Metric("context_reliance", "context reliance"),
    Metric("seam_control_accuracy", "seam control"),
    Metric("context_gap", "context gap"),
)
EVIDENCE_METRICS = tuple(m for m in METRICS if m.evidence)
LOCALIZATION_METRICS = tuple(m for m in METRICS if m.localization)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: one line per row, cells as given (format numbers before)."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def cell(value: Any) -> str:
    """A setting as a table cell or a `--set` value: floats to 4 digits, lists and dicts as JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# ---------------------------------------------------------------------------------------------
# A cycle run


def cycle_table(results: dict[str, list[dict]]) -> str:
    """One row per (architecture, cycle), metrics with 95% intervals where measured."""

    def measured(m: dict, key: str) -> str:
        if key not in m:
            return "n/a"  # needs truth this data lacks (test_cf, lesion or tag masks)
        value = m[key]
        low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
        return f"{value:.3f}" + (f" ({low:.3f}-{high:.3f})" if low is not None else "")

    return markdown_table(
        ["arch", "cycle", *(metric.label for metric in METRICS)],
        (
            [arch, k, *(measured(m, metric.key) for metric in METRICS)]
            for arch, cycles in results.items()
            for k, m in enumerate(cycles)
        ),
    )


def cycle_pictures(layout: RunLayout, k: int, arch: str) -> list[Path]:
    """The pictures of one evaluated (cycle, arch): CAM grid, confusion matrices and, after the
    baseline, CAMs before/after and sample enhanced films."""
    stage = layout.evaluate(k, arch)
    panel = np.load(stage / PANEL)
    pre_films = panel["films"] / 255.0
    out = [
        plots.cam_grid(
            pre_films,
            panel["cams"],
            panel["probs"],
            panel["labels"],
            stage / CAM_GRID,
            title=f"{arch}, cycle {k}: test films",
        )
    ]
    metrics = json.loads((layout.train(k, arch) / METRICS_FILE).read_text())["splits"]
    for split in ("test", "test_cf"):
        if split in metrics:
            out.append(
                plots.confusion_matrix_plot(
                    metrics[split]["confusion_matrix"],
                    stage / f"confusion_{split}.png",
                    title=f"{arch} c{k} {split}",
                )
            )
    scored = {
        split: (table["label"], table["prob_pneumonia"])
        for split in ("test", "test_cf")
        if (table := predictions_table(layout.train(k, arch) / predictions(split)))
    }
    if scored:
        out.append(plots.roc_pr_plot(scored, stage / ROC_PR, title=f"{arch}, cycle {k}"))
    if k > 0:
        before = np.load(layout.evaluate(0, arch) / PANEL)
        n = 12
        out.append(
            plots.before_after_grid(
                pre_films[:n],
                before["cams"][:n],
                panel["cams"][:n],
                stage / CAM_BEFORE_AFTER,
                panel["labels"][:n],
                names=("cycle 0", f"cycle {k}"),
                lungs=panel["lungs"][:n],
            )
        )
        samples = layout.shards(k, arch) / SAMPLES
        if samples.is_file():
            out.append(samples)
    return out


def predictions_table(path: Path) -> dict[str, list] | None:
    """predictions_<split>.csv as columns (path, label, prob_pneumonia); None when absent."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "path": [r["path"] for r in rows],
        "label": [int(r["label"]) for r in rows],
        "prob_pneumonia": [float(r["prob_pneumonia"]) for r in rows],
    }


def write_cycle_report(
    layout: RunLayout,
    results: dict[str, list[dict]],
    stopped: dict[str, str],
    tracking_note: str,
) -> Path:
    """<run>/report.md: the table, per-cycle curves, why architectures stopped, the last CAMs."""
    root = layout.root
    measured = {key for cycles in results.values() for m in cycles for key in m}
    metrics = [metric.key for metric in METRICS if metric.key in measured]
    curves = plots.cycle_curves(results, metrics, layout.file(CURVES))
    lines = [
        f"# Cycle report: {layout.name}",
        "",
        "Classification on the original films (test: same shortcut as train; test_cf: "
        "shortcut reversed); localisation of the CAM on test, mean (95% bootstrap interval).",
        "",
        cycle_table(results),
        "",
        f"![per-cycle metrics]({curves.name})",
        "",
    ]
    for arch, why in stopped.items():
        lines.append(f"- {arch} stopped {why}")
    for arch, cycles in results.items():
        last = len(cycles) - 1
        for name in (CAM_GRID, CAM_BEFORE_AFTER):
            picture = layout.evaluate(last, arch) / name
            if picture.is_file():
                lines.append(f"![{arch} {name}]({picture.relative_to(root)})")
    lines += ["", tracking_note, ""]
    return atomic_write_text(layout.file(REPORT), "\n".join(lines))


def timing_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Where a job's time went: wall seconds per stage, cycle and architecture(s), in the order
    they ran (architectures that train side by side share a row), and their sum."""
    total = sum(row["seconds"] for row in rows)
    return markdown_table(
        ["stage", "cycle", "archs", "seconds", "share"],
        [
            *(
                [
                    row["stage"],
                    "" if row["cycle"] is None else row["cycle"],
                    row["archs"],
                    f"{row['seconds']:.0f}",
                    f"{row['seconds'] / total:.0%}" if total else "",
                ]
                for row in rows
            ),
            ["total", "", "", f"{total:.0f}", ""],
        ],
    )


def job_note(
    name: str,
    mode: str,
    results: dict[str, list[dict]],
    stopped: dict[str, str],
    compare_link: str,
) -> str:
    """A cycle job's description, as MLflow's UI shows it on the job run (markdown)."""
    cycles = max((len(c) for c in results.values()), default=1) - 1
    return "\n".join(
        [
            f"**{name}**: {', '.join(results)}; baseline + {cycles} cycle(s), {mode}. "
            "Classification on the original films (test_cf: the shortcut reversed); "
            "localisation of the CAM on test, mean (95% interval).",
            "",
            f"[Compare every cycle and architecture]({compare_link})",
            "",
            cycle_table(results),
            *(f"- {arch} stopped {why}" for arch, why in stopped.items()),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Evidence


def evidence_table(table: dict, metrics: Sequence[Metric] = EVIDENCE_METRICS) -> str:
    """One row per (arch, variant): baseline -> last cycle, and the change with its 95% interval."""

    def change(m: dict | None) -> str:
        if m is None:
            return "n/a"
        return (
            f"{m['baseline']:.3f} → {m['last']:.3f} "
            f"({m['change']:+.3f}, {m['low']:+.3f}…{m['high']:+.3f})"
        )

    def seeds(row: dict) -> int:
        return len(next(iter(row.values()))["seeds"] if row else [])

    return markdown_table(
        ["arch", "variant", "seeds", *(metric.label for metric in metrics)],
        (
            [
                arch,
                variant,
                seeds(row),
                *(change(row.get(metric.key)) for metric in metrics),
            ]
            for arch, variants in table.items()
            for variant, row in variants.items()
        ),
    )


def write_evidence_report(
    cfg: Config,
    prefix: str,
    table: dict,
    seeds: list[int],
    probe_points: Sequence[dict] = (),
    depth_tables: Mapping[int, dict] | None = None,
) -> Path:
    """<output_dir>/<prefix>/evidence.md and evidence.json; with the probe's points (see
    evidence.probe_points), how well it tracks the counterfactual gap, and probe_vs_truth.png;
    with `depth_tables` ({depth: table of evidence.rescore_at_depth's files}), the localisation
    of the same checkpoints at those CAM depths (evidence_depth{d}.json)."""
    folder = Path(cfg.output_dir) / prefix
    folder.mkdir(parents=True, exist_ok=True)
    depth_section = []
    for depth, depth_table in (depth_tables or {}).items():
        atomic_write_json(folder / f"evidence_depth{depth}.json", depth_table)
        depth_section += [
            f"Localisation of the same checkpoints at `cam.depth={depth}` (the main table: "
            f"`cam.depth={cfg.cam.depth}`). Training did not change: for control and "
            "context_swap (trust rule off) this is what a run at that depth gives; highlight "
            f"and suppress were trained on overlays of `cam.depth={cfg.cam.depth}` CAMs.",
            "",
            evidence_table(depth_table, LOCALIZATION_METRICS),
            "",
        ]
    probe_section = []
    if probe_points:
        truth = [p["cf_gap"] for p in probe_points]
        rhos = {
            name: spearman([p.get(name, np.nan) for p in probe_points], truth)
            for name in ("context_gap", "context_reliance")
        }
        plots.probe_vs_truth(probe_points, rhos, folder / "probe_vs_truth.png")
        probe_section = [
            f"Does the probe track the truth? Over {len(probe_points)} evaluated cells (arch, "
            "seed, variant, cycle; a seed's baseline once), the Spearman correlation with test "
            f"minus test_cf accuracy is **{rhos['context_gap']:.2f}** for `context_gap` and "
            f"**{rhos['context_reliance']:.2f}** for `context_reliance` (goal >= 0.8).",
            "",
            "![probe vs truth](probe_vs_truth.png)",
            "",
        ]
    atomic_write_json(folder / "evidence.json", table)
    if probe_points:
        atomic_write_json(folder / "probe_points.json", list(probe_points))
    settings = (
        f"Settings: {cfg.cycles.max} cycle(s) of {cfg.cycles.epochs} epoch(s) "
        f"at lr {cfg.cycles.lr}, baseline {cfg.train.epochs} epochs, "
        f"{cfg.data.image_size} px, strength {cfg.enhance.strength} (control: 0), "
        f"seeds {seeds}."
    )
    text = "\n".join(
        [
            f"# Evidence: {prefix}",
            "",
            "Baseline (cycle 0) → last cycle on the original test films, mean over seeds; in "
            "brackets the change and its 95% interval (paired two-level bootstrap: seeds, then "
            "films). `control` is the same fine-tuning on the original films (enhancement strength "
            "0).",
            "",
            evidence_table(table),
            "",
            *probe_section,
            *depth_section,
            settings,
            "",
        ]
    )
    return atomic_write_text(folder / "evidence.md", text)


# ---------------------------------------------------------------------------------------------
# A sweep


def sweep_table(rows: list[dict], space: Mapping[str, Any], objective_name: str) -> str:
    """One row per trial, best first: its values, objective, cycles reported and status."""
    keys = list(space)
    return markdown_table(
        ["rank", "trial", *keys, objective_name, "cycles", "status"],
        (
            [
                rank,
                row["trial_id"],
                *(cell(row["values"][k]) for k in keys),
                f"{row['objective']:.4f}",
                row["cycles"],
                row["status"],
            ]
            for rank, row in enumerate(rows, 1)
        ),
    )


@dataclass
class SweepReport:
    """What `write_sweep_report` wrote; `files` are what the sweep's MLflow run keeps."""

    table: str
    summary: Path
    best_config: Path
    best_flags: str  # the winner's settings as `--set k=v` flags
    files: list[Path]


def write_sweep_report(
    cfg: Config,
    name: str,
    rows: list[dict],
    space: Mapping[str, Any],
    sweep_dir: Path,
    best: Config,
    overrides: list[str],
) -> SweepReport:
    """best_config.yaml (`best`, the winner's config), summary.md, trials.json and the
    settings-vs-objective plot, in the sweep's folder; `rows` best first."""
    table = sweep_table(rows, space, cfg.sweep.objective)
    top = rows[0]
    flags = " ".join(f"--set {o}" for o in overrides)
    heading = (
        f"# best trial {top['trial_id']} of sweep {name} "
        f"({cfg.sweep.objective} {top['objective']:.4f})\n"
    )
    config_file = atomic_write_text(sweep_dir / "best_config.yaml", heading + dump_yaml(best))
    summary = atomic_write_text(
        sweep_dir / "summary.md",
        "\n".join(
            [
                f"# Sweep {name}",
                "",
                f"Objective: {cfg.sweep.objective} ({cfg.sweep.mode}), on val; "
                "each trial's value at its last report (ASHA stops some after fewer cycles).",
                "",
                table,
                "",
                "![settings vs objective](settings_vs_objective.png)",
                "",
                f"Best settings: `{flags}`",
                "",
            ]
        ),
    )
    trials = atomic_write_json(
        sweep_dir / "trials.json", [{k: v for k, v in r.items() if k != "history"} for r in rows]
    )
    picture = plots.sweep_scatter(
        rows, list(space), cfg.sweep.objective, sweep_dir / "settings_vs_objective.png"
    )
    return SweepReport(
        table,
        summary,
        config_file,
        flags,
        [summary, trials, picture, config_file, sweep_dir / "space.yaml"],
    )
