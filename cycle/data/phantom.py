"""Synthetic chest radiographs whose truth is known: lungs, lesions and planted shortcuts.

Each film has a body in a black void, two lungs, mediastinum and heart, spine, ribs, clavicles,
soft-tissue texture and quantum noise. PNEUMONIA films carry patchy or lobar opacities inside the
lungs (with a lesion mask). Two confounders copy the real data's shortcuts:
- an "A-P" text tag in an upper corner (portable films of sick children), present with
  probability `shortcut` on PNEUMONIA films and `1 - shortcut` on NORMAL ones;
- the width of the unexposed border (field of view), wider on NORMAL films with probability
  `border_shortcut`.
In the counterfactual split `test_cf` both links are reversed; an "R" laterality marker appears in
both classes at random (a distractor with no link to the label).

Everything is deterministic for a seed, and image i does not depend on how many are generated.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cycle.config import PhantomConfig
from cycle.data.records import CLASSES
from cycle.io import atomic_write_json

MASK_KINDS = ("lungs", "lesions", "confounders")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "test_cf": 3}
_PATIENT_OFFSET = 100_000  # keeps patient ids unique across splits
FORMAT_VERSION = 2  # bump whenever the generator draws different films


@dataclass(frozen=True)
class PhantomParams:
    """How each film is drawn. No defaults here: they live in `PhantomConfig`, once."""

    size: int
    pneumonia_fraction: float
    shortcut: float
    border_shortcut: float
    images_per_patient: int

    @classmethod
    def from_config(cls, cfg: PhantomConfig) -> PhantomParams:
        return cls(
            size=cfg.size,
            pneumonia_fraction=cfg.pneumonia_fraction,
            shortcut=cfg.shortcut,
            border_shortcut=cfg.border_shortcut,
            images_per_patient=cfg.images_per_patient,
        )


@dataclass
class Phantoms:
    """A batch of generated films and their truth; arrays are [N, H, W]."""

    images: np.ndarray  # uint8
    lungs: np.ndarray  # bool
    lesions: np.ndarray  # bool
    confounders: np.ndarray  # bool: tag and marker pixels (boxes)
    labels: np.ndarray  # int64, 1 = PNEUMONIA
    patients: list[str]
    names: list[str]
    attributes: list[dict] = field(default_factory=list)


def generate(
    n: int,
    seed: int,
    params: PhantomParams | None = None,
    *,
    counterfactual: bool = False,
    start: int = 0,
    patient_offset: int = 0,
    **settings,
) -> Phantoms:
    """Generate films `start .. start+n-1` of the stream defined by `seed`. Without `params`,
    `settings` are PhantomConfig fields (e.g. size=96); the rest are the config's defaults."""
    if params is None:
        params = PhantomParams.from_config(PhantomConfig(**settings))
    elif settings:
        raise TypeError("pass either params or PhantomConfig settings, not both")
    films = [
        _film(seed, i, params, counterfactual, patient_offset) for i in range(start, start + n)
    ]
    return Phantoms(
        images=np.stack([f["image"] for f in films]),
        lungs=np.stack([f["lungs"] for f in films]),
        lesions=np.stack([f["lesions"] for f in films]),
        confounders=np.stack([f["confounders"] for f in films]),
        labels=np.array([f["label"] for f in films], dtype=np.int64),
        patients=[f["patient"] for f in films],
        names=[f["name"] for f in films],
        attributes=[f["attributes"] for f in films],
    )


# ---------------------------------------------------------------------------------------------
# One film


def _film(
    seed: int, index: int, p: PhantomParams, counterfactual: bool, patient_offset: int
) -> dict:
    """One film and its truth. The random draws happen in a fixed order (patient, cues, pose,
    body, lesion, exposure, edge, stamps): a film depends only on (seed, index)."""
    pid = index // p.images_per_patient
    patient_rng = np.random.default_rng([seed, 0, pid])
    rng = np.random.default_rng([seed, 1, index])
    label = int(patient_rng.random() < p.pneumonia_fraction)
    anatomy = _anatomy(patient_rng)
    s = p.size
    cues = _draw_cues(rng, p, label, counterfactual)
    # Per-film pose jitter of the same patient's anatomy.
    pose = _Pose(shift=rng.uniform(-0.03, 0.03, size=2), zoom=rng.uniform(0.96, 1.04), size=s)
    img, lungs = _render_body(anatomy, pose, rng)

    lesions = np.zeros((s, s), bool)
    if label == 1:
        opacity = _opacity(rng, lungs, s)
        img += opacity
        lesions = (opacity > 0.3 * opacity.max()) & lungs.astype(bool)

    # Exposure, contrast and quantum noise.
    img = np.clip(img, 0, None) ** anatomy["gamma"]
    img = img * anatomy["gain"] + rng.normal(0, anatomy["noise"], size=img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    if cues["border"] > 0:
        _unexposed_edge(img, lungs, lesions, cues["border"], rng)

    confounders = np.zeros((s, s), np.uint8)
    if cues["tag"]:
        cues["tag"] = _stamp(
            img,
            confounders,
            lungs,
            "A-P",
            rng,
            s,
            x_range=(0.1, 0.3),
            y_range=(0.07, 0.12),
            scale=0.0021,
        )
    if cues["marker"]:
        cues["marker"] = _stamp(
            img,
            confounders,
            lungs,
            "R",
            rng,
            s,
            x_range=(0.05, 0.1),
            y_range=(0.18, 0.4),
            scale=0.0024,
            boxed=True,
        )
    image = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    truth = {
        "lungs": lungs.astype(bool),
        "lesions": lesions,
        "confounders": confounders.astype(bool),
    }
    return _film_record(image, truth, label, cues, index, patient_offset + pid, patient_rng)


def _draw_cues(
    rng: np.random.Generator, p: PhantomParams, label: int, counterfactual: bool
) -> dict:
    """The confounders: their link to the label is what a classifier can cheat with (reversed
    in the counterfactual split)."""
    tag_p = p.shortcut if label == 1 else 1.0 - p.shortcut
    wide_p = p.border_shortcut if label == 0 else 1.0 - p.border_shortcut
    if counterfactual:
        tag_p, wide_p = 1.0 - tag_p, 1.0 - wide_p
    has_tag = bool(rng.random() < tag_p)
    wide_border = bool(rng.random() < wide_p)
    has_marker = bool(rng.random() < 0.5)
    border = rng.uniform(0.07, 0.12) if wide_border else rng.uniform(0.0, 0.035)
    return {"tag": has_tag, "marker": has_marker, "border": border}


@dataclass(frozen=True)
class _Pose:
    shift: np.ndarray  # (u, v) offset
    zoom: float
    size: int

    def px(self, u, v) -> np.ndarray:
        """Body coordinates in [-1, 1] -> pixel coordinates of this film."""
        u = np.asarray(u) * self.zoom + self.shift[0]
        v = np.asarray(v) * self.zoom + self.shift[1]
        s = self.size
        return np.stack([(u + 1) * 0.5 * s, (v + 1) * 0.5 * s], axis=-1).round().astype(np.int32)


def _render_body(
    anatomy: dict, pose: _Pose, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue, lungs with vascular markings, heart, spine, ribs and clavicles -> (image in
    [0, ~1] before exposure, lung mask as uint8)."""
    s, px = pose.size, pose.px
    img = np.zeros((s, s), np.float32)
    body = np.zeros((s, s), np.uint8)
    cv2.fillPoly(body, [px(*anatomy["body"])], 1)
    for arm in anatomy["arms"]:
        cv2.fillPoly(body, [px(*arm)], 1)
    soft = cv2.GaussianBlur(body.astype(np.float32), (0, 0), s * 0.012)
    img += anatomy["tissue"] * soft
    # Abdomen below the diaphragm is denser (brighter) than the chest wall.
    yy = np.linspace(-1, 1, s, dtype=np.float32)[:, None]
    img += 0.12 * soft * np.clip((yy - anatomy["diaphragm"]) * 4, 0, 1)

    lungs = np.zeros((s, s), np.uint8)
    for lung in anatomy["lungs"]:
        cv2.fillPoly(lungs, [px(*lung)], 1)
    heart = np.zeros((s, s), np.uint8)
    hc, hr = anatomy["heart"]
    centre = tuple(int(c) for c in px(*hc))
    axes = (int(hr[0] * pose.zoom * s / 2), int(hr[1] * pose.zoom * s / 2))
    cv2.ellipse(heart, centre, axes, anatomy["heart_angle"], 0, 360, 1, -1)
    lungs &= 1 - heart
    lung_soft = cv2.GaussianBlur(lungs.astype(np.float32), (0, 0), s * 0.008)
    # Vascular markings: smooth noise, densest near the hila.
    vessels = _smooth_noise(rng, s, cells=max(4, s // 12))
    img -= anatomy["lung_dark"] * lung_soft * (1.0 - 0.35 * vessels)

    heart_soft = cv2.GaussianBlur(heart.astype(np.float32), (0, 0), s * 0.01)
    img += anatomy["heart_density"] * heart_soft
    spine = np.zeros((s, s), np.float32)
    cv2.fillPoly(spine, [px(*anatomy["spine"])], 1.0)
    levels = (np.sin((yy + pose.shift[1]) * s * 0.11) > 0.6).astype(np.float32)  # vertebral bodies
    img += (0.08 + 0.03 * levels) * cv2.GaussianBlur(spine, (0, 0), s * 0.006) * soft

    bones = np.zeros((s, s), np.float32)
    thickness = max(1, round(s * 0.011))
    for rib in anatomy["ribs"]:
        cv2.polylines(bones, [px(*rib)], False, 1.0, thickness, cv2.LINE_AA)
    for clavicle in anatomy["clavicles"]:
        cv2.polylines(bones, [px(*clavicle)], False, 1.6, thickness * 2, cv2.LINE_AA)
    thorax = np.clip((anatomy["diaphragm"] + 0.08 - yy) * 6, 0, 1)  # ribs fade below the domes
    bones = cv2.GaussianBlur(bones, (0, 0), s * 0.004) * soft * thorax
    img += anatomy["bone"] * bones
    return img, lungs


def _unexposed_edge(
    img: np.ndarray, lungs: np.ndarray, lesions: np.ndarray, border: float, rng: np.random.Generator
) -> None:
    """The film's unexposed edge, in place: void, whatever lies beneath; what the film does not
    show is not lung (nor lesion) in the truth."""
    s = img.shape[0]
    b = int(round(border * s))
    frame = np.ones((s, s), bool)
    frame[b : s - b, b : s - b] = False
    img[frame] = rng.uniform(0.0, 0.03)
    lungs[frame] = 0
    lesions &= ~frame


def _film_record(
    image: np.ndarray,
    truth: dict,
    label: int,
    cues: dict,
    index: int,
    patient_number: int,
    patient_rng: np.random.Generator,
) -> dict:
    """The film with its truth masks, Kermany-style name, patient and attributes."""
    kind = "bacteria" if patient_rng.random() < 0.65 else "virus"
    if label == 1:
        name, patient = f"person{patient_number}_{kind}_{index}", f"PERSON{patient_number}"
    else:
        name, patient = f"IM-{patient_number:06d}-{index:04d}", f"IM-{patient_number:06d}"
    return {
        "image": image,
        **truth,
        "label": label,
        "patient": patient,
        "name": name,
        "attributes": {
            "name": name,
            "class": CLASSES[label],
            "patient": patient,
            "tag": int(cues["tag"]),
            "marker": int(cues["marker"]),
            "border": round(float(cues["border"]), 4),
            "lesion_pixels": int(truth["lesions"].sum()),
        },
    }


def _anatomy(rng: np.random.Generator) -> dict:
    """A patient's body, in coordinates u (left-right) and v (top-bottom), both in [-1, 1]."""
    bw = rng.uniform(0.66, 0.82)  # half-width of the trunk
    sw = bw + rng.uniform(0.04, 0.1)  # shoulders
    nw = rng.uniform(0.14, 0.2)  # neck
    sh = rng.uniform(-0.72, -0.62)  # shoulder line
    body = _poly(
        [
            (-nw, -1.1),
            (nw, -1.1),
            (nw, sh - 0.12),
            (sw * 0.8, sh - 0.02),
            (sw, sh + 0.08),
            (bw + 0.02, 0.2),
            (bw - 0.03, 1.1),
            (-bw + 0.03, 1.1),
            (-bw - 0.02, 0.2),
            (-sw, sh + 0.08),
            (-sw * 0.8, sh - 0.02),
            (-nw, sh - 0.12),
        ]
    )
    arm_gap = rng.uniform(0.04, 0.1)
    arms = [
        _poly(
            [
                (side * (sw + arm_gap), sh + 0.1),
                (side * (sw + arm_gap + 0.3), sh + 0.05),
                (side * (sw + arm_gap + 0.3), 1.1),
                (side * (sw + arm_gap + 0.05), 1.1),
            ]
        )
        for side in (-1, 1)
    ]
    top = rng.uniform(-0.64, -0.52)
    bottom = rng.uniform(0.32, 0.48)
    lungs = [
        _lung(side, rng, top + rng.uniform(-0.02, 0.02), bottom + (0.04 if side > 0 else 0.0), bw)
        for side in (-1, 1)
    ]
    heart = (
        (rng.uniform(0.06, 0.12), bottom - rng.uniform(0.1, 0.16)),
        (rng.uniform(0.26, 0.32), rng.uniform(0.2, 0.26)),
    )
    spine_w = rng.uniform(0.07, 0.1)
    spine = _poly([(-spine_w, -1.1), (spine_w, -1.1), (spine_w, 1.1), (-spine_w, 1.1)])
    ribs = []
    spacing = (bottom - top) / rng.uniform(7.5, 9.0)
    for k in range(10):  # posterior ribs: up from the spine, then down the lateral wall
        y0 = top + 0.06 + k * spacing
        if y0 > bottom + 0.05:
            break
        for side in (-1, 1):
            u = np.linspace(0.08, bw - 0.02, 18)
            v = y0 + 0.9 * (u - 0.35) ** 2 - 0.11
            ribs.append(np.stack([side * u, v]))
    clavicles = []
    for side in (-1, 1):
        u = np.linspace(0.1, sw * 0.85, 12)
        v = top + rng.uniform(-0.02, 0.04) + 0.25 * (u - 0.45) ** 2 - 0.04
        clavicles.append(np.stack([side * u, v]))
    return {
        "body": body,
        "arms": arms if rng.random() < 0.5 else [],
        "lungs": lungs,
        "heart": heart,
        "heart_angle": float(rng.uniform(-20, 0)),
        "spine": spine,
        "ribs": ribs,
        "clavicles": clavicles,
        "diaphragm": bottom,
        "tissue": rng.uniform(0.5, 0.62),
        "lung_dark": rng.uniform(0.3, 0.4),
        "heart_density": rng.uniform(0.05, 0.1),
        "bone": rng.uniform(0.07, 0.11),
        "gamma": rng.uniform(0.85, 1.2),
        "gain": rng.uniform(0.9, 1.15),
        "noise": rng.uniform(0.012, 0.03),
    }


def _lung(side: int, rng: np.random.Generator, top: float, bottom: float, bw: float) -> np.ndarray:
    apex_u = rng.uniform(0.22, 0.3)
    lateral = bw - rng.uniform(0.06, 0.1)
    medial = rng.uniform(0.08, 0.12) if side < 0 else rng.uniform(0.1, 0.14)
    dome = rng.uniform(0.06, 0.12)
    t = np.linspace(0, 1, 14)
    wall_u = apex_u + (lateral - apex_u) * np.sin(t * np.pi / 2) ** 0.6
    wall_v = top + (bottom - top) * t
    dia_u = lateral + (medial - lateral) * t
    dia_v = bottom - dome * np.sin(t * np.pi * 0.8) - 0.06 * t
    med_u = medial + (apex_u - 0.1 - medial) * t**2
    med_v = dia_v[-1] + (top + 0.04 - dia_v[-1]) * t
    u = np.concatenate([[apex_u - 0.06], wall_u, dia_u, med_u])
    v = np.concatenate([[top - 0.01], wall_v, dia_v, med_v])
    return np.stack([side * u, v])


def _poly(points) -> np.ndarray:
    return np.asarray(points, dtype=np.float64).T


def _smooth_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _opacity(rng: np.random.Generator, lungs: np.ndarray, s: int) -> np.ndarray:
    """Pneumonic opacity inside the lungs: patchy (bronchopneumonia) or lobar."""
    ys, xs = np.nonzero(lungs)
    canvas = np.zeros((s, s), np.float32)
    amplitude = rng.uniform(0.24, 0.38)
    lower = ys > np.percentile(ys, 35)  # pneumonia favours the middle and lower zones
    pool = np.flatnonzero(lower) if lower.any() else np.arange(len(ys))
    if rng.random() < 0.6:  # patchy
        for _ in range(rng.integers(3, 8)):
            k = rng.choice(pool)
            radius = int(s * rng.uniform(0.025, 0.06))
            cv2.circle(canvas, (int(xs[k]), int(ys[k])), radius, float(rng.uniform(0.6, 1.0)), -1)
        sigma = s * 0.02
    else:  # lobar: one larger consolidation
        k = rng.choice(pool)
        axes = (int(s * rng.uniform(0.07, 0.12)), int(s * rng.uniform(0.06, 0.1)))
        cv2.ellipse(
            canvas, (int(xs[k]), int(ys[k])), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1
        )
        sigma = s * 0.015
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    texture = 0.55 + 0.45 * _smooth_noise(rng, s, cells=max(6, s // 8))
    return amplitude * canvas.clip(0, 1) * texture * lungs


def _stamp(img, mask, lungs, text, rng, s, x_range, y_range, scale, boxed=False) -> bool:
    """Burn a bright radiographic text marker into the film, off the lungs; its box goes to
    `mask`."""
    font_scale = s * scale * rng.uniform(0.9, 1.15)
    thickness = max(1, round(s / 170))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    pad = max(2, s // 100)
    for _ in range(20):  # markers sit on soft tissue or void, never over lung: retry the place
        right = rng.random() < 0.5 and not boxed
        x = rng.uniform(*x_range)
        x = 1.0 - x - 0.12 if right else x
        x0, y0 = int(x * s), int(rng.uniform(*y_range) * s) + h
        box = (x0 - pad, y0 - h - pad), (x0 + w + pad, y0 + base + pad)
        (left, top), (right_edge, bottom) = box
        if not lungs[max(top - pad, 0) : bottom + pad, max(left - pad, 0) : right_edge + pad].any():
            break
    else:
        return False
    value = float(rng.uniform(0.9, 1.0))
    layer = np.zeros(mask.shape, np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(
        layer, text, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, font_scale, 255, thickness, cv2.LINE_AA
    )
    if boxed:
        cv2.rectangle(layer, *box, 255, max(1, thickness - 1))
    np.maximum(img, layer.astype(np.float32) * (value / 255.0), out=img)
    cv2.rectangle(mask, *box, 1, -1)
    return True


# ---------------------------------------------------------------------------------------------
# Writing a Kaggle-layout tree


@dataclass(frozen=True)
class PhantomSpec:
    """What a phantom tree on disk was generated from (compared before reuse). Built from a
    `PhantomConfig` (`from_config`), whose defaults are the only ones."""

    seed: int
    n_train: int
    n_val: int
    n_test: int
    n_test_cf: int
    params: PhantomParams
    version: int = FORMAT_VERSION

    @classmethod
    def from_config(cls, cfg: PhantomConfig | None = None, **settings) -> PhantomSpec:
        """The spec of `cfg`, or of PhantomConfig(**settings) (e.g. n_train=48, size=96)."""
        if cfg is None:
            cfg = PhantomConfig(**settings)
        elif settings:
            cfg = cfg.model_copy(update=settings)
        return cls(
            seed=cfg.seed,
            n_train=cfg.n_train,
            n_val=cfg.n_val,
            n_test=cfg.n_test,
            n_test_cf=cfg.n_test_cf,
            params=PhantomParams.from_config(cfg),
        )

    def split_sizes(self) -> dict[str, int]:
        sizes = {
            "train": self.n_train,
            "val": self.n_val,
            "test": self.n_test,
            "test_cf": self.n_test_cf,
        }
        return {k: v for k, v in sizes.items() if v > 0}

    def to_json(self) -> dict:
        return asdict(self)


def split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence([seed, SPLIT_CODES[split]]).generate_state(1)[0])


def mask_path(image_path: str | Path, kind: str) -> Path:
    """Where the `kind` mask of a phantom film lives: root/masks/kind/split/CLASS/name.png."""
    image_path = Path(image_path)
    klass, split, root = (
        image_path.parent.name,
        image_path.parent.parent.name,
        image_path.parents[2],
    )
    return root / "masks" / kind / split / klass / f"{image_path.stem}.png"


def load_mask(image_path: str | Path, kind: str) -> np.ndarray | None:
    path = mask_path(image_path, kind)
    if not path.is_file():
        return None
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None if mask is None else mask > 127


def write_dataset(
    out_dir: str | Path,
    spec: PhantomSpec | None = None,
    workers: int | None = None,
    force: bool = False,
    progress=None,
) -> Path:
    """Write `out_dir/chest_xray` (images, masks, attributes.csv, phantom.json), atomically.

    A tree generated from the same spec is reused; a different spec is regenerated only with
    `force` (so a typo never deletes a data set someone is using).
    """
    spec = spec or PhantomSpec.from_config()
    out_dir = Path(out_dir)
    root = out_dir / "chest_xray"
    meta = root / "phantom.json"
    if meta.is_file():
        existing = json.loads(meta.read_text()).get("spec")
        if existing == spec.to_json():
            return root
        if not force:
            raise FileExistsError(
                f"{root} holds phantoms made from another spec; "
                "pass force=True (--force) to replace it"
            )
    tmp = out_dir / "chest_xray.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    jobs = []
    chunk = 64
    for split, n in spec.split_sizes().items():
        offset = SPLIT_CODES[split] * _PATIENT_OFFSET
        for start in range(0, n, chunk):
            jobs.append(
                (
                    str(tmp),
                    split,
                    split_seed(spec.seed, split),
                    start,
                    min(chunk, n - start),
                    spec.params,
                    offset,
                )
            )
    rows: list[dict] = []
    workers = workers or os.cpu_count() or 1
    done = 0
    total = sum(spec.split_sizes().values())
    if workers == 1:
        results = map(_write_chunk, jobs)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_write_chunk, jobs)
    for chunk_rows in results:
        rows.extend(chunk_rows)
        done += len(chunk_rows)
        if progress is not None:
            progress(done, total)
    if workers != 1:
        pool.shutdown()

    with open(tmp / "attributes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_json(tmp / "phantom.json", {"spec": spec.to_json(), "counts": _counts(rows)})
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def _write_chunk(job) -> list[dict]:
    tmp, split, seed, start, n, params, offset = job
    cv2.setNumThreads(1)
    batch = generate(
        n, seed, params, counterfactual=(split == "test_cf"), start=start, patient_offset=offset
    )
    root = Path(tmp)
    rows = []
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    for i, name in enumerate(batch.names):
        klass = CLASSES[int(batch.labels[i])]
        image_path = root / split / klass / f"{name}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image_path), batch.images[i], png)
        for kind in MASK_KINDS:
            path = mask_path(image_path, kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), getattr(batch, kind)[i].astype(np.uint8) * 255, png)
        rows.append({"split": split, **batch.attributes[i]})
    return rows


def _counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per = counts.setdefault(row["split"], dict.fromkeys(CLASSES, 0))
        per[row["class"]] += 1
    return counts


def preview_grid(batch: Phantoms, cols: int = 4, outlines: bool = True) -> np.ndarray:
    """A contact sheet (BGR uint8): each film beside a copy with its truth outlined.

    Green: lungs, red: lesions, blue: confounders (tag, marker). Caption: class and shortcuts.
    """
    tiles = []
    for i in range(len(batch.labels)):
        film = cv2.cvtColor(batch.images[i], cv2.COLOR_GRAY2BGR)
        pair = [film]
        if outlines:
            truth = film.copy()
            for mask, colour in (
                (batch.lungs[i], (80, 220, 80)),
                (batch.lesions[i], (60, 60, 255)),
                (batch.confounders[i], (255, 160, 40)),
            ):
                contours, _ = cv2.findContours(
                    mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
                )
                cv2.drawContours(truth, contours, -1, colour, 1, cv2.LINE_AA)
            pair.append(truth)
        tile = np.concatenate(pair, axis=1)
        attrs = batch.attributes[i] if batch.attributes else {}
        caption = CLASSES[int(batch.labels[i])] + (" +tag" if attrs.get("tag") else "")
        cv2.putText(
            tile,
            caption,
            (4, tile.shape[0] - 6),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (0, 255, 255),
            1,
            cv2.LINE_AA,
        )
        tiles.append(np.pad(tile, ((2, 2), (2, 2), (0, 0))))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r : r + cols], axis=1) for r in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)
