"""The shard build's inputs, before any model: the build's seeded order and each film's context
donor, and the decode step (bytes -> films resized to R x R) that Ray Data's tasks run. Apart
from the models so that those tasks start without loading torch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cycle.config import Config
from cycle.data.records import Record
from cycle.data.shards import OK
from cycle.data.transforms import (
    ImageLoadError,
    Preprocess,
    decode_grayscale,
    preprocess_from_config,
)
from cycle.enhance import derangement, needs_donor


def decode_batch(
    batch: dict, lookup: dict, preprocess: Preprocess, max_pixels: int, with_context: bool = False
) -> dict:
    """bytes + path -> films resized to R x R (uint8) with position, label, split, patient,
    status, reason; `with_context`: also each film's context donor (read here: the donor is fixed
    per film by the seed, not by which batch Ray Data happens to form, so a build reproduces)."""
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
        donor = meta[i][4] if with_context else ""
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
        "position": np.array([m[0] for m in meta], dtype=np.int64),
        "path": np.array(paths, dtype=object),
        "label": np.array([m[1] for m in meta], dtype=np.int64),
        "split": np.array([m[2] for m in meta], dtype=object),
        "patient": np.array([m[3] for m in meta], dtype=object),
        "status": np.array(status, dtype=object),
        "reason": np.array(reason, dtype=object),
    }


def decode_arguments(cfg: Config, lookup: dict) -> dict:
    """decode_batch's arguments, the same for Ray Data and the in-process path."""
    return {
        "lookup": lookup,
        "preprocess": preprocess_from_config(cfg.data),
        "max_pixels": cfg.data.max_image_pixels,
        "with_context": needs_donor(cfg.enhance.mode),
    }


def build_order(records: Sequence[Record], seed: int) -> tuple[list[str], dict]:
    """Absolute paths in a seeded random order (the build's order: a row's `position`), and
    path -> (position, label, split, patient, donor): each film's context donor is another film
    of the same split drawn at random across labels (a val film never borrows a training film's
    context)."""
    meta = {os.path.abspath(r.path): (r.label, r.split, r.patient) for r in records}
    paths = sorted(meta)
    rng = np.random.default_rng([seed, 101])
    paths = [paths[i] for i in rng.permutation(len(paths))]
    position = {p: i for i, p in enumerate(paths)}
    lookup = {}
    for split in sorted({m[1] for m in meta.values()}):
        members = [p for p in paths if meta[p][1] == split]
        donors = derangement(len(members), rng)
        for p, d in zip(members, donors):
            lookup[p] = (position[p], *meta[p], members[d] if len(members) > 1 else "")
    return paths, lookup


def read_and_decode(paths: Sequence[str], arguments: dict) -> dict:
    """What read_binary_files + decode_batch do in Ray Data, in this process."""
    return decode_batch(
        {"bytes": [Path(p).read_bytes() for p in paths], "path": list(paths)}, **arguments
    )
