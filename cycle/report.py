"""Reports: what a cycle run, an evidence study and a sweep tell a person, as markdown files, tables
and pictures.

Every table is built by `markdown_table`; every file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cycle import plots
from cycle.config import Config, dump_yaml
from cycle.io import atomic_write_json, atomic_write_text
from cycle.metrics import spearman

if TYPE_CHECKING:  # annotations only: the runner imports this module
    from cycle.runner import CycleState, Runner, RunPaths

# (metric, column label): what a cycle report shows, and what the evidence table compares.
REPORT_METRICS = (
    ("test_accuracy", "test acc"),
    ("test_sensitivity", "sens"),
    ("test_specificity", "spec"),
    ("test_auc", "AUC"),
    ("test_cf_accuracy", "cf acc"),
    ("lung_energy_share", "lung share"),
    ("lesion_pointing_game", "pointing"),
    ("confounder_energy_share", "confounder share"),
    ("context_reliance", "context reliance"),
    ("seam_control_accuracy", "seam control"),
    ("context_gap", "context gap"),
)
EVIDENCE_METRICS = (
    ("test_accuracy", "test acc"),
    ("test_cf_accuracy", "cf acc"),
    ("lesion_pointing_game", "pointing"),
    ("lung_energy_share", "lung share"),
    ("confounder_energy_share", "confounder share"),
    ("context_reliance", "context reliance"),
    ("seam_control_accuracy", "seam control"),
    ("context_gap", "context gap"),
)


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
        ["arch", "cycle", *(label for _, label in REPORT_METRICS)],
        (
            [arch, k, *(measured(m, key) for key, _ in REPORT_METRICS)]
            for arch, cycles in results.items()
            for k, m in enumerate(cycles)
        ),
    )


def cycle_pictures(paths: RunPaths, k: int, arch: str) -> list[Path]:
    """The pictures of one evaluated (cycle, arch): CAM grid, confusion matrices and, after the
    baseline, CAMs before/after and sample enhanced films."""
    stage = paths.stage(k, arch, "evaluate")
    panel = np.load(stage / "panel.npz")
    pre_films = panel["films"] / 255.0
    out = [
        plots.cam_grid(
            pre_films,
            panel["cams"],
            panel["probs"],
            panel["labels"],
            stage / "cam_grid.png",
            title=f"{arch}, cycle {k}: test films",
        )
    ]
    metrics = json.loads((paths.stage(k, arch, "train") / "metrics.json").read_text())["splits"]
    for split in ("test", "test_cf"):
        if split in metrics:
            out.append(
                plots.confusion_matrix_plot(
                    metrics[split]["confusion_matrix"],
                    stage / f"confusion_{split}.png",
                    title=f"{arch} c{k} {split}",
                )
            )
    if k > 0:
        before = np.load(paths.stage(0, arch, "evaluate") / "panel.npz")
        n = 12
        out.append(
            plots.before_after_grid(
                pre_films[:n],
                before["cams"][:n],
                panel["cams"][:n],
                stage / "cam_before_after.png",
                panel["labels"][:n],
                names=("cycle 0", f"cycle {k}"),
                lungs=panel["lungs"][:n],
            )
        )
        samples = paths.stage(k, arch, "shards") / "samples.png"
        if samples.is_file():
            out.append(samples)
    return out


def write_cycle_report(runner: Runner, state: CycleState, tracking_note: str) -> Path:
    """<run>/report.md: the table, per-cycle curves, why architectures stopped, the last CAMs."""
    root = runner.paths.root
    measured = {key for cycles in state.results.values() for m in cycles for key in m}
    metrics = [key for key, _ in REPORT_METRICS if key in measured]
    curves = plots.cycle_curves(state.results, metrics, root / "cycle_curves.png")
    lines = [
        f"# Cycle report: {runner.run_name}",
        "",
        "Classification on the original films (test: same shortcut as train; test_cf: "
        "shortcut reversed); localisation of the CAM on test, mean (95% bootstrap interval).",
        "",
        cycle_table(state.results),
        "",
        f"![per-cycle metrics]({curves.name})",
        "",
    ]
    for arch, why in state.stopped.items():
        lines.append(f"- {arch} stopped {why}")
    for arch, cycles in state.results.items():
        last = len(cycles) - 1
        for name in ("cam_grid.png", "cam_before_after.png"):
            picture = runner.paths.stage(last, arch, "evaluate") / name
            if picture.is_file():
                lines.append(f"![{arch} {name}]({picture.relative_to(root)})")
    lines += ["", tracking_note, ""]
    return atomic_write_text(root / "report.md", "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Evidence


LOCALIZATION_METRICS = tuple(
    (metric, label)
    for metric, label in EVIDENCE_METRICS
    if metric in ("lesion_pointing_game", "lung_energy_share", "confounder_energy_share")
)


def evidence_table(table: dict, metrics: Sequence[tuple[str, str]] = EVIDENCE_METRICS) -> str:
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
        ["arch", "variant", "seeds", *(label for _, label in metrics)],
        (
            [
                arch,
                variant,
                seeds(row),
                *(change(row.get(metric)) for metric, _ in metrics),
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
