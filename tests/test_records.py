import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cycle.data.records as records_module
from cycle.data.records import (
    DataError,
    Record,
    extract_zip,
    find_dataset_root,
    load_dataset,
    patient_id,
    patient_overlap,
    scan,
    split_by_patient,
)
from cycle.data.transforms import ImageLoadError, load_grayscale

ROOT = Path(__file__).resolve().parent.parent


def _jpeg_bytes(size=(64, 48), mode="L", color=128) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    arr = rng.integers(
        0, 255, size=(size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8
    )
    Image.fromarray(arr, mode=None).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def messy_tree(tmp_path) -> Path:
    """A Kaggle-like tree with good files and every kind of bad one."""
    root = tmp_path / "chest_xray"
    good = {
        "train/NORMAL/IM-0115-0001.jpeg": _jpeg_bytes(),
        "train/NORMAL/IM-0115-0002.JPG": _jpeg_bytes(),
        "train/NORMAL/NORMAL2-IM-1440-0001.jpeg": _jpeg_bytes(),
        "train/PNEUMONIA/person1946_bacteria_4874.jpeg": _jpeg_bytes(mode="RGB"),
        "train/PNEUMONIA/person1946_bacteria_4875.jpeg": _jpeg_bytes(),
        "Val/Normal/IM-0200-0001.jpeg": _jpeg_bytes(),
        "test/PNEUMONIA/person7_virus_12.jpeg": _jpeg_bytes(),
        "test/NORMAL/IM-0300-0001.jpeg": _jpeg_bytes(),
    }
    for rel, data in good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    _png(
        root / "train/PNEUMONIA/person8_virus_1.png",
        (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16),
    )
    bad = root / "train" / "PNEUMONIA"
    (bad / "empty.jpeg").write_bytes(b"")
    (bad / "notes.jpeg").write_text("this is not an image")
    (bad / "truncated.jpeg").write_bytes(_jpeg_bytes((256, 256))[:700])
    (bad / "readme.txt").write_text("hello")
    (bad / ".DS_Store").write_bytes(b"\0\1")
    (bad / "._person1946_bacteria_4874.jpeg").write_bytes(b"\0\5\0\0")
    _png(bad / "huge.png", np.zeros((400, 400), np.uint8))
    (root / "train" / "COVID").mkdir()
    (root / "train" / "COVID" / "x.jpeg").write_bytes(_jpeg_bytes())
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "junk.jpeg").write_bytes(b"junk")
    return root


def test_scan_keeps_good_images_and_skips_each_bad_one_with_its_reason(messy_tree):
    result = scan(messy_tree, max_pixels=100_000)
    kept = sorted(Path(r.path).name for r in result.records)
    assert kept == sorted(
        [
            "IM-0115-0001.jpeg",
            "IM-0115-0002.JPG",
            "NORMAL2-IM-1440-0001.jpeg",
            "person1946_bacteria_4874.jpeg",
            "person1946_bacteria_4875.jpeg",
            "IM-0200-0001.jpeg",
            "person7_virus_12.jpeg",
            "IM-0300-0001.jpeg",
            "person8_virus_1.png",
        ]
    )
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert reasons["empty.jpeg"].startswith("empty file")
    assert reasons["notes.jpeg"] == "not a decodable image"
    assert reasons["truncated.jpeg"].startswith("truncated image")
    assert reasons["readme.txt"].startswith("not an image file")
    assert reasons["huge.png"].startswith("too large: 400x400")
    assert reasons["x.jpeg"] == "unknown class folder 'COVID'"
    # Hidden files and macOS forks are ignored, not reported.
    assert not any(name.startswith(".") for name in reasons)
    assert all("__MACOSX" not in s.path for s in result.skipped)


def test_scan_reads_case_insensitive_split_and_class_names(messy_tree):
    result = scan(messy_tree)
    val = [r for r in result.records if r.split == "val"]
    assert len(val) == 1 and val[0].label == 0


def test_rgb_and_16_bit_images_load_as_one_channel_uint8(tmp_path):
    rgb = tmp_path / "rgb.jpeg"
    rgb.write_bytes(_jpeg_bytes(mode="RGB"))
    deep = _png(tmp_path / "deep.png", (np.arange(32 * 40).reshape(32, 40) * 50).astype(np.uint16))
    assert Image.open(deep).mode.startswith("I")
    for path in (rgb, deep):
        arr = load_grayscale(path)
        assert arr.ndim == 2 and arr.dtype == np.uint8
    arr16 = load_grayscale(deep)
    assert arr16.min() == 0 and arr16.max() == 255  # windowed to the film's own range


def test_rgba_transparency_becomes_black(tmp_path):
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[..., :3] = 255
    arr[:8, :, 3] = 255  # top half opaque white, bottom half transparent
    path = _png(tmp_path / "a.png", arr)
    gray = load_grayscale(path)
    assert gray[:8].min() == 255 and gray[8:].max() == 0


def test_unreadable_file_raises_with_reason(tmp_path):
    with pytest.raises(ImageLoadError, match="unreadable"):
        load_grayscale(tmp_path / "missing.png")


def test_scan_cache_remembers_verdicts(messy_tree, tmp_path, monkeypatch):
    """Every image is decoded once; a rescan decodes only files whose size or mtime changed."""
    decoded = []
    real_load = records_module.load_grayscale

    def counting_load(path, *args, **kwargs):
        decoded.append(Path(path).name)  # list.append is atomic: safe from the scan's threads
        return real_load(path, *args, **kwargs)

    # Patch the name scan() calls, i.e. the one imported into cycle.data.records.
    monkeypatch.setattr(records_module, "load_grayscale", counting_load)
    cache = tmp_path / "cache.json"
    first = scan(messy_tree, cache_path=cache)
    assert cache.is_file()
    # Each candidate image exactly once: the kept ones and the ones that failed to decode.
    failed = ["empty.jpeg", "notes.jpeg", "truncated.jpeg"]
    assert sorted(decoded) == sorted([Path(r.path).name for r in first.records] + failed)

    # Unchanged files come from the cache: not decoded at all.
    decoded.clear()
    again = scan(messy_tree, cache_path=cache)
    assert decoded == []
    assert again.records == first.records and again.skipped == first.skipped

    # A changed file (new size; or same size, new mtime) is decoded again, once; the rest are not.
    target = messy_tree / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    target.write_bytes(b"broken now")
    touched = messy_tree / "test" / "NORMAL" / "IM-0300-0001.jpeg"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    decoded.clear()
    second = scan(messy_tree, cache_path=cache)
    assert sorted(decoded) == sorted([target.name, touched.name])
    assert len(second.records) == len(first.records) - 1
    assert any(s.path == str(target) for s in second.skipped)


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person1946_bacteria_4874.jpeg", "PERSON1946"),
        ("person1_virus_6.jpeg", "PERSON1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-1440-0001.jpeg", "NORMAL2-IM-1440"),
        ("im-0115-0002.JPG", "IM-0115"),
        ("scan_2024.png", "SCAN_2024"),
    ],
)
def test_patient_ids_from_kermany_names(name, patient):
    assert patient_id(name) == patient


def _records(n_patients=60, per_patient=3, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        label = int(rng.random() < 0.7)
        for k in range(per_patient - (p % 2)):
            split = "val" if (p == 0 and k == 0) else "train"
            records.append(Record(f"/x/{p}_{k}.jpeg", label, split, f"P{p}"))
    records.append(Record("/x/t.jpeg", 1, "test", "T1"))
    return records


def test_val_is_carved_by_patient_without_leakage():
    records = _records()
    split = split_by_patient(records, val_fraction=0.2, seed=1)
    train_patients = {r.patient for r in split if r.split == "train"}
    val_patients = {r.patient for r in split if r.split == "val"}
    assert train_patients and val_patients and not (train_patients & val_patients)
    assert patient_overlap(split) == {}
    n_pool = sum(r.split in ("train", "val") for r in records)
    n_val = sum(r.split == "val" for r in split)
    assert 0.15 <= n_val / n_pool <= 0.3
    # both classes are represented in val
    assert {r.label for r in split if r.split == "val"} == {0, 1}
    # test is untouched
    assert [r for r in split if r.split == "test"] == [r for r in records if r.split == "test"]


def test_patient_split_is_deterministic_per_seed():
    records = _records()
    a = split_by_patient(records, 0.2, seed=3)
    b = split_by_patient(list(reversed(records)), 0.2, seed=3)
    c = split_by_patient(records, 0.2, seed=4)
    val = lambda rs: sorted(r.path for r in rs if r.split == "val")  # noqa: E731
    assert val(a) == val(b)
    assert val(a) != val(c)


def test_patient_overlap_is_reported():
    records = [
        Record("a", 0, "train", "P1"),
        Record("b", 0, "test", "P1"),
        Record("c", 1, "test", "P2"),
    ]
    assert patient_overlap(records) == {"train/test": 1}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_is_extracted_and_nested_root_found(tmp_path):
    archive = _zip(
        tmp_path / "archive.zip",
        {
            "chest_xray/chest_xray/train/NORMAL/IM-0001-0001.jpeg": _jpeg_bytes(),
            "chest_xray/chest_xray/test/PNEUMONIA/person1_virus_1.jpeg": _jpeg_bytes(),
            "chest_xray/__MACOSX/chest_xray/._x": b"junk",
        },
    )
    out = extract_zip(archive, tmp_path / "extract", max_bytes=10**7)
    root = find_dataset_root(out)
    assert root.name == "chest_xray" and (root / "train").is_dir()
    assert extract_zip(archive, tmp_path / "extract", max_bytes=10**7) == out  # reused


@pytest.mark.parametrize("evil", ["../evil.jpeg", "chest_xray/../../evil.jpeg", "/etc/evil.jpeg"])
def test_zip_refuses_paths_outside_the_target(tmp_path, evil):
    archive = _zip(
        tmp_path / "bad.zip", {"chest_xray/train/NORMAL/a.jpeg": _jpeg_bytes(), evil: b"x"}
    )
    with pytest.raises(DataError, match="outside the target"):
        extract_zip(archive, tmp_path / "extract", max_bytes=10**7)
    # Refused before a byte is written: nothing beside the archive, inside the target or out.
    assert list(tmp_path.rglob("*")) == [archive]
    assert not Path("/etc/evil.jpeg").exists()


def test_zip_refuses_symlinks(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("chest_xray/train/NORMAL/link.jpeg")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        extract_zip(archive, tmp_path / "extract", max_bytes=10**7)


def test_zip_size_cap(tmp_path):
    archive = _zip(tmp_path / "big.zip", {"chest_xray/train/NORMAL/a.jpeg": b"\0" * 100_000})
    with pytest.raises(DataError, match="max_zip_bytes"):
        extract_zip(archive, tmp_path / "extract", max_bytes=50_000)


def test_load_dataset_from_zip(tmp_path):
    archive = _zip(
        tmp_path / "archive.zip",
        {
            f"chest_xray/train/{c}/{n}": _jpeg_bytes()
            for c, n in [
                ("NORMAL", "IM-0001-0001.jpeg"),
                ("NORMAL", "IM-0002-0001.jpeg"),
                ("PNEUMONIA", "person1_virus_1.jpeg"),
                ("PNEUMONIA", "person2_virus_2.jpeg"),
            ]
        },
    )
    result = load_dataset(archive, val_fraction=0.3, seed=0, cache_dir=tmp_path / "cache")
    assert len(result.records) == 4
    assert {r.split for r in result.records} == {"train", "val"}


def test_load_dataset_with_no_usable_image_fails_clearly(tmp_path):
    root = tmp_path / "chest_xray" / "train" / "NORMAL"
    root.mkdir(parents=True)
    (root / "a.jpeg").write_bytes(b"")
    with pytest.raises(DataError, match="no usable image"):
        load_dataset(tmp_path / "chest_xray", 0.2, 0, tmp_path / "cache")
    with pytest.raises(DataError, match="no chest X-ray data"):
        load_dataset(tmp_path / "chest_xray" / "train", 0.2, 0, tmp_path / "cache")


def _inspect(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "inspect_data.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_data_json_reports_splits_and_skips(messy_tree):
    proc = _inspect(messy_tree, "--json", "--val-fraction", "0.3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["splits"]) <= {"train", "val", "test"}
    assert (
        sum(sum(c.values()) for c in report["splits"].values()) == 10
    )  # huge.png is fine at the default limit
    assert {"path", "reason"} <= set(report["skipped"][0])
    assert len(report["skipped"]) == 5


def test_inspect_data_fails_when_nothing_is_usable(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "train" / "NORMAL" / "a.jpeg").write_text("nope")
    proc = _inspect(tmp_path, "--json")
    assert proc.returncode == 1
    assert "no usable image" in proc.stderr
