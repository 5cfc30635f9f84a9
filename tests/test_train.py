import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cycle.train as train_module
from cycle.config import load_config
from cycle.data.records import load_dataset
from cycle.train import BEST, EPOCH_LOG, LAST, STARTED, run_training, train_func

ROOT = Path(__file__).resolve().parent.parent


def _setup(tmp_path, phantom_root, *overrides):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "model.arch=tinyvgg",
            "data.image_size=48",
            "data.crop_fraction=0.875",
            "train.epochs=3",
            "train.batch_size=16",
            "train.early_stopping_patience=10",
            *overrides,
        ],
    )
    scan = load_dataset(phantom_root, val_fraction=0.25, seed=0, cache_dir=tmp_path / "cache")
    records = scan.save(tmp_path / "records.json")
    return cfg, records


def _epochs_run(run_dir):
    return [int(line.split()[0]) for line in (run_dir / EPOCH_LOG).read_text().splitlines()]


def _loop_config(cfg, records, run_dir):
    return {"config": cfg.model_dump(mode="json"), "records": str(records), "run_dir": str(run_dir)}


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, phantom_root, monkeypatch):
    cfg, records = _setup(tmp_path, phantom_root)
    train_func(_loop_config(cfg, records, tmp_path / "straight"))

    # Crash during the second epoch, then run again: it resumes after epoch 1.
    real_epoch = train_module.train_one_epoch
    calls = {"n": 0}

    def crashing_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated worker crash")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", crashing_epoch)
    with pytest.raises(RuntimeError, match="simulated"):
        train_func(_loop_config(cfg, records, tmp_path / "resumed"))
    saved = torch.load(tmp_path / "resumed" / LAST, weights_only=True)
    assert saved["state"]["epoch"] == 1 and not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    train_func(_loop_config(cfg, records, tmp_path / "resumed"))

    a = torch.load(tmp_path / "straight" / LAST, weights_only=True)
    b = torch.load(tmp_path / "resumed" / LAST, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    assert [h["train_loss"] for h in a["state"]["history"]] == pytest.approx(
        [h["train_loss"] for h in b["state"]["history"]], abs=1e-6
    )
    # Epochs really executed (history.json is rebuilt from the checkpoint): a restart from
    # scratch would show epoch 1 twice.
    assert _epochs_run(tmp_path / "resumed") == _epochs_run(tmp_path / "straight") == [1, 2, 3]
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())["flat"]
    mb = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["flat"]
    assert ma == pytest.approx(mb, abs=1e-6, nan_ok=True)
    assert {"val_accuracy", "test_accuracy", "test_cf_accuracy", "test_auc"} <= set(ma)


def test_early_stopping_keeps_the_weights_chosen_on_val(tmp_path, phantom_root, monkeypatch):
    cfg, records = _setup(
        tmp_path, phantom_root, "train.epochs=8", "train.early_stopping_patience=2"
    )
    # Force a val-loss curve that turns up after epoch 2.
    losses = iter([0.6, 0.5, 0.55, 0.56, 0.57, 0.58, 0.59, 0.6])
    real_evaluate = train_module.split_metrics

    def scripted(*args, **kwargs):
        metrics = real_evaluate(*args, **kwargs)
        metrics["loss"] = next(losses)
        return metrics

    monkeypatch.setattr(train_module, "split_metrics", scripted)
    run_dir = tmp_path / "run"
    train_func(_loop_config(cfg, records, run_dir))
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 4  # epochs 3 and 4 did not improve: patience 2 reached
    assert torch.load(run_dir / BEST, weights_only=True)["epoch"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["flat"]["best_epoch"] == 2


@pytest.mark.ray
def test_ray_train_worker_trains_and_checkpoints_to_storage(tmp_path, phantom_root, ray_session):
    cfg, records = _setup(
        tmp_path,
        phantom_root,
        "train.epochs=1",
        "resources.num_workers=1",
        f"resources.storage_path={tmp_path / 'storage'}",
    )
    metrics = run_training(cfg, records, tmp_path / "run", name="ray-one-worker")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert list((tmp_path / "storage" / "ray-one-worker").glob("checkpoint_*/last.pt"))


@pytest.mark.ray
def test_a_killed_train_worker_is_restarted_and_resumes_from_its_checkpoint(
    tmp_path, phantom_root, ray_session
):
    """FailureConfig(max_failures=1): SIGKILL the worker process after its first epoch; Ray Train
    starts a new worker, which resumes from the last checkpoint instead of starting over."""
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    cfg, records = _setup(
        tmp_path,
        phantom_root,
        "model.arch=resnet18",
        "train.epochs=6",
        "resources.num_workers=1",
        "resources.max_failures=1",
        f"resources.storage_path={tmp_path / 'storage'}",
    )
    run_dir = tmp_path / "run"
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(metrics=run_training(cfg, records, run_dir, "killed"))
    )
    thread.start()
    deadline = time.time() + 300
    stored = tmp_path / "storage" / "killed"
    history = run_dir / "history.json"
    # Two epochs done here: Ray has registered epoch 1's checkpoint on storage_path by now (the
    # controller takes reports a moment after the worker writes them).
    while (
        not (history.is_file() and len(json.loads(history.read_text())) >= 2)
        and time.time() < deadline
        and thread.is_alive()
    ):
        time.sleep(0.1)
    alive = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")])
        if a.class_name == "RayTrainWorker"
    ]
    assert len(alive) == 1 and thread.is_alive(), "training ended before the worker could be killed"
    os.kill(alive[0].pid, signal.SIGKILL)
    # The node's own disk is lost with it: only Ray's copy on storage_path can bring the run back.
    (run_dir / LAST).unlink()
    thread.join(timeout=600)
    assert "metrics" in outcome  # fit() succeeded after the restart
    assert [row["epoch"] for row in json.loads(history.read_text())] == list(
        range(1, 7)
    )  # none lost
    started = json.loads((run_dir / STARTED).read_text())
    assert started["resume_source"] == "Ray storage checkpoint", started
    assert str(started["resumed_from"]).startswith(str(stored)) or not str(
        started["resumed_from"]
    ).startswith(str(run_dir))
    # Resumed, not restarted: after the kill, epochs ran from the checkpoint's epoch on, once each.
    resumed_after = started["resumed_after_epoch"]
    assert 1 <= resumed_after < 6
    executed = _epochs_run(run_dir)
    assert executed[-(6 - resumed_after) :] == list(range(resumed_after + 1, 7))
    assert executed.count(1) == 1


@pytest.mark.ray
def test_train_job_runs_the_smoke_config(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "train.py"),
            "--config",
            str(ROOT / "configs" / "smoke.yaml"),
            "--set",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_cf" in proc.stdout and "accuracy" in proc.stdout
    run_dir = tmp_path / "train-tinyvgg-seed0"
    assert (run_dir / "metrics.json").is_file() and (run_dir / BEST).is_file()


def test_train_job_fails_fast_on_bad_config():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--set", "train.optimiser=adam"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "train.optimiser: unknown key" in proc.stderr


@pytest.mark.parametrize("n", [143, 144])
def test_ddp_ranks_read_disjoint_equal_parts_that_change_each_epoch(n):
    """What each Ray Train rank reads: no film on two ranks, the same number of steps on every
    rank (DDP), at most world_size - 1 films left out, a new draw each epoch. One worker reads
    every film."""
    from cycle.data.dataset import EpochShuffle

    for world in (2, 3):
        parts = []
        for rank in range(world):
            sampler = EpochShuffle(n, seed=7, rank=rank, world_size=world)
            parts.append(list(sampler))
            assert len(sampler) == n // world
        seen = [i for part in parts for i in part]
        assert len(seen) == len(set(seen)) == n - n % world
        sampler = EpochShuffle(n, seed=7, rank=0, world_size=world)
        sampler.set_epoch(1)
        assert list(sampler) != parts[0]
    assert sorted(EpochShuffle(n, seed=7)) == list(range(n))
