"""Build the enhanced training set with Ray Data: for every training film, the classifier's CAM,
the U-Net lung mask, localisation numbers and the enhanced film, in one pass, written as shards.

    read_binary_files -> decode (tasks; a bad file becomes a 'skipped' row, never an error)
      -> ShardWriter (an elastic actor pool holding both models, GPUs where configured, that
         grows onto nodes that join during the build): each batch enhanced and written as one
         parquet file of <out>.partial-<id>/, its summary handed on
      -> the driver writes the manifest from the summaries -> rename to <out>

The driver never sees a film: it reads the files' summaries as they come (progress, the stall
watchdog) and writes the manifest. Rows keep the build's seeded order (their `position`; a file
holds a contiguous run of it), so readers get the same rows in the same order however Ray Data
ran. With `inprocess=True` the same `decode_batch` and `ShardWriter` run in this process and
write the same files, without Ray; `iter_enhanced` gives the rows without writing them (the
benchmark's batched baseline, the tests' reference).
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
from cycle.data.shards import (
    MANIFEST,
    OK,
    decode_png,
    file_sha256,
    publish,
    read_manifest,
    shard_files,
    summarize_part,
    write_manifest,
)
from cycle.enhance import enhance_batch, needs_donor
from cycle.lungseg.masks import load_lung_model
from cycle.lungseg.masks import predict as predict_lungs
from cycle.resources import nodes_can_join, plan_shard_pool, waiting_message
from cycle.shard_inputs import (
    build_order,
    decode_arguments,
    decode_batch,
    read_and_decode,
)
from cycle.watchdog import Watchdog

SAMPLE_FILMS = 49  # the build's first films, shown in samples.png (their CAMs ride in their rows)


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
        out = {k: batch[k] for k in ("position", "path", "label", "split", "patient")}
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
        sample_film = np.array([b""] * n, dtype=object)
        sample_cam = np.array([b""] * n, dtype=object)
        if ok.any():
            idx = np.flatnonzero(ok)
            cams, probs, result = self.enhance(batch, idx)
            for k, i in enumerate(idx):
                if batch["position"][i] < SAMPLE_FILMS:  # what samples.png shows
                    sample_film[i] = _png(batch["film"][i])
                    sample_cam[i] = _png(np.round(cams[k] * 255))
                peak = np.unravel_index(int(cams[k].argmax()), cams[k].shape)
                stats["prob_pneumonia"][i] = probs[k]
                stats["cam_mean"][i] = float(cams[k].mean())
                stats["lung_share"][i] = result.lung_share[k]
                stats["cam_peak_y"][i], stats["cam_peak_x"][i] = peak
                trusted[i] = result.trusted[k]
                if not result.keep[k]:
                    status[i], reason[i] = "dropped", "untrusted CAM (fallback: drop)"
                    continue
                images[i] = _png(np.round(result.images[k] * 255))
        return {
            "image": images,
            **out,
            **stats,
            "trusted": trusted,
            "donor": donors,
            "status": status,
            "reason": reason,
            "sample_film": sample_film,
            "sample_cam": sample_cam,
        }


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.clip(image, 0, 255).astype(np.uint8))[1].tobytes()


class ShardWriter(EnhanceWorker):
    """An EnhanceWorker that writes each batch's rows as one shard file of `out_dir` (named by the
    batch's first position in the build's order, written atomically) and hands on only that file's
    summary (`summarize_part`): the films never leave the actor, the driver gets numbers."""

    def __init__(self, out_dir: str | Path, **worker):
        super().__init__(**worker)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        faults.reached("shards:batch")
        rows = super().__call__(batch)
        path = self.out_dir / f"part-{int(np.min(rows['position'])):08d}.parquet"
        table = pa.table(
            {k: list(v) if np.asarray(v).dtype == object else v for k, v in rows.items()}
        )
        pq.write_table(table, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        summary = {**summarize_part(path), **_where()}
        return {"summary": np.array([json.dumps(summary)], dtype=object)}


def _where() -> dict:
    """The Ray node and process that wrote a part (the manifest shows where the work ran)."""
    import sys

    ray = sys.modules.get("ray")  # in-process builds run without Ray: never import it here
    node = ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else ""
    return {"node_id": node, "pid": os.getpid()}


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
    share: int = 1,
) -> dict:
    """Build (or reuse) the enhanced shards of `records` in `out_dir`; returns the manifest.
    `num_actors` fixes the EnhanceWorker pool's size; without it the pool starts at what the
    cluster holds now (`share`: the builds running at once split it) and grows onto nodes that
    join. `inprocess`: the same rows written by this process, without Ray Data (inside a Tune
    trial, where Data tasks would wait for CPUs the trials hold). `log` lines say `out_dir`'s
    stage (its architecture) when builds run side by side."""
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
    tmp.mkdir(parents=True)

    paths, lookup = build_order(records, cfg.seed)
    batch_size = batch_size or cfg.cam.batch_size
    how = "in this process" if inprocess else "Ray Data"
    log(
        f"[shards] {len(paths):,} films -> {out_dir} ({cfg.enhance.mode}, "
        f"strength {cfg.enhance.strength}, {how})"
    )
    if inprocess:
        parts = _write_inprocess(
            cfg, records, classifier_path, lung_model_path, tmp, batch_size, threads_per_actor
        )
    else:
        parts = _write_with_ray_data(
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
            share,
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
        parts=parts,
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
    share: int = 1,
) -> list[dict]:
    """Decode tasks -> ShardWriter actors (an elastic pool, sized from the cluster's share of this
    build), which write the shard files themselves, in the build's order. This driver reads the
    files' summaries as they come: progress, the `shards:part` fault point, a stall named and
    ended by the watchdog. Returns the summaries."""
    import ray
    import ray.data

    cluster = {k: v / share for k, v in ray.cluster_resources().items()}
    can_grow = nodes_can_join(ray.nodes(), ray.get_runtime_context().get_node_id())
    pool = plan_shard_pool(cluster, gpus_per_actor, wanted_actors, can_grow)
    log(f"[shards] Ray Data: {pool.describe()}")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # batches run in the build's order
    # A block a batch: queued blocks are what an actor on a node that joins takes (Ray Data grows
    # the pool only while work waits), and each becomes one shard file.
    ds = ray.data.read_binary_files(
        paths,
        include_paths=True,
        num_cpus=pool.task_cpus,
        override_num_blocks=max(1, -(-len(paths) // batch_size)),
    )
    ds = ds.map_batches(
        decode_batch,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=pool.task_cpus,
        fn_kwargs=decode_arguments(cfg, lookup),
    )
    ds = ds.map_batches(
        ShardWriter,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=pool.max_actors, initial_size=pool.actors
        ),
        num_gpus=pool.gpus_per_actor,
        num_cpus=pool.cpus_per_actor,
        fn_constructor_kwargs={
            "out_dir": str(tmp),
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

    parts, last_shown = [], time.monotonic()
    with Watchdog("shards", cfg.resources.stall_timeout_s, describe) as dog:
        for row in ds.iter_rows():
            parts.append(json.loads(row["summary"]))
            dog.beat()
            faults.reached("shards:part")
            if time.monotonic() - last_shown > 10:
                log(f"[shards] {sum(p['rows'] for p in parts):,}/{len(paths):,} films written")
                last_shown = time.monotonic()
    return parts


def _write_inprocess(
    cfg, records, classifier_path, lung_model_path, tmp: Path, batch_size: int, threads: int | None
) -> list[dict]:
    """The same files, written by a ShardWriter in this process; returns their summaries."""
    writer = ShardWriter(
        tmp,
        classifier_path=classifier_path,
        lung_model_path=lung_model_path,
        enhance=cfg.enhance,
        cam=cfg.cam,
        seed=cfg.seed,
        threads=threads,
    )
    paths, lookup = build_order(records, cfg.seed)
    arguments = decode_arguments(cfg, lookup)
    parts = []
    for start in range(0, len(paths), batch_size):
        summary = writer(read_and_decode(paths[start : start + batch_size], arguments))
        parts.append(json.loads(summary["summary"][0]))
        faults.reached("shards:part")
    return parts


def iter_enhanced(
    cfg: Config, records: Sequence[Record], worker: EnhanceWorker, batch_size: int = 32
):
    """The same pipeline batched in this process (no Ray): output batches, one at a time."""
    paths, lookup = build_order(records, cfg.seed)
    arguments = decode_arguments(cfg, lookup)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield worker(read_and_decode(chunk, arguments))


def enhance_inprocess(
    cfg: Config, records: Sequence[Record], worker: EnhanceWorker, batch_size: int = 32
) -> list[dict]:
    return list(iter_enhanced(cfg, records, worker, batch_size))


def sample_picture(shard_dir: str | Path, path: str | Path) -> Path | None:
    """samples.png: the build's first SAMPLE_FILMS films (their positions), each as film, CAM and
    enhanced film, from the rows that carry them (a few rows of the first shard file: the picture
    costs no second pass over films or models). None when none of them was readable."""
    from cycle.plots import enhanced_grid

    films, cams, enhanced = [], [], []
    for file in shard_files(shard_dir, verify=False):
        table = pq.read_table(file, columns=["position", "image", "sample_film", "sample_cam"])
        rows = table.to_pylist()
        for row in sorted(rows, key=lambda r: r["position"]):
            if row["sample_film"]:
                films.append(decode_png(row["sample_film"]) / 255.0)
                cams.append(decode_png(row["sample_cam"]) / 255.0)
                enhanced.append(decode_png(row["image"]) / 255.0)
        if not rows or rows[-1]["position"] >= SAMPLE_FILMS - 1:
            break
    if not films:
        return None
    return enhanced_grid(np.stack(films), np.stack(cams), np.stack(enhanced), path)
