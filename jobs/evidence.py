"""Evidence table: every enhancement mode and a no-enhancement control, baseline vs last cycle,
over several seeds, with paired bootstrap 95% intervals.

    python jobs/evidence.py [--config FILE] [--set k=v ...] [--seeds 0 1 2]
                            [--variants control highlight suppress context_swap] [--name evidence]
                            [--also-depth 1]

Each (seed, variant) is an ordinary cycle run under output_dir (resumable: rerun the same command
and finished stages are skipped); the baseline is trained once per seed and shared by the
variants. Writes output_dir/<name>/evidence.md and evidence.json and logs them to MLflow.
`--also-depth 1` maps the same checkpoints one block earlier and adds their localisation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common

from cycle.evidence import (
    all_variants,
    collect,
    probe_points,
    rescore_at_depth,
    run_evidence,
)
from cycle.preflight import input_problem
from cycle.report import write_evidence_report
from cycle.tracking.studies import track_evidence


def main() -> None:
    parser = _common.config_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    known = list(all_variants())  # the control + every registered enhancement mode
    parser.add_argument("--variants", nargs="+", default=known, choices=known)
    parser.add_argument(
        "--name", default="evidence", help="prefix of the runs and the report folder"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only tabulate runs that already finished"
    )
    parser.add_argument(
        "--also-depth",
        type=int,
        nargs="*",
        default=[],
        metavar="D",
        help="also map the same checkpoints at these CAM depths and tabulate their localisation",
    )
    _common.inprocess_shards_argument(parser)
    args = parser.parse_args()
    cfg = _common.config_from(args)
    variants = list(dict.fromkeys(args.variants))
    print(
        f"evidence     {len(args.seeds)} seed(s) x {len(variants)} variant(s) "
        f"({', '.join(variants)}) "
        f"x archs {', '.join(cfg.cycles.archs)}; baseline + {cfg.cycles.max} cycle(s) each",
        flush=True,
    )

    problem = None if args.report_only else input_problem(cfg)
    if problem:
        sys.exit(f"error: {problem}")
    started = time.perf_counter()
    if not args.report_only:
        run_evidence(cfg, args.seeds, variants, args.name, inprocess_shards=args.inprocess_shards)
    out, archs = Path(cfg.output_dir), list(cfg.cycles.archs)
    table = collect(out, args.name, args.seeds, variants, archs)
    points = probe_points(out, args.name, args.seeds, variants, archs)
    depth_tables = {
        depth: collect(
            out,
            args.name,
            args.seeds,
            variants,
            archs,
            rescore_at_depth(cfg, args.name, args.seeds, variants, depth),
        )
        for depth in dict.fromkeys(args.also_depth)
        if depth != cfg.cam.depth
    }
    report = write_evidence_report(cfg, args.name, table, args.seeds, points, depth_tables)
    track_evidence(cfg, args.name, table, report)
    print(report.read_text())
    print(f"report       {report}\nfinished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
