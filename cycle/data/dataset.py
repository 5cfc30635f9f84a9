"""Records -> tensors for training and evaluation, deterministic per (seed, epoch, image).

Films are decoded and resized once (to the crop's parent size R x R) and kept as uint8 in memory,
so only the crop, the augmentation and the normalisation run per epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from torch.utils.data import Dataset, Sampler

from cycle.console import log
from cycle.data.records import Record
from cycle.data.transforms import Augment, Preprocess, load_grayscale


class ImageDataset(Dataset):
    """Yields (image [1, S, S] float, label, index)."""

    def __init__(
        self,
        records: Sequence[Record],
        preprocess: Preprocess,
        augment: Augment | None = None,
        seed: int = 0,
        cache: bool = True,
        max_pixels: int = 60_000_000,
        resized: Sequence[np.ndarray] | None = None,
    ):
        """`resized`: films already at the preprocess's R x R (e.g. enhanced shards)."""
        self.records = list(records)
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self._cache: list[np.ndarray | None] | None = [None] * len(self.records) if cache else None
        if resized is not None:
            if len(resized) != len(self.records):
                raise ValueError(f"{len(resized)} films for {len(self.records)} records")
            self._cache = list(resized)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index): a resumed run sees the same images."""
        self.epoch = epoch

    def resized(self, index: int) -> np.ndarray:
        if self._cache is not None and self._cache[index] is not None:
            return self._cache[index]
        image = self.preprocess.resize(load_grayscale(self.records[index].path, self.max_pixels))
        if self._cache is not None:
            self._cache[index] = image
        return image

    def preload(self, workers: int | None = None, label: str = "") -> ImageDataset:
        """Decode every film now, on all cores (PIL and OpenCV release the GIL)."""
        if self._cache is None:
            return self
        todo = [i for i, img in enumerate(self._cache) if img is None]
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for n, _ in enumerate(pool.map(self.resized, todo), 1):
                if label and n % 2000 == 0:
                    log(f"  {label}: loaded {n:,}/{len(todo):,} images")
        return self

    def __getitem__(self, index: int):
        resized = self.resized(index)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            resized = self.augment(resized, rng)
        tensor = self.preprocess.normalise(self.preprocess.crop(resized))
        return tensor, self.records[index].label, index


class EpochShuffle(Sampler[int]):
    """A permutation per epoch from (seed, epoch), split across ranks into disjoint parts.

    Replaces DistributedSampler so that in-process, 1-worker and N-worker runs, fresh or
    resumed, all see a sequence fixed by the seed alone.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world_size, self.shuffle = (
            n,
            seed,
            rank,
            world_size,
            shuffle,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        else:
            order = np.arange(self.n)
        # Every rank the same number of films, so the same number of steps (DDP), and no film on
        # two ranks: the fewer than world_size left over sit this epoch out (a new draw each epoch).
        usable = len(order) - len(order) % self.world_size
        return order[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices())
