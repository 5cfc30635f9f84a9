"""The run folder, in one place: every file one stage writes and a later stage, tracking, the
report, the evidence study or a sweep reads back is named here, and nowhere else.

    <output_dir>/<run>/
        config.yaml, run.json       the run's config and its hash (cycle.run_config)
        records.json                the scanned films
        mlflow_run.json             the job's MLflow run (a resumed job reopens it)
        results.json, timings.json, report.md, cycle_curves.png, registered.json
        cycle_<k>/<arch>/
            shards/     data/ (parquet + manifest.json), samples.png, DONE
            train/      best.pt, last.pt, history.json, metrics.json, predictions_<split>.csv,
                        localization_<split>*.json|npz (CAMs of best.pt, measured where it
                        trained), ray_checkpoint/, ray_final/ (staged for Ray's storage), DONE
            evaluate/   metrics.json, panel.npz, per_image.npz, mlflow_run.json, pictures, DONE

A stage's folder is finished when its DONE marker exists (the runner also checks that what later
stages read is still readable). The config a (cycle, architecture) trains with is derived here
too (`stage_config`), so training and the MLflow run that records it cannot disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cycle.config import Config
from cycle.io import atomic_write_json

# In a stage's folder
DONE = "DONE"
BEST = "best.pt"  # the weights with the lowest val loss: what the next cycle starts from
LAST = "last.pt"  # the newest epoch's training state: what a resumed stage starts from
HISTORY = "history.json"  # one row per epoch
EPOCH_LOG = "epochs.log"  # one line per epoch executed (history.json is rebuilt from LAST)
STARTED = "started.json"  # a training worker began: the driver's watchdog knows it got resources
METRICS = "metrics.json"
PANEL = "panel.npz"  # the fixed test films, their CAMs and lungs: the pictures' source
PER_IMAGE = "per_image.npz"  # localisation per test film: what the evidence study pairs
MLFLOW_RUN = "mlflow_run.json"
RAY_CHECKPOINT = "ray_checkpoint"  # the newest epoch, staged for Ray's storage
RAY_FINAL = "ray_final"  # the stage's files for later stages, staged for Ray's storage
LOCALIZED = "localized.json"  # where and how long the CAMs of the chosen weights were measured
SHARD_DATA = "data"
SAMPLES = "samples.png"
CAM_GRID = "cam_grid.png"
CAM_BEFORE_AFTER = "cam_before_after.png"
ROC_PR = "roc_pr.png"

# In the run's folder
RECORDS = "records.json"
RESULTS = "results.json"
TIMINGS = "timings.json"  # wall seconds per stage, cycle and architecture
REPORT = "report.md"
CURVES = "cycle_curves.png"
REGISTERED = "registered.json"
SAVED_CONFIG = "config.yaml"
RUN_INFO = "run.json"

STAGES = ("shards", "train", "evaluate")


def predictions(split: str) -> str:
    """The per-film predictions of a split, beside the training stage's metrics."""
    return f"predictions_{split}.csv"


def localization_files(split: str) -> tuple[str, str, str]:
    """What a training stage measured of its best weights' CAMs on a split, for the evaluation
    stage: the summary, each film's values, the panel (test only)."""
    stem = f"localization_{split}"
    return f"{stem}.json", f"{stem}_per_image.npz", f"{stem}_panel.npz"


def per_image_at_depth(depth: int) -> str:
    """Localisation per test film re-scored at another CAM depth (the evidence study's)."""
    return f"per_image_depth{depth}.npz"


@dataclass(frozen=True)
class RunLayout:
    """The folders and files of one run, `output_dir/<name>`."""

    root: Path

    @classmethod
    def of(cls, cfg: Config, name: str) -> RunLayout:
        return cls(Path(cfg.output_dir) / name)

    @property
    def name(self) -> str:
        return self.root.name

    def cycle(self, k: int) -> Path:
        return self.root / f"cycle_{k}"

    def stage(self, k: int, arch: str, name: str) -> Path:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        return self.cycle(k) / arch / name

    def train(self, k: int, arch: str) -> Path:
        return self.stage(k, arch, "train")

    def shards(self, k: int, arch: str) -> Path:
        return self.stage(k, arch, "shards")

    def evaluate(self, k: int, arch: str) -> Path:
        return self.stage(k, arch, "evaluate")

    def best(self, k: int, arch: str) -> Path:
        """The weights cycle k chose for `arch` (on val)."""
        return self.train(k, arch) / BEST

    def file(self, name: str) -> Path:
        """A file of the run's own folder (RECORDS, RESULTS, REPORT, ...)."""
        return self.root / name

    def finished_cycles(self, arch: str) -> list[int]:
        """The cycles whose evaluation of `arch` finished, in order."""
        found = (d for d in self.root.glob("cycle_*") if d.name[len("cycle_") :].isdigit())
        return sorted(
            int(d.name[len("cycle_") :]) for d in found if marked_done(d / arch / "evaluate")
        )

    def trained_cycles(self, arch: str | None = None) -> list[Path]:
        """The best.pt of every cycle that has one (of `arch`, or of any), oldest cycle first."""
        pattern = f"cycle_*/{arch or '*'}/train/{BEST}"
        return sorted(self.root.glob(pattern), key=lambda p: int(p.parts[-4][len("cycle_") :]))


def marked_done(stage_dir: Path) -> bool:
    return (stage_dir / DONE).is_file()


def mark_done(stage_dir: Path, info: dict | None = None) -> None:
    atomic_write_json(stage_dir / DONE, {"finished": time.time(), **(info or {})})


def stage_config(cfg: Config, layout: RunLayout, k: int, arch: str) -> Config:
    """The config of one (cycle, architecture) training stage: the baseline trains `arch` as
    configured; cycle k > 0 fine-tunes the previous cycle's best weights with the cycle settings
    and a fresh shuffle (still fixed by the seed)."""
    if k == 0:
        return cfg.with_overrides({"model.arch": arch})
    return cfg.with_overrides(
        {
            "model.arch": arch,
            "model.weights_path": str(layout.best(k - 1, arch)),
            "model.pretrained": False,
            "train.epochs": cfg.cycles.epochs,
            "train.lr": cfg.cycles.lr,
            "seed": cfg.seed + k,
        }
    )
