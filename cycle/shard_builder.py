"""Build the enhanced training set with Ray Data: for every training film, the classifier's CAM,
the U-Net lung mask, localisation numbers and the enhanced film, in one pass, written as shards.

    read_binary_files -> decode (tasks; a bad file becomes a 'skipped' row, never an error)
      -> EnhanceWorker (actors holding both models; GPUs where configured)
      -> the driver iterates the output batches and writes each one itself, with pyarrow, as
         <out>.partial-<id>/part-NNNNN.parquet -> manifest (driver) -> rename to <out>

Ray Data computes the rows; the driver writes the files (it never decodes a film or computes a
CAM). With `inprocess=True` the same `decode_batch` and `EnhanceWorker` run in this process and
write the same parts, without Ray (`iter_enhanced`; also the benchmark's batched baseline, the
sample picture, and the tests' reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cycle import faults
from cycle.cam import compute_cam
from cycle.checkpoint import load_classifier
from cycle.config import CamConfig, Config, EnhanceConfig, config_hash
from cycle.data.records import Record
from cycle.data.shards import MANIFEST, OK, file_sha256, publish, read_manifest, write_manifest
from cycle.data.transforms import (
    ImageLoadError,
    Preprocess,
    decode_grayscale,
    preprocess_from_config,
)
from cycle.enhance import derangement, enhance_batch, needs_donor
from cycle.lungseg.masks import load_lung_model
from cycle.lungseg.masks import predict as predict_lungs
from cycle.resources import plan_shard_pool, waiting_message
from cycle.watchdog import Watchdog


def decode_batch(
    batch: dict, lookup: dict, preprocess: Preprocess, max_pixels: int, with_context: bool = False
) -> dict:
    """bytes + path -> films resized to R x R (uint8) with label, split, patient, status, reason;
    `with_context`: also each film's context donor (read here: the donor is fixed per film by the
    seed, not by which batch Ray Data happens to form, so a build is reproducible)."""
    pre = preprocess
    r = pre.resize_to
    paths = [os.path.abspath(str(p)) for p in batch["path"]]
    meta = [lookup[p] for p in paths]
    films = np.zeros((len(paths), r, r), np.uint8)
    context = np.zeros((len(paths), r, r), np.uint8)
    donors = []
    status, reason = [], []
    for i, data in enumerate(batch["bytes"]):
        try:
            films[i] = pre.resize(decode_grayscale(bytes(data), max_pixels))
            status.append(OK)
            reason.append("")
        except ImageLoadError as err:
            status.append("skipped")
            reason.append(err.reason)
            donors.append("")
            continue
        donor = meta[i][3] if with_context else ""
        try:
            context[i] = (
                pre.resize(decode_grayscale(Path(donor).read_bytes(), max_pixels))
                if donor
                else films[i]
            )
        except (OSError, ImageLoadError):
            context[i], donor = films[i], ""  # an unreadable donor: the film keeps its own context
        donors.append(donor)
    return {
        "film": films,
        "context": context,
        "donor": np.array(donors, dtype=object),
        "path": np.array(paths, dtype=object),
        "label": np.array([m[0] for m in meta], dtype=np.int64),
        "split": np.array([m[1] for m in meta], dtype=object),
        "patient": np.array([m[2] for m in meta], dtype=object),
        "status": np.array(status, dtype=object),
        "reason": np.array(reason, dtype=object),
    }


class EnhanceWorker:
    """Holds the classifier and the lung U-Net; turns decoded batches into shard rows."""

    def __init__(
        self,
        classifier_path: str | Path,
        lung_model_path: str | Path,
        enhance: EnhanceConfig,
        cam: CamConfig,
        seed: int,
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.pre = load_classifier(classifier_path, self.device)
        self.unet = load_lung_model(lung_model_path, self.device)
        self.enhance_cfg, self.cam_cfg, self.seed = enhance, cam, seed

    @classmethod
    def from_config(
        cls,
        classifier_path: str | Path,
        lung_model_path: str | Path,
        cfg: Config,
        threads: int | None = None,
    ) -> EnhanceWorker:
        return cls(classifier_path, lung_model_path, cfg.enhance, cfg.cam, cfg.seed, threads)

    def maps(self, films: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """R x R films -> (CAMs on the R x R canvas, zero outside the crop; lung masks;
        P(PNEUMONIA))."""
        x = torch.stack([self.pre.normalise(self.pre.crop(f)) for f in films]).to(self.device)
        # Fixed-size batches: a film's CAM and mask must not depend on how Ray Data batched it.
        cams, logits = compute_cam(
            self.model,
            x,
            method=self.cam_cfg.method,
            return_logits=True,
            depth=self.cam_cfg.depth,
            batch_size=self.cam_cfg.batch_size,
        )
        r, s = self.pre.resize_to, self.pre.size
        off = (r - s) // 2
        canvas = np.zeros((len(films), r, r), np.float32)
        canvas[:, off : off + s, off : off + s] = cams.float().cpu().numpy()
        lungs = np.stack(predict_lungs(self.unet, list(films)))
        probs = logits.float().softmax(dim=1)[:, 1].cpu().numpy()
        return canvas, lungs, probs

    def enhance(self, batch: dict, idx: np.ndarray):
        """The decoded films `idx` of a decode_batch output -> (CAMs, P(PNEUMONIA), Enhanced)."""
        films = batch["film"][idx]
        cams, lungs, probs = self.maps(films)
        e = self.enhance_cfg
        rng = np.random.default_rng([self.seed, zlib.crc32(str(batch["path"][idx[0]]).encode())])
        context = batch["context"][idx].astype(np.float32) / 255.0 if needs_donor(e.mode) else None
        result = enhance_batch(
            films.astype(np.float32) / 255.0,
            cams,
            lungs,
            e.mode,
            e.strength,
            e.trust_threshold,
            e.fallback,
            rng,
            e.dilate_px,
            context=context,
        )
        return cams, probs, result

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        ok = np.array([s == OK for s in batch["status"]], bool)
        out = {k: batch[k] for k in ("path", "label", "split", "patient")}
        status, reason = (
            np.array(batch["status"], dtype=object),
            np.array(batch["reason"], dtype=object),
        )
        images = np.array([b""] * n, dtype=object)
        zeros = np.zeros(n, np.float64)
        stats = {
            "prob_pneumonia": zeros.copy(),
            "cam_mean": zeros.copy(),
            "lung_share": np.full(n, np.nan),
            "cam_peak_y": np.zeros(n, np.int64),
            "cam_peak_x": np.zeros(n, np.int64),
        }
        trusted, donors = np.zeros(n, bool), np.array(batch["donor"], dtype=object)
        if ok.any():
            idx = np.flatnonzero(ok)
            cams, probs, result = self.enhance(batch, idx)
            for k, i in enumerate(idx):
                peak = np.unravel_index(int(cams[k].argmax()), cams[k].shape)
                stats["prob_pneumonia"][i] = probs[k]
                stats["cam_mean"][i] = float(cams[k].mean())
                stats["lung_share"][i] = result.lung_share[k]
                stats["cam_peak_y"][i], stats["cam_peak_x"][i] = peak
                trusted[i] = result.trusted[k]
                if not result.keep[k]:
                    status[i], reason[i] = "dropped", "untrusted CAM (fallback: drop)"
                    continue
                png = cv2.imencode(".png", np.round(result.images[k] * 255).astype(np.uint8))[1]
                images[i] = png.tobytes()
        return {
            "image": images,
            **out,
            **stats,
            "trusted": trusted,
            "donor": donors,
            "status": status,
            "reason": reason,
        }


def decode_arguments(cfg: Config, lookup: dict) -> dict:
    """decode_batch's arguments, the same for Ray Data and the in-process path."""
    return {
        "lookup": lookup,
        "preprocess": preprocess_from_config(cfg.data),
        "max_pixels": cfg.data.max_image_pixels,
        "with_context": needs_donor(cfg.enhance.mode),
    }


def _inputs(records: Sequence[Record], seed: int) -> tuple[list[str], dict]:
    """Absolute paths in a seeded random order, and path -> (label, split, patient, donor): each
    film's context donor is another film of the same split drawn at random across labels (a val
    film never borrows a training film's context)."""
    meta = {os.path.abspath(r.path): (r.label, r.split, r.patient) for r in records}
    paths = sorted(meta)
    rng = np.random.default_rng([seed, 101])
    paths = [paths[i] for i in rng.permutation(len(paths))]
    lookup = {}
    for split in sorted({m[1] for m in meta.values()}):
        members = [p for p in paths if meta[p][1] == split]
        donors = derangement(len(members), rng)
        for p, d in zip(members, donors):
            lookup[p] = (*meta[p], members[d] if len(members) > 1 else "")
    return paths, lookup


def build_key(cfg: Config, records: Sequence[Record], classifier_path, lung_model_path) -> str:
    parts = {
        "config": config_hash(cfg, "data", "cam", "enhance", "seed"),
        "classifier": file_sha256(classifier_path),
        "lung_model": file_sha256(lung_model_path),
        "inputs": hashlib.sha256(
            "\n".join(sorted(f"{r.split}:{r.path}" for r in records)).encode()
        ).hexdigest(),
        "donors": "within-split",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def build_shards(
    cfg: Config,
    records: Sequence[Record],
    classifier_path: str | Path,
    lung_model_path: str | Path,
    out_dir: str | Path,
    num_actors: int | None = None,
    batch_size: int | None = None,
    gpus_per_actor: float = 0.0,
    threads_per_actor: int | None = None,
    log=print,
    inprocess: bool = False,
) -> dict:
    """Build (or reuse) the enhanced shards of `records` in `out_dir`; returns the manifest.
    `num_actors` caps the EnhanceWorker pool, which is otherwise sized from the cluster's CPUs.
    `inprocess`: the same rows written by this process, without Ray Data (inside a Tune trial,
    where Data tasks would wait for CPUs the trials hold)."""
    # Absolute: Ray's workers need not share the driver's working folder.
    out_dir, classifier_path, lung_model_path = (
        Path(p).resolve() for p in (out_dir, classifier_path, lung_model_path)
    )
    key = build_key(cfg, records, classifier_path, lung_model_path)
    existing = _up_to_date(out_dir, key, log)
    if existing is not None:
        return existing
    for stale in out_dir.parent.glob(out_dir.name + ".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # an interrupted build: never readable, now gone
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.parent.mkdir(parents=True, exist_ok=True)

    paths, lookup = _inputs(records, cfg.seed)
    batch_size = batch_size or cfg.cam.batch_size
    how = "in this process" if inprocess else "Ray Data"
    log(
        f"[shards] {len(paths):,} films -> {out_dir} ({cfg.enhance.mode}, "
        f"strength {cfg.enhance.strength}, {how})"
    )
    if inprocess:
        _write_inprocess(
            cfg, records, classifier_path, lung_model_path, tmp, batch_size, threads_per_actor
        )
    else:
        _write_with_ray_data(
            cfg,
            paths,
            lookup,
            classifier_path,
            lung_model_path,
            tmp,
            batch_size,
            num_actors,
            gpus_per_actor,
            threads_per_actor,
            log,
        )
    manifest = write_manifest(
        tmp,
        key,
        len(paths),
        extra={
            "mode": cfg.enhance.mode,
            "strength": cfg.enhance.strength,
            "trust_threshold": cfg.enhance.trust_threshold,
            "fallback": cfg.enhance.fallback,
            "classifier": str(classifier_path),
            "lung_model": str(lung_model_path),
            "image_size": cfg.data.image_size,
            "crop_fraction": cfg.data.crop_fraction,
        },
    )
    publish(tmp, out_dir)
    c = manifest["counts"]
    log(
        f"[shards] wrote {c['written']:,} of {c['in']:,} films ({c['skipped']:,} skipped, "
        f"{c['untrusted_written']:,} with an untrusted CAM) in {len(manifest['shards'])} shard(s)"
    )
    return manifest


def _up_to_date(out_dir: Path, key: str, log) -> dict | None:
    """The manifest of a finished build of the same inputs in `out_dir`, else None (a damaged or
    different build is rebuilt, never trusted)."""
    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
    except Exception as err:  # damaged: rebuild
        log(f"[shards] rebuilding {out_dir}: {err}")
        return None
    if manifest["build_key"] != key:
        return None
    log(f"[shards] {out_dir} is up to date (build {key}): nothing to do")
    return manifest


def _write_with_ray_data(
    cfg,
    paths,
    lookup,
    classifier_path,
    lung_model_path,
    tmp: Path,
    batch_size: int,
    wanted_actors: int | None,
    gpus_per_actor: float,
    threads: int | None,
    log,
) -> None:
    """Decode tasks -> EnhanceWorker actors, sized from the cluster; this driver writes each
    output batch as it arrives (progress shown, a stall named and ended by the watchdog)."""
    import ray
    import ray.data

    pool = plan_shard_pool(ray.cluster_resources(), gpus_per_actor, wanted_actors)
    log(f"[shards] Ray Data: {pool.describe()}")
    ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=pool.task_cpus)
    ds = ds.map_batches(
        decode_batch,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=pool.task_cpus,
        fn_kwargs=decode_arguments(cfg, lookup),
    )
    ds = ds.map_batches(
        EnhanceWorker,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_gpus=pool.gpus_per_actor,
        num_cpus=pool.cpus_per_actor,
        fn_constructor_kwargs={
            "classifier_path": str(classifier_path),
            "lung_model_path": str(lung_model_path),
            "enhance": cfg.enhance,
            "cam": cfg.cam,
            "seed": cfg.seed,
            "threads": threads or pool.threads_per_actor,
        },
    )
    request = {
        "CPU": pool.actors * pool.cpus_per_actor + pool.task_cpus,
        "GPU": pool.actors * pool.gpus_per_actor,
    }

    def describe(waited: float) -> str:
        return waiting_message(
            f"the shard build ({len(paths):,} films -> {tmp.name})",
            waited,
            request,
            ray.cluster_resources(),
            ray.available_resources(),
            "give the cluster more CPUs (`ray start --head --num-cpus N`, "
            "or worker nodes), free the ones "
            "other jobs hold, or build in this process (--inprocess-shards)",
        )

    tmp.mkdir(parents=True, exist_ok=True)
    done, last_shown = 0, 0.0
    with Watchdog("shards", cfg.resources.stall_timeout_s, describe) as dog:
        for i, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
            _write_part(tmp, i, batch)
            dog.beat()
            done += len(batch["path"])
            if time.monotonic() - last_shown > 10 or done == len(paths):
                log(f"[shards] {done:,}/{len(paths):,} films")
                last_shown = time.monotonic()


def _write_part(tmp: Path, index: int, batch: dict) -> None:
    table = pa.table({k: list(v) if np.asarray(v).dtype == object else v for k, v in batch.items()})
    path = tmp / f"part-{index:05d}.parquet"
    pq.write_table(table, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    faults.reached("shards:part")


def _write_inprocess(
    cfg, records, classifier_path, lung_model_path, tmp: Path, batch_size: int, threads: int | None
) -> None:
    worker = EnhanceWorker.from_config(classifier_path, lung_model_path, cfg, threads=threads)
    tmp.mkdir(parents=True, exist_ok=True)
    for i, batch in enumerate(iter_enhanced(cfg, records, worker, batch_size)):
        _write_part(tmp, i, batch)


def _read_and_decode(paths: Sequence[str], arguments: dict) -> dict:
    """What read_binary_files + decode_batch do in Ray Data, in this process."""
    return decode_batch(
        {"bytes": [Path(p).read_bytes() for p in paths], "path": list(paths)}, **arguments
    )


def iter_enhanced(
    cfg: Config, records: Sequence[Record], worker: EnhanceWorker, batch_size: int = 32
):
    """The same pipeline batched in this process (no Ray): output batches, one at a time."""
    paths, lookup = _inputs(records, cfg.seed)
    arguments = decode_arguments(cfg, lookup)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield worker(_read_and_decode(chunk, arguments))


def enhance_inprocess(
    cfg: Config, records: Sequence[Record], worker: EnhanceWorker, batch_size: int = 32
) -> list[dict]:
    return list(iter_enhanced(cfg, records, worker, batch_size))


def sample_picture(
    cfg: Config, records: Sequence[Record], worker: EnhanceWorker, path: str | Path, n: int = 49
) -> Path | None:
    """The first n readable films of the build's order: (film, CAM, enhanced film) triplets,
    decoded and enhanced exactly as the shard rows are; None when none of them is readable."""
    from cycle.plots import enhanced_grid

    paths, lookup = _inputs(records, cfg.seed)
    chunk = paths[: n + 8]  # a few spare films in case some are unreadable
    batch = _read_and_decode(chunk, decode_arguments(cfg, lookup))
    idx = np.flatnonzero([s == OK for s in batch["status"]])[:n]
    if not len(idx):
        return None
    cams, _, result = worker.enhance(batch, idx)
    return enhanced_grid(batch["film"][idx] / 255.0, cams, result.images, path)
