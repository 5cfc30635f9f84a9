import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, run_job

import cycle.train as train_module
from cycle.config import load_config
from cycle.data.records import load_dataset
from cycle.train import BEST, EPOCH_LOG, LAST, STARTED, run_training, train_func


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
    films = train_module.film_sets(str(records), None, cfg.seed)
    return {
        "config": cfg.model_dump(mode="json"),
        "films": {name: f.to_dict() for name, f in films.items()},
        "run_dir": str(run_dir),
        "in_process": True,
    }


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
def test_a_killed_train_worker_is_restarted_and_resumes_from_its_checkpoint_in_s3(
    tmp_path, phantom_root, ray_session, s3
):
    """FailureConfig(max_failures=1), checkpoints in S3 (the suite's moto server): SIGKILL the
    worker process once Ray has registered a checkpoint, and delete the stage's weights from the
    node's disk; Ray Train starts a new worker, which resumes from the newest checkpoint in the
    bucket alone instead of starting over."""
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    bucket = s3("ray")
    cfg, records = _setup(
        tmp_path,
        phantom_root,
        "model.arch=resnet18",
        "train.epochs=6",
        "resources.num_workers=1",
        "resources.max_failures=1",
        f"resources.storage_path=s3://{bucket}/ray",
    )
    run_dir = tmp_path / "run"
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(metrics=run_training(cfg, records, run_dir, "killed"))
    )
    thread.start()
    deadline = time.time() + 300
    history = run_dir / "history.json"
    # The evidence, not a guess at how long Ray takes: the controller's own record of the
    # checkpoints it has registered (it takes a report a moment after the worker makes it).
    while (
        not registered_checkpoints(s3.client, bucket, "ray/killed")
        and time.time() < deadline
        and thread.is_alive()
    ):
        time.sleep(0.2)
    alive = [
        a
        # This test's Ray by its address: "auto" fails where another Ray runs on the machine.
        for a in list_actors(
            address=ray_session.get_runtime_context().gcs_address,
            filters=[("state", "=", "ALIVE")],
        )
        if a.class_name == "RayTrainWorker"
    ]
    assert len(alive) == 1 and thread.is_alive(), "training ended before the worker could be killed"
    os.kill(alive[0].pid, signal.SIGKILL)
    # The node's own disk is lost with it: only Ray's copy in the bucket can bring the run back.
    for name in (LAST, BEST):
        (run_dir / name).unlink(missing_ok=True)
    thread.join(timeout=600)
    assert "metrics" in outcome  # fit() succeeded after the restart
    assert [row["epoch"] for row in json.loads(history.read_text())] == list(
        range(1, 7)
    )  # none lost
    started = json.loads((run_dir / STARTED).read_text())
    assert started["resume_source"] == "Ray storage checkpoint", started
    assert started["resumed_from"].startswith(f"{bucket}/ray/killed/checkpoint_"), started
    # Resumed, not restarted: after the kill, epochs ran from the checkpoint's epoch on, once each.
    resumed_after = started["resumed_after_epoch"]
    assert 1 <= resumed_after < 6
    executed = _epochs_run(run_dir)
    assert executed[-(6 - resumed_after) :] == list(range(resumed_after + 1, 7))
    assert executed.count(1) == 1
    # The weights chosen on val came back from the bucket too.
    assert torch.load(run_dir / BEST, weights_only=True)["epoch"] >= 1


def test_train_job_runs_the_smoke_config(tmp_path, smoke_assets, own_ray_temp_dir):
    proc = run_job("train.py", [*SMOKE, *smoke_assets, "--set", f"output_dir={tmp_path}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_cf" in proc.stdout and "accuracy" in proc.stdout
    run_dir = tmp_path / "train-tinyvgg-seed0"
    assert (run_dir / "metrics.json").is_file() and (run_dir / BEST).is_file()
    # The smoke config trains in-process (num_workers=0): nothing needed Ray, and none started.
    assert not os.listdir(own_ray_temp_dir)


def registered_checkpoints(client, bucket: str, run: str) -> list:
    """The checkpoints Ray Train's controller has registered for a run, from its own snapshot in
    the bucket."""
    try:
        body = client.get_object(Bucket=bucket, Key=f"{run}/checkpoint_manager_snapshot.json")
        return json.loads(body["Body"].read())["checkpoint_results"]
    except (client.exceptions.NoSuchKey, ValueError, KeyError):
        return []  # not written yet, or caught mid-write


def _stored(folder: Path, epoch: int, last: bytes, said_bytes: int | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(last)
    size = len(last) if said_bytes is None else said_bytes
    (folder / "epoch.json").write_text(json.dumps({"epoch": epoch, "bytes": size}))


def test_the_newest_complete_stored_checkpoint_wins_registered_or_not(tmp_path):
    """A worker killed after uploading a checkpoint but before Ray registered it: the restore
    still finds it. One cut off mid-upload (last.pt shorter than its epoch.json says), one
    without its epoch.json and other folders are passed over."""
    from pyarrow import fs

    from cycle.ray_checkpoints import stored_checkpoints

    run = tmp_path / "storage" / "run"
    _stored(run / "checkpoint_2026-01-01_00-00-01.000000", 1, b"x" * 10)
    _stored(run / "checkpoint_2026-01-01_00-00-02.000000", 2, b"x" * 10)  # never registered
    _stored(run / "checkpoint_2026-01-01_00-00-03.000000", 3, b"x" * 4, said_bytes=10)  # cut
    (run / "checkpoint_2026-01-01_00-00-04.000000").mkdir()  # the upload had just begun
    _stored(run / "not_a_checkpoint", 9, b"x")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    found = stored_checkpoints(fs.LocalFileSystem(), str(run))
    assert [c.epoch for c in found] == [1, 2]
    assert found[-1].path.endswith("checkpoint_2026-01-01_00-00-02.000000")
    assert stored_checkpoints(fs.LocalFileSystem(), str(tmp_path / "none")) == []


def test_a_restore_from_storage_alone_brings_the_weights_chosen_so_far(tmp_path):
    """Epoch 2 chose weights (its checkpoint holds best.pt), epoch 3 did not: restoring epoch 3
    gives its last.pt and epoch 2's best.pt, from storage, with no file of the run's folder."""
    from pyarrow import fs

    from cycle.ray_checkpoints import restore_folder, stage_files, stored_checkpoints

    run, storage = tmp_path / "run", tmp_path / "storage" / "run"
    run.mkdir()
    for epoch, improved in ((1, True), (2, True), (3, False)):
        (run / LAST).write_bytes(f"last {epoch}".encode())
        if improved:
            (run / BEST).write_bytes(f"best {epoch}".encode())
        names = (LAST, BEST) if improved else (LAST,)
        staged = stage_files(tmp_path / "staging", run, names, epoch=epoch)
        shutil.copytree(staged, storage / f"checkpoint_2026-01-01_00-00-0{epoch}.000000")
    shutil.rmtree(run)
    found = stored_checkpoints(fs.LocalFileSystem(), str(storage))
    assert [(c.epoch, c.files) for c in found] == [
        (1, (BEST, LAST)),
        (2, (BEST, LAST)),
        (3, (LAST,)),
    ]
    folder = restore_folder(found[-1], found[:1] + found[2:])  # epoch 2's was deleted: epoch 1's
    assert (folder / LAST).read_bytes() == b"last 3" and (folder / BEST).read_bytes() == b"best 1"
    folder = restore_folder(found[-1], found)
    assert (folder / LAST).read_bytes() == b"last 3" and (folder / BEST).read_bytes() == b"best 2"


def test_train_job_fails_fast_on_bad_config(tmp_path):
    proc = run_job("train.py", ["--set", "train.optimiser=adam"], tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "train.optimiser: unknown key" in proc.stderr


@pytest.mark.ray
def test_original_films_stream_in_one_seeded_order_in_process_and_through_ray_data(
    tmp_path, phantom_root, ray_session
):
    """What a worker reads in cycle 0: every film of the split once, in a permutation drawn from
    the seed, the same rows whether Ray Data's tasks decode them or this process does; a second
    pass comes from the per-process cache only while it fits in data.cache_mb."""
    import numpy as np

    from cycle.data.films import FilmSet, FilmStreams
    from cycle.data.transforms import preprocess_from_config

    cfg, records = _setup(tmp_path, phantom_root)
    pre = preprocess_from_config(cfg.data)
    films = FilmSet.originals(records, "train", seed=3)
    n = len(films)
    local = list(films.local_batches(pre, cfg.data.max_image_pixels))
    index = np.concatenate([b["index"] for b in local])
    assert sorted(index.tolist()) == list(range(n)) and index.tolist() != list(range(n))
    other = FilmSet.originals(records, "train", seed=4).listing()
    assert [row["index"] for row in other] != index.tolist()
    streamed = list(
        films.ray_dataset(pre, cfg.data.max_image_pixels).iter_batches(
            batch_size=None, batch_format="numpy"
        )
    )
    assert np.concatenate([b["index"] for b in streamed]).tolist() == index.tolist()
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in streamed]), np.concatenate([b["image"] for b in local])
    )
    # What a worker gets with data.decode=worker (the default): the rows, decoded where they land.
    rows = films.ray_dataset(pre, cfg.data.max_image_pixels, decode=False)
    listed = list(
        films.decoded_rows(
            rows.iter_batches(batch_size=64, batch_format="numpy"), pre, cfg.data.max_image_pixels
        )
    )
    assert np.concatenate([b["index"] for b in listed]).tolist() == index.tolist()
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in listed]), np.concatenate([b["image"] for b in local])
    )
    labels = np.concatenate([b["label"] for b in local])
    assert tuple(np.bincount(labels, minlength=2)) == films.label_counts()

    def passes(cache_mb):
        data = cfg.data.model_copy(update={"cache_mb": cache_mb})
        streams = FilmStreams({"train": films}, data, from_ray=False)
        first = [b["image"].copy() for b in streams.batches("train")]
        second = [b["image"] for b in streams.batches("train")]
        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))
        return "train" in streams.kept

    assert passes(64) and not passes(0)
