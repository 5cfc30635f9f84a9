"""Scan a Kaggle-style `chest_xray` tree (or a .zip of it) into records, and split by patient.

Layout: `{train,val,test,test_cf}/{NORMAL,PNEUMONIA}/*` (any case, any common image extension).
Every image is decoded once; a file that cannot be used is skipped with a reason, never fatal.
The Kaggle `val` split (16 images) is folded into train and a real validation split is carved
from train by patient, so no patient's films sit on both sides of model selection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from cycle.console import log
from cycle.data.transforms import IMAGE_EXTENSIONS, ImageLoadError, load_grayscale
from cycle.io import atomic_write_json

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, 1 (PNEUMONIA is the positive class)
SPLITS = ("train", "val", "test", "test_cf")
IGNORED_DIRS = frozenset({"__macosx"})


class DataError(RuntimeError):
    """The data set as a whole cannot be used (no images, unsafe archive, ...)."""


@dataclass(frozen=True)
class Record:
    path: str
    label: int
    split: str
    patient: str

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class ScanResult:
    root: str
    records: list[Record]
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        return split_counts(self.records)

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "records": [asdict(r) for r in self.records],
            "skipped": [asdict(s) for s in self.skipped],
        }

    @classmethod
    def from_json(cls, obj: dict) -> ScanResult:
        return cls(
            obj["root"],
            [Record(**r) for r in obj["records"]],
            [Skipped(**s) for s in obj["skipped"]],
        )

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ScanResult:
        return cls.from_json(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------
# Patients

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person1946_bacteria_4874
    re.compile(r"^((?:normal2-)?im-\d+)-\d+", re.IGNORECASE),  # IM-0115-0001, NORMAL2-IM-1440-0001
    re.compile(r"^(ph-\d+)-\d+", re.IGNORECASE),  # phantoms: PH-00042-0001
)


def patient_id(filename: str) -> str:
    """The patient a Kermany file name encodes; a file of unknown pattern is its own patient."""
    stem = PurePosixPath(filename).stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1).upper()
    return stem.upper()


# ---------------------------------------------------------------------------------------------
# Archives


def extract_zip(archive: str | Path, dest_root: str | Path, max_bytes: int) -> Path:
    """Safely extract `archive` under `dest_root` (once; later calls reuse it).

    Refuses the whole archive if any member would land outside the target (absolute paths,
    `..`, symlinks) or the uncompressed total exceeds `max_bytes`.
    """
    archive = Path(archive)
    st = archive.stat()
    dest = Path(dest_root) / f"{archive.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (dest / ".complete").exists():
        return dest
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a readable zip archive: {err}") from None
    with zf:
        members = zf.infolist()
        declared = 0
        for info in members:
            _check_member(archive, info)
            declared += info.file_size
        if declared > max_bytes:
            raise DataError(
                f"refusing {archive}: it expands to {declared:,} bytes, over the limit "
                f"data.max_zip_bytes={max_bytes:,}"
            )
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        written = 0
        for info in members:
            target = tmp.joinpath(*PurePosixPath(info.filename).parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                # Count real bytes too: declared sizes in a hostile archive can lie.
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise DataError(f"refusing {archive}: expands past {max_bytes:,} bytes")
                    out.write(chunk)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _check_member(archive: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    mode = info.external_attr >> 16
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise DataError(f"refusing {archive}: member {info.filename!r} points outside the target")
    if stat.S_ISLNK(mode):
        raise DataError(f"refusing {archive}: member {info.filename!r} is a symbolic link")


# ---------------------------------------------------------------------------------------------
# Scanning


def find_dataset_root(root: str | Path) -> Path:
    """The folder holding `train/` (Kaggle's zip nests `chest_xray/chest_xray/...`)."""
    root = Path(root)
    queue = [root]
    while queue:
        here = queue.pop(0)
        children = sorted(
            (c for c in here.iterdir() if c.is_dir() and not _ignored(c.name)), key=lambda c: c.name
        )
        if any(c.name.lower() == "train" for c in children):
            return here
        if len(here.relative_to(root).parts) < 3:
            queue.extend(children)
    raise DataError(
        f"no chest X-ray data under {root}: expected folders train/, test/ "
        "(and optionally val/, test_cf/), each with NORMAL/ and PNEUMONIA/ inside"
    )


def resolve_data_root(root: str | Path, extract_dir: str | Path, max_zip_bytes: int) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if root.is_file():
        if not zipfile.is_zipfile(root):
            raise DataError(f"data root {root} is a file but not a zip archive")
        root = extract_zip(root, extract_dir, max_zip_bytes)
    return find_dataset_root(root)


def scan(
    root: str | Path,
    max_pixels: int = 60_000_000,
    cache_path: str | Path | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Walk a dataset root and fully decode every candidate image once.

    `cache_path` remembers each file's verdict by (size, mtime), so a rescan is instant.
    """
    root = Path(root)
    candidates: list[tuple[Path, int, str]] = []
    skipped: list[Skipped] = []
    for split_dir in sorted(root.iterdir(), key=lambda p: p.name):
        split = split_dir.name.lower()
        if not split_dir.is_dir() or split not in SPLITS:
            continue
        for class_dir in sorted(split_dir.iterdir(), key=lambda p: p.name):
            if _ignored(class_dir.name):
                continue
            if not class_dir.is_dir():
                skipped.append(Skipped(str(class_dir), "not inside a NORMAL/ or PNEUMONIA/ folder"))
                continue
            label = _label_of(class_dir.name)
            for path in sorted(_walk_files(class_dir)):
                if label is None:
                    skipped.append(Skipped(str(path), f"unknown class folder {class_dir.name!r}"))
                elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append(
                        Skipped(str(path), f"not an image file (extension {path.suffix!r})")
                    )
                else:
                    candidates.append((path, label, split))

    cache = _load_cache(cache_path)
    verdicts = _validate_all([c[0] for c in candidates], max_pixels, cache, workers, progress)
    if cache_path is not None:
        atomic_write_json(cache_path, cache)

    records = []
    for (path, label, split), reason in zip(candidates, verdicts):
        if reason is None:
            records.append(Record(str(path), label, split, patient_id(path.name)))
        else:
            skipped.append(Skipped(str(path), reason))
    skipped.sort(key=lambda s: s.path)
    return ScanResult(str(root), records, skipped)


def _walk_files(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _ignored(d)]
        for name in filenames:
            if not name.startswith("."):  # hidden files and macOS '._x.jpeg' forks
                yield Path(dirpath, name)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_DIRS


def _label_of(folder_name: str) -> int | None:
    upper = folder_name.upper()
    return CLASSES.index(upper) if upper in CLASSES else None


def _load_cache(cache_path: str | Path | None) -> dict[str, list]:
    if cache_path is None or not Path(cache_path).is_file():
        return {}
    try:
        return json.loads(Path(cache_path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a rescan


def _validate_all(
    paths: Sequence[Path],
    max_pixels: int,
    cache: dict[str, list],
    workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> list[str | None]:
    def check(path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError as err:
            return f"unreadable: {err.strerror or err}"
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, max_pixels]
        hit = cache.get(key)
        if hit is not None and hit[:3] == stamp:
            return hit[3]
        try:
            load_grayscale(path, max_pixels)
            reason = None
        except ImageLoadError as err:
            reason = err.reason
        cache[key] = [*stamp, reason]
        return reason

    # PIL releases the GIL while decoding, so threads use every core.
    verdicts: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for i, verdict in enumerate(pool.map(check, paths), 1):
            verdicts.append(verdict)
            if progress is not None and (i % 500 == 0 or i == len(paths)):
                progress(i, len(paths))
    return verdicts


# ---------------------------------------------------------------------------------------------
# Splits


def split_by_patient(records: Sequence[Record], val_fraction: float, seed: int) -> list[Record]:
    """Fold Kaggle `val` into train, then carve val from train by patient, stratified by label.

    Deterministic for a seed; no patient has images on both sides.
    """
    pool = [r for r in records if r.split in ("train", "val")]
    rest = [r for r in records if r.split not in ("train", "val")]
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in pool:
        by_patient[r.patient].append(r)

    val_patients: set[str] = set()
    rng = np.random.default_rng(seed)
    for label in range(len(CLASSES)):
        patients = sorted(p for p, rs in by_patient.items() if _majority_label(rs) == label)
        target = val_fraction * sum(len(by_patient[p]) for p in patients)
        taken = 0
        for index in rng.permutation(len(patients)):
            if taken >= target:
                break
            val_patients.add(patients[index])
            taken += len(by_patient[patients[index]])

    carved = [replace(r, split="val" if r.patient in val_patients else "train") for r in pool]
    return carved + rest


def _majority_label(records: Sequence[Record]) -> int:
    return Counter(r.label for r in records).most_common(1)[0][0]


def split_counts(records: Iterable[Record]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        per_class = counts.setdefault(r.split, dict.fromkeys(CLASSES, 0))
        per_class[r.class_name] += 1
    return {s: counts[s] for s in SPLITS if s in counts}


def patient_counts(records: Iterable[Record]) -> dict[str, int]:
    patients: dict[str, set[str]] = defaultdict(set)
    for r in records:
        patients[r.split].add(r.patient)
    return {s: len(patients[s]) for s in SPLITS if s in patients}


def patient_overlap(records: Iterable[Record]) -> dict[str, int]:
    """Patients shared by two splits, e.g. {'train/test': 3}. Empty when the splits are clean."""
    patients: dict[str, set[str]] = defaultdict(set)
    for r in records:
        patients[r.split].add(r.patient)
    present = [s for s in SPLITS if s in patients]
    shared = {}
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            n = len(patients[a] & patients[b])
            if n:
                shared[f"{a}/{b}"] = n
    return shared


def records_of(records: Iterable[Record], split: str) -> list[Record]:
    return [r for r in records if r.split == split]


def load_dataset(
    root: str | Path,
    val_fraction: float,
    seed: int,
    cache_dir: str | Path,
    max_pixels: int = 60_000_000,
    max_zip_bytes: int = 32 * 2**30,
    verbose: bool = False,
) -> ScanResult:
    """Resolve (and extract) a root, scan it, carve val by patient. Raises DataError if empty."""
    cache_dir = Path(cache_dir)
    data_root = resolve_data_root(root, cache_dir / "extracted", max_zip_bytes)

    def report(done: int, total: int) -> None:
        log(f"  checked {done:,}/{total:,} images")

    result = scan(
        data_root,
        max_pixels=max_pixels,
        cache_path=cache_dir / "scan_cache.json",
        progress=report if verbose else None,
    )
    if not result.records:
        detail = (
            f"; {len(result.skipped)} files skipped (first: {result.skipped[0].reason})"
            if result.skipped
            else ""
        )
        raise DataError(f"no usable image under {data_root}{detail}")
    result.records = split_by_patient(result.records, val_fraction, seed)
    return result
