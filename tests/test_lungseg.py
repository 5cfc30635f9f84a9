import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cycle.lungseg.train as lungseg_train
from cycle.config import load_config
from cycle.lungseg.data import LungDataError, find_pairs, load_film, load_pair
from cycle.lungseg.masks import dice_iou, fill_holes, postprocess, predict
from cycle.lungseg.train import LAST, LungModelMissing, ensure_lung_model, train_lungseg
from cycle.lungseg.unet import build_unet

ROOT = Path(__file__).resolve().parent.parent


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _halves(h=64, w=64):
    left = np.zeros((h, w), np.uint8)
    left[h * 10 // 64 : h * 50 // 64, w * 5 // 64 : w * 28 // 64] = 255
    right = np.zeros((h, w), np.uint8)
    right[h * 10 // 64 : h * 50 // 64, w * 36 // 64 : w * 60 // 64] = 255
    return left, right


def test_montgomery_masks_are_merged_and_unmatched_films_skipped(tmp_path):
    root = tmp_path / "MontgomerySet"
    left, right = _halves()
    film = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    for name in ("MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0"):
        _save(root / "CXR_png" / f"{name}.png", film)
        _save(root / "ManualMask" / "leftMask" / f"{name}.png", left)
        _save(root / "ManualMask" / "rightMask" / f"{name}.png", right)
    _save(root / "CXR_png" / "MCUCXR_0009_0.png", film)
    _save(root / "ManualMask" / "leftMask" / "MCUCXR_0009_0.png", left)
    layout, pairs, skipped = find_pairs(root)
    assert layout == "montgomery" and len(pairs) == 3
    assert [(Path(s.path).name, s.reason) for s in skipped] == [
        ("MCUCXR_0009_0.png", "no right lung mask")
    ]
    _, mask = load_pair(pairs[0])
    np.testing.assert_array_equal(mask, (left > 0) | (right > 0))
    assert {p.split for p in pairs} == {"train", "val", "test"}


def test_shenzhen_style_pairs_match_by_stem(tmp_path):
    root = tmp_path / "Lung Segmentation"
    left, right = _halves()
    film = np.full((64, 64), 90, np.uint8)
    for i in range(4):
        _save(root / "CXR_png" / f"CHNCXR_000{i}_0.png", film)
        _save(root / "masks" / f"CHNCXR_000{i}_0_mask.png", left | right)
    _save(root / "CXR_png" / "CHNCXR_0100_1.png", film)
    _save(root / "masks" / "CHNCXR_0200_1_mask.png", left)
    layout, pairs, skipped = find_pairs(root)
    assert layout == "pairs" and len(pairs) == 4
    assert sorted(s.reason for s in skipped) == [
        "mask without an image",
        "no mask with this file name",
    ]


def test_jsrt_raw_film_with_scr_masks_of_another_size(tmp_path):
    root = tmp_path / "jsrt"
    raw = np.zeros((2048, 2048), ">u2")
    raw[:1024] = 4095  # maximal optical density: black once inverted
    (root / "images").mkdir(parents=True)
    raw.tofile(root / "images" / "JPCLN001.IMG")
    (root / "images" / "JPCLN002.IMG").write_bytes(b"\0" * 100)  # truncated raw file
    left, right = _halves(1024, 1024)
    for stem in ("JPCLN001", "JPCLN002"):
        _save(root / "scr" / "masks" / "left lung" / f"{stem}.gif", left)
        _save(root / "scr" / "masks" / "right lung" / f"{stem}.gif", right)
    layout, pairs, skipped = find_pairs(root)
    assert layout == "jsrt" and len(pairs) == 2 and not skipped
    film = load_film(root / "images" / "JPCLN001.IMG")
    assert film.shape == (2048, 2048) and film[:1024].max() == 0 and film[1024:].min() == 255
    good = next(p for p in pairs if "JPCLN001" in p.image)
    _, mask = load_pair(good)
    assert mask.shape == (2048, 2048) and 0.1 < mask.mean() < 0.5
    bad = next(p for p in pairs if "JPCLN002" in p.image)
    with pytest.raises(Exception, match="not a JSRT raw film"):
        load_pair(bad)


def test_phantom_layout_splits_by_patient(phantom_root):
    layout, pairs, skipped = find_pairs(phantom_root.parent, val_fraction=0.25)
    assert layout == "phantom" and not skipped
    by_split = {s: {p.group for p in pairs if p.split == s} for s in ("train", "val", "test")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])


def test_unknown_layout_is_explained(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(LungDataError, match="no lung-mask layout recognised"):
        find_pairs(tmp_path)


def test_postprocess_keeps_two_lungs_and_fills_holes():
    mask = np.zeros((60, 60), bool)
    mask[10:50, 5:25] = True  # left lung
    mask[10:45, 35:55] = True  # right lung
    mask[20:25, 10:15] = False  # a hole (dense opacity)
    mask[2:4, 2:4] = True  # a speck in the void
    mask[52:56, 28:34] = True  # a third, smaller blob
    clean = postprocess(mask)
    expected = np.zeros((60, 60), bool)
    expected[10:50, 5:25] = True
    expected[10:45, 35:55] = True
    np.testing.assert_array_equal(clean, expected)
    assert postprocess(np.zeros((8, 8), bool)).sum() == 0
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    assert fill_holes(ring)[4, 4]


def test_predict_returns_masks_of_each_films_size():
    torch.manual_seed(0)
    model = build_unet()
    model.image_size = 32
    films = [
        np.random.default_rng(i).integers(0, 255, shape, dtype=np.uint8)
        for i, shape in enumerate([(100, 80), (300, 260), (32, 32)])
    ]
    masks = predict(model, films, batch_size=2)
    assert [m.shape for m in masks] == [(100, 80), (300, 260), (32, 32)]
    assert all(m.dtype == bool for m in masks)


def test_dice_iou():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(a & False, b & False) == (1.0, 1.0)


def _small_cfg(tmp_path, *more):
    return load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "lungseg.image_size=32",
            "lungseg.epochs=2",
            "lungseg.batch_size=8",
            "tracking.enabled=false",
            *more,
        ],
    )


def test_training_resumes_after_a_crash(tmp_path, phantom_root, monkeypatch):
    _, pairs, _ = find_pairs(phantom_root.parent, 0.25)
    cfg = _small_cfg(tmp_path)
    straight = train_lungseg(cfg, pairs, tmp_path / "straight", log=lambda *_: None)
    assert 0.0 <= straight["test_dice"] <= 1.0 and straight["n_test"] > 0

    real = lungseg_train._val_scores
    calls = {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(lungseg_train, "_val_scores", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        train_lungseg(cfg, pairs, tmp_path / "resumed", log=lambda *_: None)
    monkeypatch.setattr(lungseg_train, "_val_scores", real)
    lines = []
    resumed = train_lungseg(cfg, pairs, tmp_path / "resumed", log=lines.append)
    assert any("resuming after epoch 1" in line for line in lines)
    a = torch.load(tmp_path / "straight" / LAST, weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / LAST, weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert resumed["test_dice"] == pytest.approx(straight["test_dice"], abs=1e-6)
    assert (tmp_path / "resumed" / "masks_pred_vs_true.png").is_file()


def test_real_data_without_a_lung_model_refuses_with_instructions(tmp_path):
    cfg = _small_cfg(tmp_path, "data.root=/data/chest_xray")
    with pytest.raises(LungModelMissing, match="train_lungseg.py"):
        ensure_lung_model(cfg)
    with pytest.raises(LungModelMissing, match="does not exist"):
        ensure_lung_model(_small_cfg(tmp_path, f"lungseg.weights={tmp_path / 'nope.pt'}"))


def test_phantom_lung_model_is_trained_once_and_reused(tmp_path, phantom_root):
    cfg = _small_cfg(
        tmp_path,
        f"data.phantom.out_dir={phantom_root.parent}",
        "lungseg.epochs=1",
        "data.phantom.size=96",
        "data.phantom.seed=5",
        "data.phantom.n_train=48",
        "data.phantom.n_val=8",
        "data.phantom.n_test=16",
        "data.phantom.n_test_cf=16",
    )
    lines = []
    first = ensure_lung_model(cfg, log=lines.append)
    assert first.is_file() and any("training one" in line for line in lines)
    lines.clear()
    assert ensure_lung_model(cfg, log=lines.append) == first and not lines


def test_train_lungseg_job_logs_to_mlflow(tmp_path, phantom_root):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "train_lungseg.py"),
            "--data",
            str(phantom_root.parent),
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "lungseg.image_size=32",
            "--set",
            "lungseg.epochs=1",
            "--set",
            f"tracking.uri=sqlite:///{db}",
            "--run-name",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test Dice" in proc.stdout
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("cycle").experiment_id])[0]
    assert run.data.tags["stage"] == "lungseg" and "val_dice" in run.data.metrics
    assert run.data.params["lungseg.image_size"] == "32"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "masks_pred_vs_true.png" in artifacts and "weights" in artifacts
