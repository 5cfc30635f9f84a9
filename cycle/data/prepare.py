"""From a config to usable records: generate phantoms if that is the data set, scan, split."""

from __future__ import annotations

from pathlib import Path

from cycle.config import Config
from cycle.console import log
from cycle.data.phantom import PhantomSpec, write_dataset
from cycle.data.records import ScanResult, load_dataset
from cycle.io import folder_lock


def data_root(cfg: Config, verbose: bool = False) -> Path:
    """The configured data root; for the embedded default, the phantom tree (made if missing)."""
    if cfg.data.root is not None:
        return Path(cfg.data.root)

    def report(done: int, total: int) -> None:
        if done == total or done % 1024 == 0:
            log(f"  phantoms: {done:,}/{total:,}")

    out = cfg.phantom_dir()
    # Jobs share the phantoms: the second waits for the first to finish them, then reuses them.
    with folder_lock(out, "the phantom data set", wait=True, log=log):
        if verbose and not (out / "chest_xray" / "phantom.json").is_file():
            log(f"generating phantom chest X-rays in {out} ...")
        # A changed phantom spec regenerates the tree: it is derived data, owned by this output dir.
        return write_dataset(
            out,
            PhantomSpec.from_config(cfg.data.phantom),
            force=True,
            progress=report if verbose else None,
        )


def prepare_records(cfg: Config, verbose: bool = False) -> ScanResult:
    root = data_root(cfg, verbose)
    return load_dataset(
        root,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        cache_dir=Path(cfg.output_dir) / "cache",
        max_pixels=cfg.data.max_image_pixels,
        max_zip_bytes=cfg.data.max_zip_bytes,
        verbose=verbose,
    )
