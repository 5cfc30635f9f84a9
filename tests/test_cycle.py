"""The main job end to end on the smoke config: stages, resume after a kill, MLflow, fail-fast.
The smoke run itself (`smoke_run`, made from nothing) and its phantoms and lung U-Net
(`smoke_assets`, reused by every later job) are session fixtures in conftest.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMOKE, run_job

ROOT = Path(__file__).resolve().parent.parent
JOB = [sys.executable, str(ROOT / "jobs" / "cycle.py"), *SMOKE]


def _run(args, cwd, timeout=600, env=None):
    return run_job("cycle.py", [*SMOKE, *args], cwd, timeout=timeout, env=env)


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_cycle_writes_stages_report_and_mlflow_runs(smoke_run, tmp_path):
    import mlflow

    out, db, proc = smoke_run
    run_dir = out / "smoke"
    # Where the time went, said at the end and kept beside the run.
    assert "where the time went" in proc.stdout, proc.stdout[-3000:]
    assert "| train | 0 | tinyvgg |" in proc.stdout and "| shards | 1 | tinyvgg |" in proc.stdout
    # ... and none of MLflow's or Ray Data's own chatter (that takes --verbose).
    said = proc.stdout + proc.stderr
    assert "Creating initial MLflow database tables" not in said and "Total Progress" not in said
    stages = {row["stage"] for row in json.loads((run_dir / "timings.json").read_text())}
    assert stages >= {"prepare", "shards", "train", "evaluate", "track", "report"}
    for k in (0, 1):
        for stage in ("train", "evaluate") + (("shards",) if k else ()):
            assert (run_dir / f"cycle_{k}" / "tinyvgg" / stage / "DONE").is_file()
    assert "| tinyvgg | 1 |" in (run_dir / "report.md").read_text()
    assert "| tinyvgg | 0 |" in proc.stdout and "registered" in proc.stdout

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cycle-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("job") == "cycle")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["cycle"], r.data.tags["arch"]) for r in children) == [
        ("0", "tinyvgg"),
        ("1", "tinyvgg"),
    ]
    for child in children:
        m = child.data.metrics
        for name in (
            "test_accuracy",
            "test_cf_accuracy",
            "val_accuracy",
            "test_auc",
            "lung_energy_share",
            "lesion_pointing_game",
            "confounder_energy_share",
            "lung_energy_share_ci_low",
            "context_reliance",
            "context_reliance_ci_low",
            "lung_consistent_accuracy",
            "seam_control_accuracy",
            "context_gap",
            "val_context_reliance",
            "val_context_gap",
        ):
            assert name in m, name
        # The per-epoch curve: one point for every epoch the stage trained, the baseline's 2 too.
        stage = run_dir / f"cycle_{child.data.tags['cycle']}" / "tinyvgg" / "train"
        epochs = [row["epoch"] for row in json.loads((stage / "history.json").read_text())]
        curve = client.get_metric_history(child.info.run_id, "train_loss")
        assert sorted(point.step for point in curve) == epochs, (curve, epochs)
        assert len(epochs) == (2 if child.data.tags["cycle"] == "0" else 1)
        assert child.data.params["model.arch"] == "tinyvgg"
        pictures = {a.path for a in client.list_artifacts(child.info.run_id, "pictures")}
        assert "pictures/cam_grid.png" in pictures and "pictures/confusion_test_cf.png" in pictures
        assert "pictures/roc_pr.png" in pictures
        # The UI's image view: every (cycle, arch) run's pictures at one step, so that one card
        # lines the runs up (MLflow shows each run's image at the slider's step exactly).
        k = child.data.tags["cycle"]
        images = {a.path for a in client.list_artifacts(child.info.run_id, "images")}
        keys = ("cam_grid", "roc_pr") + (("cam_before_after",) if k == "1" else ())
        assert sorted(_image_steps(images)) == sorted((key, 0) for key in keys), images
        tables = {a.path for a in client.list_artifacts(child.info.run_id, "predictions")}
        assert tables == {f"predictions/{s}.json" for s in ("val", "test", "test_cf")}, tables
        got = client.download_artifacts(child.info.run_id, "predictions/test.json", str(tmp_path))
        table = json.loads(Path(got).read_text())  # MLflow's table JSON: columns, rows
        assert table["columns"] == ["path", "label", "prob_pneumonia"] and len(table["data"]) == 64
        if child.data.tags["cycle"] == "1":
            assert (
                "pictures/cam_before_after.png" in pictures and "pictures/samples.png" in pictures
            )
            assert {a.path for a in client.list_artifacts(child.info.run_id, "shards")} == {
                "shards/manifest.json"
            }
    # ... and the job run each architecture's CAM grids with the cycle as the step, once each.
    images = {a.path for a in client.list_artifacts(parent.info.run_id, "images")}
    assert sorted(_image_steps(images)) == [
        ("cam_by_cycle_tinyvgg", 0),
        ("cam_by_cycle_tinyvgg", 1),
    ]
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "report.md",
        "config.yaml",
        "records.json",
        "cycle_curves.png",
    } <= top  # MLflow 3 keeps models apart
    version = client.get_model_version_by_alias("cycle-classifier", "best")
    assert version.run_id == parent.info.run_id
    # What the UI shows: a model-training experiment, readable run names, the result table and
    # a link to the comparison on the job run.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert sorted(r.info.run_name for r in children) == ["cycle 0 · tinyvgg", "cycle 1 · tinyvgg"]
    note = parent.data.tags["mlflow.note.content"]
    assert "| tinyvgg | 1 |" in note and "#/compare-runs?runs=" in note
    assert all(r.info.run_id in note for r in children)

    # Resuming the finished run reopens its MLflow run and registers no new version.
    again = _run(
        [
            "--set",
            f"output_dir={out}",
            "--set",
            f"tracking.uri=sqlite:///{db}",
            "--resume",
            "smoke",
        ],
        out,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    versions = client.search_model_versions("name='cycle-classifier'")
    assert [v.version for v in versions] == [version.version]
    assert client.get_model_version_by_alias("cycle-classifier", "best").version == version.version
    images = {a.path for a in client.list_artifacts(parent.info.run_id, "images")}
    assert sorted(_image_steps(images)) == [
        ("cam_by_cycle_tinyvgg", 0),
        ("cam_by_cycle_tinyvgg", 1),
    ]


def _image_steps(paths) -> list[tuple[str, int]]:
    """(key, step) of each image MLflow keeps under images/ (`<key>+step+<step>+...`): the full
    picture, its thumbnail and their metadata share one (key, step)."""
    found = set()
    for path in paths:
        key, _, rest = path.removeprefix("images/").partition("+step+")
        step, _, stamp = rest.partition("+timestamp+")
        found.add((key, int(step), stamp.split("+")[0]))
    return [(key, step) for key, step, _ in found]


@pytest.mark.ray
@pytest.mark.slow
def test_every_cycle_s_weights_load_back_from_mlflow(smoke_run, tmp_path):
    """Not only the registered winner: cycle 0's weights (not registered) load back from its own
    MLflow run, for any batch size, and give the checkpoint's logits."""
    import mlflow
    import mlflow.pytorch
    import torch

    from cycle.checkpoint import load_classifier

    out, db, _ = smoke_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cycle-smoke")
    (loser,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'cycle 0 · tinyvgg'"
    )
    winner = client.get_model_version_by_alias("cycle-classifier", "best")
    assert json.loads((out / "smoke" / "registered.json").read_text())["cycle"] == 1  # not cycle 0

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    logged = mlflow.pytorch.load_model(f"runs:/{loser.info.run_id}/model")
    model, pre = load_classifier(out / "smoke" / "cycle_0" / "tinyvgg" / "train" / "best.pt")
    films = torch.randn(3, 1, pre.size, pre.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logged(films), model(films), rtol=0, atol=1e-5)
    assert winner.run_id != loser.info.run_id

    # By name, with nothing else at hand: the architecture, geometry and weights come with the
    # logged model (the run's model URI, and the registry's alias and version).
    by_run, _ = load_classifier(f"runs:/{loser.info.run_id}/model", tracking_uri=f"sqlite:///{db}")
    # Looked up in the given store's own registry, and the process's MLflow URIs left as they
    # were: a registry URI changed here once sent later tests' clients to this store.
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    mlflow.set_registry_uri(elsewhere)
    by_alias, pre_by_alias = load_classifier(
        "models:/cycle-classifier@best", tracking_uri=f"sqlite:///{db}"
    )
    by_version, _ = load_classifier(
        f"models:/cycle-classifier/{winner.version}", tracking_uri=f"sqlite:///{db}"
    )
    assert (mlflow.get_registry_uri(), mlflow.get_tracking_uri()) == (elsewhere, f"sqlite:///{db}")
    best, _ = load_classifier(out / "smoke" / "cycle_1" / "tinyvgg" / "train" / "best.pt")
    with torch.no_grad():
        torch.testing.assert_close(by_run(films), model(films), rtol=0, atol=0)
        torch.testing.assert_close(by_alias(films), best(films), rtol=0, atol=0)
        torch.testing.assert_close(by_version(films), best(films), rtol=0, atol=0)
    assert pre_by_alias == pre
    with pytest.raises(FileNotFoundError, match="cycle-classifier@nope"):
        load_classifier("models:/cycle-classifier@nope", tracking_uri=f"sqlite:///{db}")


def test_explain_takes_the_registered_model_by_name(smoke_run, tmp_path):
    """The README's `python jobs/explain.py --model models:/cycle-classifier@best films/`, from
    the folder the job logged from (its ./mlflow.db): no checkpoint path, nothing but the name."""
    out, _, _ = smoke_run
    films = tmp_path / "films"
    films.mkdir()
    for film in sorted((out / "phantoms" / "chest_xray" / "test" / "PNEUMONIA").iterdir())[:3]:
        (films / film.name).write_bytes(film.read_bytes())
    explained = tmp_path / "explained"
    args = ["--model", "models:/cycle-classifier@best", str(films), "--out", str(explained)]
    proc = run_job("explain.py", args, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((explained / "overlays").glob("*.png"))) == 3
    assert "3 explained, 0 skipped" in proc.stderr


def bars_by_colour(driver) -> dict[tuple[int, ...], tuple[list[str], list[str]]]:
    """colour -> (the run ids the runs table draws in it, the labels of the bars drawn in it): the
    runs table gives each run a colour (and links its id), the bar chart draws each run's bar in
    that colour. MLflow picks a run's colour from a palette by its id, so two runs can share one."""
    import re

    from selenium.webdriver.common.by import By

    def rgb(css: str) -> tuple[int, ...]:
        return tuple(int(float(x)) for x in re.findall(r"[\d.]+", css)[:3])

    colours: dict[tuple[int, ...], tuple[list[str], list[str]]] = {}
    for label in driver.find_elements(
        By.CSS_SELECTOR, '[data-testid="experiment-view-table-run-color"]'
    ):
        link = label.find_element(By.XPATH, "following-sibling::a").get_attribute("href")
        colour = rgb(label.value_of_css_property("background-color"))
        colours.setdefault(colour, ([], []))[0].append(link.rsplit("/", 1)[-1])
    for bar in driver.find_elements(By.CSS_SELECTOR, "g.point"):
        colour = rgb(bar.find_element(By.TAG_NAME, "path").value_of_css_property("fill"))
        text = bar.find_element(By.CSS_SELECTOR, "text.bartext").get_attribute("data-unformatted")
        colours.setdefault(colour, ([], []))[1].append(text)
    return colours


@pytest.mark.ray
@pytest.mark.slow
def test_the_mlflow_ui_shows_the_job_in_a_real_browser(smoke_run, tmp_path):
    """`mlflow ui` on loopback, the system Chromium headless: the training runs page lists the
    job's run, its (cycle, arch) runs and a metric's value. CI installs Chromium (.ci/run);
    elsewhere a machine without it skips this test, saying how to install it."""
    import mlflow

    from cycle.mlflow_ui import (
        BrowserMissing,
        find_browser,
        headless_chromium,
        local_ui,
        show_comparison,
        show_images,
    )

    try:
        find_browser()
    except BrowserMissing as err:
        if os.environ.get("CYCLE_REQUIRE_BROWSER"):
            raise
        pytest.skip(str(err))
    from conftest import free_port

    out, db, _ = smoke_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cycle-smoke")
    children = client.search_runs([experiment.experiment_id], "attributes.run_name LIKE 'cycle %'")
    values = {r.info.run_id: f"{r.data.metrics['test_cf_accuracy']:.2f}" for r in children}
    names = ["smoke", "cycle 0 · tinyvgg", "cycle 1 · tinyvgg"]
    with local_ui(f"sqlite:///{db}", free_port()) as base, headless_chromium() as driver:
        page = show_comparison(driver, base, experiment.experiment_id, names, "test_cf_accuracy")
        assert "workflowType=machine_learning" in driver.current_url  # training runs, not GenAI
        shown = bars_by_colour(driver)
        with headless_chromium() as fresh:  # as a person opens it: nothing expanded yet
            # The image view: tinyvgg's CAM grid of each cycle, loaded, in one card.
            pictured = show_images(fresh, base, experiment.experiment_id, "tinyvgg")
    assert pictured == sorted(values), (pictured, values)
    assert all(name in page for name in names)
    # As a person reads the chart: one bar per (cycle, arch) run, in the run's colour, labelled
    # with that run's own value (runs that happen to share a colour: their values, in any order).
    assert len(values) == 2 and sum(len(bars) for _, bars in shown.values()) == 2, shown
    for colour, (runs, bars) in shown.items():
        assert sorted(bars) == sorted(values[r] for r in runs if r in values), (colour, shown)

    # The README's screenshot command (of the image view), on this store.
    picture = tmp_path / "images.png"
    shot = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "mlflow_screenshot.py"),
            "--store",
            f"sqlite:///{db}",
            "--experiment",
            "cycle-smoke",
            "--out",
            str(picture),
            "--images",
            "tinyvgg",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert shot.returncode == 0, shot.stderr[-3000:]
    assert "CAM grids of 2 tinyvgg run(s)" in shot.stdout
    assert picture.stat().st_size > 20_000 and picture.read_bytes()[:4] == b"\x89PNG"


def _numbers(results: dict) -> dict:
    return {
        (arch, k, key): v
        for arch, cycles in results.items()
        for k, m in enumerate(cycles)
        for key, v in m.items()
        if isinstance(v, (int, float))
    }


def _epochs_run(run_dir: Path) -> dict[str, list[int]]:
    """Epochs executed per training stage, from the append-only log (history.json is rebuilt
    from the checkpoint, so it cannot tell a resume from a restart)."""
    return {
        str(log.parent.relative_to(run_dir)): [
            int(line.split()[0]) for line in log.read_text().split("\n") if line
        ]
        for log in sorted(run_dir.glob("cycle_*/*/train/epochs.log"))
    }


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_killed_anywhere_or_cut_off_from_mlflow_resumes_to_the_uninterrupted_answer(
    smoke_run, smoke_assets, tmp_path, s3
):
    """One job, interrupted every way we know, in the order a run meets them, each resumed
    process going on to the next: killed mid-epoch (the 7th step: epoch 2 of the baseline), with
    localisation measured but the stage not marked, with a shard file written (the build
    unfinished); then its MLflow server stops once the baseline is logged and cycle 1 is under
    way: training goes on, the job says what it could not log and exits 1; with the server back,
    killed with cycle 1's run half logged, then with a model version registered but not recorded.
    The last resume ends with the answer of the uninterrupted smoke run, nothing run twice, one
    run per (cycle, arch) and one model version; a resume after that does nothing, and damaged
    files are redone.

    Started as users start it: from a folder that is not the repo, with a relative output_dir.
    (The default's shape, two architectures side by side on Ray Train workers that each run in a
    folder of their own, under a relative output_dir, is what `.ci/run` runs as the README's main
    command and checks; `ray job submit` and the multi-node tests run it on clusters.)"""
    import mlflow
    from conftest import free_port, start_mlflow_server, stop

    out, _, _ = smoke_run
    reference = json.loads((out / "smoke" / "results.json").read_text())["results"]
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    run_dir = elsewhere / "rel" / "out" / "killed"
    port = free_port()
    root, server_log = tmp_path / "mlflow-server", tmp_path / "mlflow.log"
    # The models and pictures go to S3 (the suite's moto server), as on a cluster.
    bucket = s3("mlflow")
    artifacts = f"s3://{bucket}/artifacts"
    server = start_mlflow_server(root, port, server_log, artifacts)
    uri = f"http://127.0.0.1:{port}"
    common = [*smoke_assets, "--set", "output_dir=rel/out", "--set", f"tracking.uri={uri}"]
    resume = common + ["--resume", "killed"]

    def killed_at(point: str, args: list[str]) -> str:
        proc = _run(args, elsewhere, env={"CYCLE_KILL_AT": point})
        said = proc.stdout + proc.stderr
        assert proc.returncode == -signal.SIGKILL, f"{point} not reached:\n{said[-3000:]}"
        return said

    try:
        _held_in_training_with_its_curve_in_mlflow(
            JOB + common + ["--run-name", "killed"], elsewhere, run_dir, uri, tmp_path
        )
        said = killed_at("evaluate", resume)
        assert "resuming after epoch 1 from the local checkpoint" in said
        killed_at("shards:part@2", resume)

        # The outage: the server stops after the baseline is logged, while cycle 1 is under way.
        job = subprocess.Popen(
            JOB + resume, cwd=elsewhere, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        baseline_logged = run_dir / "cycle_0" / "tinyvgg" / "evaluate" / "mlflow_run.json"
        assert json.loads(baseline_logged.read_text())["complete"]
        shards_done = run_dir / "cycle_1" / "tinyvgg" / "shards" / "DONE"
        deadline = time.time() + 400
        while not shards_done.is_file() and time.time() < deadline:
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.2)
        stop(server)
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 1, stderr[-3000:]
        assert "MLflow" in stderr and "stopped answering" in stderr and "--resume killed" in stderr
        assert (run_dir / "results.json").is_file()  # training finished all the same
        assert "| tinyvgg | 1 |" in stdout

        server = start_mlflow_server(root, port, server_log, artifacts)  # the same store, back
        said = killed_at("track", resume)
        assert "training" not in said  # nothing trained again: only logged
        killed_at("register", resume)

        proc = _run(resume, elsewhere)
        assert proc.returncode == 0, proc.stderr[-4000:]
        resumed = json.loads((run_dir / "results.json").read_text())["results"]
        # Every cycle, not only the interrupted stages: the same seed gives the same answer.
        assert _numbers(resumed) == pytest.approx(_numbers(reference), abs=1e-6, nan_ok=True)
        # Nothing ran twice: a restart from scratch would log epoch 1 again.
        for stage, epochs in _epochs_run(run_dir).items():
            assert epochs == sorted(set(epochs)) and epochs[0] == 1, (stage, epochs)

        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("cycle-smoke").experiment_id])
        parents = [r for r in runs if r.data.tags.get("job") == "cycle"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert len(parents) == 1 and sorted(r.data.tags["cycle"] for r in children) == ["0", "1"]
        assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 3
        assert all("test_accuracy" in r.data.metrics for r in children)
        assert len(client.search_model_versions("name='cycle-classifier'")) == 1
        # The registered model's files are in the bucket, and load back by name through the server.
        from cycle.checkpoint import load_classifier
        from cycle.model_refs import CHECKPOINT_FILE, checkpoint_into

        stored = s3.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        assert any(o["Key"].endswith(CHECKPOINT_FILE) for o in stored), [o["Key"] for o in stored]

        weights = checkpoint_into("models:/cycle-classifier@best", tmp_path / "from-s3", uri)
        load_classifier(weights)

        # Everything done: nothing re-runs, and no Ray is started for nothing.
        idle_ray = tmp_path / "ray-of-the-no-op"
        idle_ray.mkdir()
        again = _run(resume, elsewhere, env={"RAY_TMPDIR": str(idle_ray)})
        assert again.returncode == 0 and "training" not in again.stderr, again.stderr[-3000:]
        assert not list(idle_ray.iterdir()), "a resume with nothing to do started Ray"
        _damaged_files_are_redone(run_dir, resume, elsewhere, reference)
    finally:
        stop(server)


def _held_in_training_with_its_curve_in_mlflow(
    command: list[str], cwd: Path, run_dir: Path, uri: str, tmp_path: Path
) -> None:
    """Held at the baseline's 7th step (epoch 2), the job's (cycle 0, tinyvgg) run is already in
    MLflow with epoch 1's metrics (live curves), read while the stage is still training; then the
    job is killed there (the chain's first interruption: mid-epoch)."""
    import mlflow

    held = tmp_path / "held-at-step-7"
    env = {**os.environ, "CYCLE_HOLD_AT": "train:step@7", "CYCLE_HOLD_FILE": str(held)}
    with open(tmp_path / "held-job.log", "w") as said:
        job = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=said, stderr=said, start_new_session=True
        )
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        deadline, curve = time.time() + 300, []
        while not curve:
            assert job.poll() is None, (tmp_path / "held-job.log").read_text()[-3000:]
            assert time.time() < deadline, "no epoch metric reached MLflow during training"
            time.sleep(0.5)
            experiment = client.get_experiment_by_name("cycle-smoke")
            runs = experiment and client.search_runs(
                [experiment.experiment_id], "tags.cycle = '0' and tags.arch = 'tinyvgg'"
            )
            if runs:
                curve = client.get_metric_history(runs[0].info.run_id, "val_accuracy")
        assert not (run_dir / "cycle_0" / "tinyvgg" / "train" / "DONE").exists()
        assert [point.step for point in curve] == [1] and runs[0].info.status == "RUNNING"
        deadline = time.time() + 300
        while not held.is_file():  # then killed mid-epoch 2, as before
            assert job.poll() is None and time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def _damaged_files_are_redone(run_dir: Path, resume: list[str], cwd: Path, reference: dict):
    """Truncated outputs of finished stages (and a damaged shard file and records.json) make those
    stages redo themselves with a message, never a traceback, to the same answer."""

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    truncate(run_dir / "records.json")
    truncate(run_dir / "cycle_0" / "tinyvgg" / "train" / "best.pt")
    truncate(next((run_dir / "cycle_1" / "tinyvgg" / "shards" / "data").glob("*.parquet")))
    truncate(run_dir / "cycle_1" / "tinyvgg" / "train" / "last.pt")
    (
        run_dir / "cycle_1" / "tinyvgg" / "train" / "DONE"
    ).unlink()  # an unfinished stage with a broken last.pt
    proc = _run(resume, cwd)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in said, said[-4000:]
    assert "records.json is unreadable" in said
    assert "cycle_0/tinyvgg/train: " in said and "redoing this stage" in said
    assert "cycle_1/tinyvgg/shards: " in said
    assert "last.pt is unreadable" in said and "starting this stage over" in said
    resumed = json.loads((run_dir / "results.json").read_text())["results"]
    assert _numbers(resumed) == pytest.approx(_numbers(reference), abs=1e-6, nan_ok=True)


def _stopped_before_any_work(proc, out_dir: Path) -> None:
    """Fail fast means before the expensive work, not within some number of seconds (a loaded
    machine can take any time to import): no Ray started, no phantom made, nothing trained."""
    said = proc.stdout + proc.stderr
    assert "Ray instance" not in said and "RayTrainWorker" not in said, said[-2000:]
    assert not (out_dir / "phantoms").exists()
    assert not list(out_dir.rglob("best.pt")) and not list(out_dir.rglob("*.parquet"))


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--set", "train.lrr=1"], {}, "train.lrr: unknown key"),
        (["--set", "data.root=/no/such/chest_xray"], {}, "does not exist"),
        (["--set", "output_dir={tmp}/file.txt/out"], {}, "not writable"),
        ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "not reachable"),
        (["--resume", "never-ran"], {}, "nothing to resume"),
    ],
)
def test_mistakes_fail_fast_with_a_clear_message(tmp_path, args, env, message):
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a.startswith("output_dir=") for a in args):
        args += ["--set", f"output_dir={tmp_path}"]
    proc = _run(args, tmp_path, timeout=300, env=env)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    _stopped_before_any_work(proc, tmp_path)


@pytest.mark.parametrize("how", ["--run-name", "--resume"])
def test_a_run_with_another_config_is_refused_in_seconds(tmp_path, how):
    from cycle.config import load_config
    from cycle.run_config import record_run_config

    cfg = load_config(
        ROOT / "configs" / "smoke.yaml", [f"output_dir={tmp_path}"]
    ).with_absolute_paths()
    record_run_config(tmp_path / "earlier", cfg)
    proc = _run(
        ["--set", f"output_dir={tmp_path}", "--set", "train.lr=0.5", how, "earlier"],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "was made with another config" in proc.stderr and "train.lr: 0.001 -> 0.5" in proc.stderr
    _stopped_before_any_work(proc, tmp_path)


def test_real_data_without_a_lung_model_fails_fast(tmp_path):
    (tmp_path / "chest_xray" / "train").mkdir(parents=True)
    proc = _run(
        ["--set", f"output_dir={tmp_path}", "--set", f"data.root={tmp_path / 'chest_xray'}"],
        tmp_path,
        timeout=60,
    )
    assert proc.returncode != 0 and "train_lungseg.py" in proc.stderr


@pytest.mark.slow
def test_the_cycle_runs_without_ray_or_mlflow_in_process(smoke_assets, tmp_path):
    """A single GPU box without Ray: in-process training and shards, tracking off. `import ray`
    and `import mlflow` are made to fail, so any hidden dependency shows."""
    blocker = (
        "import runpy, sys; sys.modules['ray'] = None; sys.modules['mlflow'] = None; "
        f"sys.argv = sys.argv[1:]; sys.path.insert(0, {str(ROOT / 'jobs')!r}); "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            blocker,
            str(ROOT / "jobs" / "cycle.py"),
            "--config",
            str(ROOT / "configs" / "smoke.yaml"),
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "tracking.enabled=false",
            "--set",
            "resources.num_workers=0",
            *smoke_assets,
            "--inprocess-shards",
            "--run-name",
            "noray",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| tinyvgg | 1 |" in proc.stdout
    assert (
        tmp_path / "noray" / "cycle_1" / "tinyvgg" / "shards" / "data" / "manifest.json"
    ).is_file()
