import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cycle import plots
from cycle.checkpoint import load_classifier, save_classifier
from cycle.config import load_config
from cycle.explain import cam_on_film
from cycle.lungseg.masks import save_lung_model
from cycle.models import build_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def checkpoint(tmp_path):
    cfg = load_config(None, ["model.arch=tinyvgg", "data.image_size=48"])
    torch.manual_seed(0)
    model = build_model("tinyvgg", image_size=48)
    return save_classifier(tmp_path / "best.pt", model, cfg, epoch=1)


def whole_film_unet():
    """A lung U-Net that calls every pixel lung, whatever the film: its output convolutions say
    class 1 from their biases alone."""
    from cycle.lungseg.unet import build_unet

    unet = build_unet()
    with torch.no_grad():
        for layer in unet.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                if layer.out_channels == 2:
                    layer.weight.zero_()
                    layer.bias.copy_(torch.tensor([-10.0, 10.0]))
    return unet


def test_checkpoint_round_trip(checkpoint):
    model, preprocess = load_classifier(checkpoint)
    assert model.arch == "tinyvgg" and not model.training
    assert preprocess.size == 48


def test_explain_job_on_a_mixed_folder_with_a_broken_file(tmp_path, checkpoint):
    folder = tmp_path / "xrays"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 220), dtype=np.uint8)).save(folder / "gray.jpeg")
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / "rgb.JPG")
    Image.fromarray(rng.integers(0, 255, (90, 90), dtype=np.uint8)).save(
        folder / "sub" / "small.png"
    )
    Image.fromarray((rng.integers(0, 4000, (64, 80))).astype(np.uint16)).save(folder / "deep16.png")
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff not really")
    (folder / ".hidden.png").write_bytes(b"")
    out = tmp_path / "out"
    save_lung_model(tmp_path / "unet.pt", whole_film_unet(), image_size=32)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "explain.py"),
            "--model",
            str(checkpoint),
            str(folder),
            str(tmp_path / "missing.png"),
            "--out",
            str(out),
            "--lung-model",
            str(tmp_path / "unet.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(Path(r["path"]).name for r in rows) == [
        "deep16.png",
        "gray.jpeg",
        "rgb.JPG",
        "small.png",
    ]
    for row in rows:
        assert row["predicted"] in ("NORMAL", "PNEUMONIA")
        assert 0.5 <= float(row["probability"]) <= 1.0
        # The lung model calls the whole film lung: all of the CAM's mass is inside.
        assert float(row["lung_energy_share"]) == pytest.approx(1.0), row
        overlay = cv2.imread(row["overlay"])
        source = Image.open(row["path"])
        assert overlay is not None and overlay.shape[1] / overlay.shape[0] == pytest.approx(
            source.size[0] / source.size[1], rel=0.02
        )
    assert "broken.jpeg" in proc.stderr and "missing.png" in proc.stderr
    skipped = (out / "skipped.csv").read_text()
    assert "broken.jpeg" in skipped and "no such file" in skipped


def test_explain_job_with_a_bad_checkpoint(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "explain.py"),
            "--model",
            str(tmp_path / "x.pt"),
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "meta" in proc.stderr


def test_explain_job_with_a_depth_the_architecture_lacks(tmp_path, checkpoint):
    Image.fromarray(np.full((80, 80), 100, np.uint8)).save(tmp_path / "film.png")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "explain.py"),
            "--model",
            str(checkpoint),
            str(tmp_path / "film.png"),
            "--out",
            str(tmp_path / "o"),
            "--depth",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "out of range: this model has 2 feature blocks, so use 0 to 1" in proc.stderr


def test_cam_maps_back_onto_the_whole_film(checkpoint):
    _, preprocess = load_classifier(checkpoint)
    cam = np.zeros((48, 48), np.float32)
    cam[:, :24] = 1.0  # left half of the crop
    film = cam_on_film(cam, (300, 200), preprocess)
    assert film.shape == (300, 200)
    assert film[150, 60] > 0.9 and film[150, 140] < 0.1
    assert film[2, 2] == 0 and film[297, 100] == 0  # outside the crop


def _is_png(path):
    image = cv2.imread(str(path))
    return image is not None and image.shape[0] > 50 and image.shape[1] > 50


def test_pictures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    images, cams = rng.random((6, 32, 32)), rng.random((6, 32, 32))
    probs, labels = np.array([0.95, 0.2, 0.6, 0.05, 0.7, 0.4]), np.array([1, 0, 0, 0, 1, 1])
    assert _is_png(plots.cam_grid(images, cams, probs, labels, tmp_path / "grid.png", title="t"))
    assert _is_png(
        plots.before_after_grid(
            images[:3], cams[:3], cams[3:], tmp_path / "ba.png", labels[:3], lungs=images[:3] > 0.5
        )
    )
    assert _is_png(plots.confusion_matrix_plot([[5, 1], [2, 7]], tmp_path / "cm.png", title="test"))
    per_cycle = {
        "tinyvgg": [{"acc": 0.9, "acc_ci_low": 0.85, "acc_ci_high": 0.95}, {"acc": 0.92}],
        "resnet18": [{"acc": 0.8}, {"acc": 0.85}],
    }
    assert _is_png(plots.cycle_curves(per_cycle, ["acc"], tmp_path / "curves.png"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_enhanced_samples_sheet_wraps_to_a_readable_grid(tmp_path):
    """Nine films once came out as one 2,352 x 232 strip: the sheet now stays about square."""
    import cv2

    from cycle.plots import enhanced_grid

    for n in (9, 49):
        films = np.random.default_rng(n).random((n, 110, 110)).astype(np.float32)
        sheet = cv2.imread(str(enhanced_grid(films, films, films, tmp_path / f"s{n}.png")))
        height, width = sheet.shape[:2]
        assert 0.6 <= height / width <= 1.6, (n, sheet.shape)
