"""The real-data path end to end: a Kaggle-layout folder of real-size films, as the Kermany set
ships them (JPEGs of 1,000-1,800 px, gray and RGB, Kermany file names, broken files among them),
with no counterfactual split and no masks beside them. The cycle runs on it with the
phantom-trained U-Net (`lungseg.weights=phantom`), the way a user runs it: `python jobs/cycle.py`
from another folder. Numbers that need truth the data lacks are absent, never invented; the
context-swap probe and the lung share, which need none, are there."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cycle.data.phantom import generate

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def kermany_name(label: int, patient: int, k: int) -> str:
    if label:
        kind = "bacteria" if patient % 3 else "virus"
        return f"person{patient + 1}_{kind}_{10 * patient + k}.jpeg"
    prefix = "NORMAL2-IM" if patient % 2 else "IM"
    return f"{prefix}-{patient + 100:04d}-{k + 1:04d}.jpeg"


def write_real_size_tree(root: Path, split: str, n: int, seed: int, patient_offset: int) -> None:
    films = generate(n, seed, size=256, patient_offset=patient_offset)
    rng = np.random.default_rng(seed)
    for i, (image, label) in enumerate(zip(films.images, films.labels)):
        patient = patient_offset + i // 2  # two films a patient, as in the real set
        # NORMAL films are larger than PNEUMONIA ones in the real set; neither is square.
        width = int(rng.integers(1200, 1800) if label == 0 else rng.integers(1000, 1600))
        height = int(width * rng.uniform(0.7, 0.95))
        big = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        if i % 5 == 0:
            big = cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)  # some films are stored as RGB
        folder = root / split / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / kermany_name(int(label), patient, i % 2)), big)


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kermany") / "chest_xray"
    write_real_size_tree(root, "train", 96, seed=11, patient_offset=0)
    write_real_size_tree(root, "test", 32, seed=12, patient_offset=500)
    broken = root / "train" / "PNEUMONIA"
    (broken / "person999_bacteria_1.jpeg").write_bytes(b"")
    good = next(broken.glob("*.jpeg")).read_bytes()
    (broken / "person998_virus_2.jpeg").write_bytes(good[: len(good) // 3])  # truncated
    return root


def test_the_cycle_runs_on_real_size_films_with_the_phantom_lung_model(real_tree, tmp_path):
    user_folder = tmp_path / "elsewhere"
    user_folder.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "cycle.py"),
            "--config",
            str(ROOT / "configs" / "smoke.yaml"),
            "--set",
            f"data.root={real_tree}",
            "--set",
            "lungseg.weights=phantom",
            "--set",
            "output_dir=out",
            "--set",
            "tracking.enabled=false",
            "--inprocess-shards",
            "--run-name",
            "real",
        ],
        cwd=user_folder,
        capture_output=True,
        text=True,
        timeout=900,
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-5000:]
    assert "lungseg.weights=phantom" in said and "unmeasured" in said
    run = user_folder / "out" / "real"
    skipped = json.loads((run / "records.json").read_text())
    assert "person999_bacteria_1.jpeg" in json.dumps(skipped)
    assert "person998_virus_2.jpeg" in json.dumps(skipped)

    for k in (0, 1):
        metrics = json.loads(
            (run / f"cycle_{k}" / "tinyvgg" / "evaluate" / "metrics.json").read_text()
        )
        for name in (
            "test_accuracy",
            "lung_energy_share",
            "context_reliance",
            "lung_consistent_accuracy",
            "seam_control_accuracy",
            "context_gap",
            "val_context_reliance",
        ):
            assert np.isfinite(metrics[name]), name
        assert 0.0 <= metrics["context_reliance"] <= 1.0
        # No truth for these on real films: absent, not zero.
        for name in ("test_cf_accuracy", "lesion_pointing_game", "confounder_energy_share"):
            assert name not in metrics, name
    report = (run / "report.md").read_text()
    assert "| tinyvgg | 1 |" in report and "n/a" in report
