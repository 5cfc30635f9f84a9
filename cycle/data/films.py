"""The films a training or evaluation stage reads, as a stream of decoded batches: from Ray Data
on Ray Train workers (the set's rows split across the workers, each decoded by the worker that
gets it, in threads beside training, or with data.decode=ray_data by Ray Data tasks on the
cluster's nodes), or read in this process (in-process training, Tune trials), in the same order,
so all of them train the same model.

A `FilmSet` names one split's films without holding them: the original files of a split of
records.json, or the ok rows of one split of an enhanced shard build. Its rows, in a fixed order
(a seeded permutation of the split; a shard build's own order), are batches of

    index  int64       the film's place in its source (the split's records, the build's order)
    image  uint8 R x R the film resized to the crop's parent size (augmented and cropped later)
    label  int64

Nothing here keeps a split in memory: a worker holds the batches in flight and the training
shuffle buffer (`shuffled_rows`, `data.shuffle_buffer` films), whatever the size of the data set.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cycle.data.records import ScanResult, records_of
from cycle.data.shards import OK, decode_png, read_manifest, shard_files
from cycle.data.transforms import (
    Augment,
    ImageLoadError,
    Preprocess,
    decode_grayscale,
    preprocess_from_config,
)

if TYPE_CHECKING:  # torch loads where tensors are made: Ray Data's decode tasks never need it
    import torch

# Rows per block of a film stream: Ray Data's unit of work and of the in-process reader.
ROWS_PER_BLOCK = 64
# What a Ray Data ingest task asks for: a share of a CPU, so that trainers holding whole CPUs on
# a small machine (2 trainers on `ray start --head`'s 2 CPUs) still leave room for them.
INGEST_TASK_CPUS = 0.25


def read_bytes(path: str) -> bytes:
    """A file's bytes: a local path, or a URI pyarrow reads (s3://, gs://, ...)."""
    if "://" not in path:
        with open(path, "rb") as handle:
            return handle.read()
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as handle:
        return handle.read()


@dataclass(frozen=True)
class FilmSet:
    """One split's films. `kind` "records": the originals of split `split` of `source`
    (records.json), in the order of a permutation drawn from `seed`; "shards": the ok rows of
    split `split` of the shard build in `source`, in the build's order. Plain values: it travels to
    Ray Train workers in the loop config."""

    kind: str
    source: str
    split: str
    seed: int = 0

    @classmethod
    def originals(cls, records: str | Path, split: str, seed: int) -> FilmSet:
        return cls("records", str(Path(records).resolve()), split, seed)

    @classmethod
    def enhanced(cls, shard_dir: str | Path, split: str) -> FilmSet:
        return cls("shards", str(Path(shard_dir).resolve()), split)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- what the driver and the loop know without reading a film ----------------------------

    def label_counts(self) -> tuple[int, int]:
        """(NORMAL, PNEUMONIA) films in the set."""
        if self.kind == "records":
            labels = [r.label for r in records_of(ScanResult.load(self.source).records, self.split)]
            return labels.count(0), labels.count(1)
        counts = read_manifest(self.source, verify=False)["counts"]["by_split_label"]
        mine = counts.get(self.split, {})
        return int(mine.get("0", 0)), int(mine.get("1", 0))

    def __len__(self) -> int:
        return sum(self.label_counts())

    def records(self):
        """The split's records, by index (original films only: their predictions name the file)."""
        if self.kind != "records":
            raise ValueError("enhanced films carry no records of their own")
        return records_of(ScanResult.load(self.source).records, self.split)

    def listing(self) -> list[dict]:
        """The rows to read, in the set's order, as {index, path, label, row}: each original film
        (row -1), or each ok row of the split in a shard build (its file and its row there; the
        files in order hold the build's order). Names and numbers only: a pass over the shard
        files' small columns, never their films."""
        if self.kind == "shards":
            import pyarrow.parquet as pq

            rows = []
            for path in shard_files(self.source, verify=False):
                table = pq.read_table(path, columns=["position", "label", "split", "status"])
                columns = {name: table.column(name).to_pylist() for name in table.column_names}
                for row, (position, label, split, status) in enumerate(zip(*columns.values())):
                    if split == self.split and status == OK:
                        rows.append({"index": position, "path": path, "label": label, "row": row})
            return rows
        records = self.records()
        order = np.random.default_rng([self.seed, 11]).permutation(len(records))
        return [
            {"index": int(i), "path": records[i].path, "label": int(records[i].label), "row": -1}
            for i in order
        ]

    # -- reading -----------------------------------------------------------------------------

    def ray_dataset(
        self, preprocess: Preprocess, max_pixels: int, tasks: int = 2, decode: bool = True
    ):
        """A Ray Dataset of the set's rows, in the set's order where the execution preserves
        order. `decode`: read and decoded by Ray Data tasks on the cluster's nodes (a share of a
        CPU each, `tasks` at a time); otherwise the listing's rows (what to read, never pixels),
        which `decoded_rows` turns into films where they arrive."""
        import ray.data

        listing = self.listing()
        blocks = max(1, -(-len(listing) // ROWS_PER_BLOCK))
        ds = ray.data.from_items(listing, override_num_blocks=blocks)
        if not decode:
            return ds
        # (ray.data's own parquet reader would spend seconds a pass on metadata the manifest and
        # the listing already hold.)
        return ds.map_batches(
            decode_rows,
            fn_kwargs={"preprocess": preprocess, "max_pixels": max_pixels},
            batch_format="numpy",
            batch_size=ROWS_PER_BLOCK,
            num_cpus=INGEST_TASK_CPUS,
            compute=ray.data.TaskPoolStrategy(size=min(tasks, blocks)),
        )

    def decoded_rows(self, listings: Iterable[dict], preprocess: Preprocess, max_pixels: int):
        """Listing batches -> decoded batches, in order, decoded in threads a batch or two ahead of
        the consumer."""
        reads = (partial(decode_rows, b, preprocess, max_pixels) for b in listings)
        for batch in _prefetched(reads):
            if len(batch["index"]):
                yield batch

    def local_batches(self, preprocess: Preprocess, max_pixels: int) -> Iterator[dict]:
        """The same rows read in this process, in the same order, a block at a time (decoded in
        threads a block or two ahead: PIL, OpenCV and pyarrow release the GIL)."""
        listing = self.listing()
        blocks = (
            _columns(listing[start : start + ROWS_PER_BLOCK])
            for start in range(0, len(listing), ROWS_PER_BLOCK)
        )
        return self.decoded_rows(blocks, preprocess, max_pixels)


class FilmStreams:
    """A stage's film sets and how this process reads them: a Ray Train worker from its dataset
    shards (`get_dataset_shard`: train, its part; the other sets, whole), anything else from disk,
    in the same order.

    A set read whole once is kept, decoded, while all kept sets fit in `cache_mb` (per process),
    and read from memory afterwards: a small set decodes once, a large one streams every pass.
    The kept rows are the stream's rows in the stream's order, so both give the same answer."""

    def __init__(self, sets: dict[str, FilmSet], data_cfg, from_ray: bool):
        self.sets = sets
        self.preprocess = preprocess_from_config(data_cfg)
        self.max_pixels = data_cfg.max_image_pixels
        self.from_ray = from_ray
        self.decode_on_worker = data_cfg.decode == "worker"
        self.budget = int(data_cfg.cache_mb * 2**20)
        self.kept: dict[str, list[dict]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.sets

    def batches(self, name: str) -> Iterator[dict]:
        """Blocks of decoded rows of one set, in the set's order (train: this rank's part). A
        pass stopped early (train.max_steps_per_epoch) keeps nothing."""
        if name in self.kept:
            yield from self.kept[name]
            return
        room = self.budget - sum(_nbytes(b) for blocks in self.kept.values() for b in blocks)
        kept: list[dict] | None = []
        for batch in self._stream(name):
            if kept is not None:
                room -= _nbytes(batch)
                # A copy: Ray's blocks live in its object store, which must not stay pinned.
                if room < 0:
                    kept = None
                else:
                    kept.append({k: np.array(v) for k, v in batch.items()})
            yield batch
        if kept is not None:
            self.kept[name] = kept

    def _stream(self, name: str) -> Iterator[dict]:
        if self.from_ray:
            import ray.train

            shard = ray.train.get_dataset_shard(name)
            if not self.decode_on_worker:
                return shard.iter_batches(batch_size=ROWS_PER_BLOCK, batch_format="numpy")
            listings = shard.iter_batches(batch_size=ROWS_PER_BLOCK, batch_format="numpy")
            return self.sets[name].decoded_rows(listings, self.preprocess, self.max_pixels)
        return self.sets[name].local_batches(self.preprocess, self.max_pixels)


def _nbytes(batch: dict) -> int:
    return sum(np.asarray(v).nbytes for v in batch.values())


def _prefetched(reads: Iterable[Callable[[], dict]], ahead: int = 2) -> Iterator[dict]:
    """The results of `reads`, in order, each started up to `ahead` reads early in threads."""
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque = deque()
        for read in reads:
            pending.append(pool.submit(read))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _columns(rows: list[dict]) -> dict:
    return {key: np.array([row[key] for row in rows]) for key in rows[0]} if rows else {}


def decode_rows(batch: dict, preprocess: Preprocess, max_pixels: int) -> dict:
    """Listing rows -> {index, image, label}: original films (row -1) decoded and resized, shard
    rows decoded from their files (each file read once a batch)."""
    if len(batch["row"]) and int(batch["row"][0]) >= 0:
        return decode_shard_rows(batch)
    return decode_original_rows(batch, preprocess, max_pixels)


def decode_original_rows(batch: dict, preprocess: Preprocess, max_pixels: int) -> dict:
    """{index, path, label} -> {index, image, label}. A film that no longer decodes (it did when
    records.json was made) stops the stage, naming it: training on a silently smaller set is
    worse than an error."""
    paths = [str(p) for p in batch["path"]]
    r = preprocess.resize_to
    images = np.zeros((len(paths), r, r), np.uint8)
    for i, path in enumerate(paths):
        try:
            images[i] = preprocess.resize(decode_grayscale(read_bytes(path), max_pixels))
        except (OSError, ImageLoadError) as err:
            raise ImageLoadError(f"{path}: {err}") from err
    return {
        "index": np.asarray(batch["index"], np.int64),
        "image": images,
        "label": np.asarray(batch["label"], np.int64),
    }


def decode_shard_rows(batch: dict) -> dict:
    """{index, path, label, row} of shard rows -> {index, image, label}: each row's enhanced film
    (a PNG at the pre-crop size) from its file. One file's column at a time, its rows decoded
    before the next is read: a split's rows are spread over every file of the build (val among
    train), so a batch's files grow in number with the build."""
    import pyarrow.parquet as pq

    paths = [str(p) for p in batch["path"]]
    films: list = [None] * len(paths)
    rows_of: dict[str, list[int]] = {}  # each file once, in order, with the batch's rows in it
    for i, path in enumerate(paths):
        rows_of.setdefault(path, []).append(i)
    for path, wanted in rows_of.items():
        column = pq.read_table(path, columns=["image"]).column("image")
        pngs = column.take([int(batch["row"][i]) for i in wanted]).to_pylist()
        del column
        for i, png in zip(wanted, pngs):
            films[i] = decode_png(png)
    r = films[0].shape[0] if films else 0
    return {
        "index": np.asarray(batch["index"], np.int64),
        "image": np.stack(films) if films else np.zeros((0, r, r), np.uint8),
        "label": np.asarray(batch["label"], np.int64),
    }


# ---------------------------------------------------------------------------------------------
# Order


def shuffled_rows(
    batches: Iterable[dict], capacity: int, rng: np.random.Generator
) -> Iterator[tuple[int, np.ndarray, int]]:
    """(index, image, label) rows of `batches` in a shuffled order: a buffer of `capacity` rows,
    each incoming row taking the place of one drawn at random, which leaves; what remains at the
    end leaves in a random order. One draw per row, so the order depends on the rows and the
    generator only, never on how the rows were cut into batches. With capacity >= the rows, a
    uniform permutation of them all."""
    buffer: list[tuple[int, np.ndarray, int]] = []
    for batch in batches:
        for index, image, label in zip(batch["index"], batch["image"], batch["label"]):
            row = (int(index), image, int(label))
            if len(buffer) < capacity:
                buffer.append(row)
                continue
            slot = int(rng.integers(capacity))
            yield buffer[slot]
            buffer[slot] = row
    for slot in rng.permutation(len(buffer)):
        yield buffer[int(slot)]


def in_order_rows(batches: Iterable[dict]) -> Iterator[tuple[int, np.ndarray, int]]:
    for batch in batches:
        for index, image, label in zip(batch["index"], batch["image"], batch["label"]):
            yield int(index), image, int(label)


def to_tensors(
    rows: list[tuple[int, np.ndarray, int]],
    preprocess: Preprocess,
    augment: Augment | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Rows -> (images [N, 1, S, S], labels [N], indices): augmented with draws fixed by (seed,
    epoch, film), so a resumed or re-batched run sees the same images; cropped, normalised."""
    import torch

    crops = np.empty((len(rows), preprocess.size, preprocess.size), np.uint8)
    for i, (index, image, _) in enumerate(rows):
        if augment is not None:
            image = augment(image, np.random.default_rng([seed, epoch, index]))
        crops[i] = preprocess.crop(image)
    # One allocation a batch, not one a film: glibc kept the churn of film-sized tensors as memory
    # that grew with the length of a pass.
    images = preprocess.normalise_batch(crops)
    labels = torch.tensor([label for _, _, label in rows], dtype=torch.int64)
    return images, labels, [index for index, _, _ in rows]
