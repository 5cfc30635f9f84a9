"""The evidence table's arithmetic and its reading of finished runs (no training here: the runs'
files are written by hand, so the expected numbers are known)."""

from pathlib import Path

import numpy as np
import pytest

from cycle.config import Config
from cycle.evidence import (
    collect,
    paired_bootstrap,
    probe_points,
    run_name,
    share_baseline,
    variant_config,
)
from cycle.metrics import spearman
from cycle.report import evidence_table, write_evidence_report


def test_variants_change_only_the_enhancement_and_the_seed():
    cfg = Config()
    control = variant_config(cfg, 7, "control")
    assert (
        control.seed == 7
        and control.enhance.strength == 0.0
        and control.enhance.mode == cfg.enhance.mode
    )
    assert variant_config(cfg, 1, "highlight").enhance.mode == "highlight"
    assert variant_config(cfg, 1, "highlight").train == cfg.train
    with pytest.raises(ValueError, match="unknown variant 'sharpen'"):
        variant_config(cfg, 0, "sharpen")


def test_paired_bootstrap_constant_change_has_a_point_interval():
    before = [np.zeros(50), np.zeros(50)]
    after = [np.ones(50), np.ones(50)]
    assert paired_bootstrap(before, after, n_boot=200) == pytest.approx((1.0, 1.0, 1.0))


def test_paired_bootstrap_interval_widens_with_seed_disagreement_and_skips_nan():
    rng = np.random.default_rng(0)
    before = [rng.random(200) for _ in range(3)]
    agree = [b + 0.1 for b in before]
    disagree = [before[0] + 0.3, before[1] - 0.1, before[2] + 0.1]
    c1, lo1, hi1 = paired_bootstrap(before, agree, n_boot=500)
    c2, lo2, hi2 = paired_bootstrap(before, disagree, n_boot=500)
    assert c1 == pytest.approx(0.1) and c2 == pytest.approx(0.1)
    assert hi2 - lo2 > hi1 - lo1 + 0.1
    with_nan = [np.array([np.nan, 0.0, 0.0])]
    assert paired_bootstrap(with_nan, [np.array([5.0, 1.0, 1.0])], n_boot=50)[0] == pytest.approx(
        1.0
    )
    assert np.isnan(paired_bootstrap([np.array([np.nan])], [np.array([1.0])])[0])


def _fake_run(root: Path, arch: str, cycles: dict[int, dict]) -> None:
    """cycles: k -> {"correct": per-film 0/1 on test, "cf": on test_cf, "pointing": per-film
    values}."""
    paths = [f"/data/test/f{i}.png" for i in range(4)]
    for k, v in cycles.items():
        train, evaluate = (
            root / f"cycle_{k}" / arch / "train",
            root / f"cycle_{k}" / arch / "evaluate",
        )
        train.mkdir(parents=True)
        evaluate.mkdir(parents=True)
        for split, key in (("test", "correct"), ("test_cf", "cf")):
            # label 1 everywhere: a correct film has probability 0.9, a wrong one 0.1
            rows = [
                f"{p.replace('test', split)},1,{0.9 if c else 0.1}" for p, c in zip(paths, v[key])
            ]
            (train / f"predictions_{split}.csv").write_text(
                "path,label,prob_pneumonia\n" + "\n".join(rows) + "\n"
            )
        np.savez(
            evaluate / "per_image.npz",
            paths=np.array(paths),
            lesion_pointing_game=np.array(v["pointing"]),
            lung_energy_share=np.full(4, 0.2 + 0.1 * k),
            **(
                {
                    "context_reliance": np.array(v["reliance"], float),
                    "lung_consistent_accuracy": 1.0 - np.array(v["reliance"], float),
                    "seam_control_accuracy": np.ones(4),
                }
                if "reliance" in v
                else {}
            ),
        )
        (evaluate / "DONE").write_text("{}")


def test_collect_reads_baseline_and_last_cycle_per_seed(tmp_path):
    base = {"correct": [1, 1, 1, 0], "cf": [0, 0, 1, 0], "pointing": [0.0, np.nan, 1.0, 0.0]}
    last = {"correct": [1, 1, 1, 1], "cf": [1, 1, 1, 0], "pointing": [1.0, np.nan, 1.0, 0.0]}
    for seed in (0, 1):
        _fake_run(
            tmp_path / run_name("ev", seed, "context_swap"), "resnet18", {0: base, 1: base, 2: last}
        )
    table = collect(tmp_path, "ev", [0, 1, 2], ["context_swap", "control"], ["resnet18"])
    row = table["resnet18"]["context_swap"]
    assert "control" not in table["resnet18"]  # no finished runs: left out, not zero
    assert (
        row["test_accuracy"]["baseline"] == pytest.approx(0.75)
        and row["test_accuracy"]["last"] == 1.0
    )
    assert row["test_cf_accuracy"]["change"] == pytest.approx(0.5)
    assert row["lesion_pointing_game"]["change"] == pytest.approx(1 / 3)
    assert row["lung_energy_share"]["change"] == pytest.approx(
        0.2
    )  # cycle 2 is the last, not cycle 1
    assert row["test_accuracy"]["seeds"] == [0, 1]
    text = evidence_table(table)
    assert "| resnet18 | context_swap | 2 |" in text and "0.250 → 0.750 (+0.500" in text


def test_share_baseline_copies_a_finished_cycle_zero_once(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    (source / "cycle_0" / "tinyvgg" / "evaluate").mkdir(parents=True)
    (source / "cycle_0" / "tinyvgg" / "evaluate" / "mlflow_run.json").write_text("{}")
    (source / "cycle_0" / "tinyvgg" / "evaluate" / "DONE").write_text("{}")
    (source / "records.json").write_text("{}")
    target.mkdir()
    share_baseline(source, target)
    assert (target / "cycle_0" / "tinyvgg" / "evaluate" / "DONE").is_file()
    assert not (
        target / "cycle_0" / "tinyvgg" / "evaluate" / "mlflow_run.json"
    ).exists()  # logged anew
    assert (target / "records.json").is_file() and not list(target.glob("*.partial"))


def test_probe_points_pair_the_probe_with_the_cf_gap_and_count_a_baseline_once(tmp_path):
    base = {"correct": [1, 1, 1, 1], "cf": [0, 0, 0, 1], "pointing": [0.0] * 4}
    last = {"correct": [1, 1, 1, 0], "cf": [1, 1, 0, 0], "pointing": [0.0] * 4}
    base["reliance"], last["reliance"] = [1, 1, 1, 0], [0, 0, 1, 0]
    for variant in ("context_swap", "control"):
        _fake_run(tmp_path / run_name("ev", 0, variant), "resnet18", {0: base, 1: last})
    variants = ["context_swap", "control"]
    points = probe_points(tmp_path, "ev", [0, 1], variants, ["resnet18"])
    assert [(p["variant"], p["cycle"]) for p in points] == [
        ("baseline", 0),
        ("context_swap", 1),
        ("control", 1),
    ]
    assert points[0]["context_reliance"] == 0.75 and points[0]["cf_gap"] == 0.75
    assert points[0]["context_gap"] == 0.75  # seam control 1 minus lung-consistent 0.25
    assert points[1]["context_reliance"] == 0.25 and points[1]["cf_gap"] == pytest.approx(0.25)
    rho = spearman([p["context_reliance"] for p in points], [p["cf_gap"] for p in points])
    assert rho == pytest.approx(1.0)
    assert spearman([0.1, 0.2, 0.3], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)

    cfg = Config(output_dir=str(tmp_path))
    table = collect(tmp_path, "ev", [0], variants, ["resnet18"])
    assert "context_reliance" in table["resnet18"]["context_swap"]
    report = write_evidence_report(cfg, "ev", table, [0], points, {1: table})
    assert "**1.00** for `context_gap` and **1.00** for `context_reliance`" in report.read_text()
    depth_part = report.read_text().split("`cam.depth=1`")[1]
    assert "| lung share | pointing | confounder share |" in depth_part
    assert "context reliance" not in depth_part.split("Settings")[0]  # localisation only
    assert (tmp_path / "ev" / "evidence_depth1.json").is_file()
    assert (tmp_path / "ev" / "probe_vs_truth.png").stat().st_size > 10_000


def test_rescoring_at_another_depth_maps_the_same_checkpoints_and_resumes(phantom_root, tmp_path):
    import torch

    from cycle.checkpoint import save_classifier
    from cycle.data.records import records_of, scan
    from cycle.evaluate import evaluate_localization
    from cycle.evidence import rescore_at_depth
    from cycle.models import build_model

    cfg = Config(output_dir=str(tmp_path)).with_overrides(
        {"cycles.archs": ["tinyvgg"], "data.image_size": 48, "model.arch": "tinyvgg"}
    )
    root = tmp_path / run_name("ev", 0, "control")
    scanned = scan(phantom_root)
    scanned.save(root / "records.json")
    for k in (0, 1):
        torch.manual_seed(k)
        save_classifier(
            root / f"cycle_{k}" / "tinyvgg" / "train" / "best.pt",
            build_model("tinyvgg", image_size=48),
            cfg,
        )
        (root / f"cycle_{k}" / "tinyvgg" / "evaluate").mkdir(parents=True)
        (root / f"cycle_{k}" / "tinyvgg" / "evaluate" / "DONE").write_text("{}")

    name = rescore_at_depth(cfg, "ev", [0], ["control"], depth=1, log=lambda _: None)
    written = root / "cycle_1" / "tinyvgg" / "evaluate" / name
    direct = tmp_path / "direct.npz"
    evaluate_localization(
        root / "cycle_1" / "tinyvgg" / "train" / "best.pt",
        records_of(scanned.records, "test"),
        cfg.cam.method,
        seed=0,
        per_image_npz=direct,
        cam_depth=1,
    )
    for metric in ("lesion_pointing_game", "lung_energy_share", "paths"):
        np.testing.assert_array_equal(np.load(written)[metric], np.load(direct)[metric])
    evaluate_localization(
        root / "cycle_1" / "tinyvgg" / "train" / "best.pt",
        records_of(scanned.records, "test"),
        cfg.cam.method,
        per_image_npz=direct,
        cam_depth=0,
    )
    depth0, depth1 = np.load(direct)["lung_energy_share"], np.load(written)["lung_energy_share"]
    assert not np.allclose(depth0, depth1)  # the depth was passed on, not the default
    assert (root / "cycle_0" / "tinyvgg" / "evaluate" / name).is_file()

    before = written.stat().st_mtime_ns
    seen = []
    rescore_at_depth(cfg, "ev", [0], ["control"], depth=1, log=seen.append)
    assert seen == [] and written.stat().st_mtime_ns == before  # kept, not mapped again


def test_the_evidence_run_in_mlflow_keeps_the_whole_report_folder(tmp_path):
    import mlflow

    from cycle.tracking.studies import track_evidence

    base = {"correct": [1, 1, 1, 1], "cf": [0, 0, 0, 1], "pointing": [0.0] * 4, "reliance": [1] * 4}
    last = {"correct": [1, 1, 1, 0], "cf": [1, 1, 0, 0], "pointing": [0.0] * 4, "reliance": [0] * 4}
    _fake_run(tmp_path / run_name("ev", 0, "context_swap"), "resnet18", {0: base, 1: last})
    db = tmp_path / "mlflow.db"
    cfg = Config(output_dir=str(tmp_path)).with_overrides({"tracking.uri": f"sqlite:///{db}"})
    table = collect(tmp_path, "ev", [0], ["context_swap"], ["resnet18"])
    points = probe_points(tmp_path, "ev", [0], ["context_swap"], ["resnet18"])
    report = write_evidence_report(cfg, "ev", table, [0], points, {1: table})
    track_evidence(cfg, "ev", table, report)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id]
    )[0]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "evidence.md",
        "evidence.json",
        "evidence_depth1.json",
        "probe_points.json",
        "probe_vs_truth.png",
    } <= names
    assert run.data.metrics["resnet18.context_swap.context_reliance_change"] == pytest.approx(-1.0)
