"""The smoke sweep run as a user runs it: killed mid-way and resumed without rerunning its finished
trials, then Ray Tune's trials, ASHA, MLflow runs and the best config checked on the result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cycle.config import load_config

ROOT = Path(__file__).resolve().parent.parent
JOB = [
    sys.executable,
    str(ROOT / "jobs" / "sweep.py"),
    "--space",
    str(ROOT / "tune_spaces" / "smoke.yaml"),
    "--config",
    str(ROOT / "configs" / "smoke.yaml"),
]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _args(out: Path) -> list[str]:
    return [
        "--set",
        f"output_dir={out}",
        "--set",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        "--set",
        "sweep.max_concurrent_trials=2",
    ]


def _finished_trials(out: Path, name: str) -> dict[str, int]:
    """trial id -> mtime of its last evaluate marker, for trials whose last cycle finished."""
    trials = out / "sweeps" / name / "trials"
    return {
        d.name: (d / "cycle_1" / "tinyvgg" / "evaluate" / "DONE").stat().st_mtime_ns
        for d in (trials.iterdir() if trials.is_dir() else [])
        if (d / "cycle_1" / "tinyvgg" / "evaluate" / "DONE").is_file()
    }


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, smoke_assets):
    """One sweep, as a user lives it: killed (the driver and the Ray it started) once a trial has
    finished, then `--resume`d to the end. (output dir, the finished trials before the kill and
    after the resume, the resumed process)."""
    out = tmp_path_factory.mktemp("sweep")
    args = _args(out) + smoke_assets
    proc = subprocess.Popen(
        JOB + args + ["--name", "smoke"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=out,
        start_new_session=True,
    )
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None and not _finished_trials(out, "smoke"):
            time.sleep(0.5)
        live = _trial_runs_with_results(out, proc, deadline)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    before = _finished_trials(out, "smoke")
    resumed = subprocess.run(
        JOB + args + ["--resume", "smoke"], capture_output=True, text=True, timeout=900, cwd=out
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    return out, before, _finished_trials(out, "smoke"), resumed, live


def _trial_runs_with_results(out: Path, proc: subprocess.Popen, deadline: float) -> dict:
    """While the sweep still runs: trial run name -> the steps of its `objective` in MLflow."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    while time.time() < deadline and proc.poll() is None:
        experiment = client.get_experiment_by_name("cycle-smoke")
        runs = experiment and client.search_runs([experiment.experiment_id], "tags.sweep = 'smoke'")
        live = {
            run.info.run_name: [
                m.step for m in client.get_metric_history(run.info.run_id, "objective")
            ]
            for run in runs or []
        }
        if any(live.values()):
            return live
        time.sleep(0.5)
    return {}


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(sweep_run):
    out, before, after, resumed, live = sweep_run
    assert before, "no trial finished before the kill"
    # Before the kill, while the sweep ran, trial runs already held their reported results.
    assert any(steps and steps[0] == 0 for steps in live.values()), live
    assert "resuming" in resumed.stderr
    assert {k: after[k] for k in before} == before  # finished trials were not run again
    trials = json.loads((out / "sweeps" / "smoke" / "trials.json").read_text())
    assert len(trials) == 4 and not [t for t in trials if t["status"] == "error"]


def test_smoke_sweep_runs_trials_stops_some_early_and_tracks_them(sweep_run):
    import mlflow

    out, _, _, proc, _ = sweep_run
    sweep_dir = out / "sweeps" / "smoke"
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert len(trials) == 4 and not [t for t in trials if t["status"] == "error"]
    assert any(t["status"] == "stopped early" for t in trials), trials
    objectives = [t["objective"] for t in trials]
    assert objectives == sorted(objectives, reverse=True)
    assert (sweep_dir / "settings_vs_objective.png").stat().st_size > 1000
    assert "| 1 |" in (sweep_dir / "summary.md").read_text()
    # the best settings: printed as --set flags and written as a config jobs/cycle.py accepts
    best = load_config(sweep_dir / "best_config.yaml")
    assert [best.train.epochs, best.enhance.strength] == [
        trials[0]["values"]["train.epochs"],
        trials[0]["values"]["enhance.strength"],
    ]
    assert "best --set   --set train.epochs=" in proc.stdout

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cycle-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("job") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert {c.data.tags["status"] for c in children} >= {"stopped early", "finished"}
    for child in children:
        assert {"train.epochs", "enhance.strength"} <= set(child.data.params)
        assert "objective" in child.data.metrics and "val_accuracy" in child.data.metrics
        # Each report once, live or after the resume, and every run finished.
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "objective")]
        assert steps == list(range(len(steps))) and steps, steps
        assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {
        "sweep/summary.md",
        "sweep/settings_vs_objective.png",
        "sweep/best_config.yaml",
    } <= artifacts
    version = client.get_model_version_by_alias("cycle-classifier", "sweep_best")
    assert version.run_id == parent.info.run_id
