"""Typed configuration: one pydantic model, loaded from YAML, overridden with `--set a.b=value`.

The defaults of the model *are* the embedded default (phantoms on a CPU); `configs/default.yaml`
spells them out for people and a test keeps the two equal. Every mistake fails at start with a
message naming the key and, where the set is closed, the allowed values. Architectures and
enhancement modes are checked against their registries (cycle.registry), so a newly registered
one is a valid value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from cycle.registry import ARCHITECTURES, ENHANCE_MODES

# Names checked against their registries when a config is validated (the registry imports its
# built-ins, torch included, then; not when this module is imported).
ArchName = Annotated[str, AfterValidator(lambda name: ARCHITECTURES.check(name))]
ModeName = Annotated[str, AfterValidator(lambda name: ENHANCE_MODES.check(name))]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the key."""


class Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(Section):
    out_dir: str | None = None  # default: {output_dir}/phantoms
    size: int = Field(256, ge=64, le=2048)
    n_train: int = Field(800, ge=8)
    n_val: int = Field(16, ge=0)  # the Kaggle-like tiny val split; folded into train on load
    n_test: int = Field(300, ge=4)
    n_test_cf: int = Field(300, ge=0)
    pneumonia_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # P(tag | PNEUMONIA) = P(no tag | NORMAL) in train/val/test; reversed in test_cf.
    shortcut: float = Field(0.9, ge=0.5, le=1.0)
    # P(wide unexposed border | NORMAL) = P(narrow | PNEUMONIA); reversed in test_cf.
    border_shortcut: float = Field(0.75, ge=0.5, le=1.0)
    images_per_patient: int = Field(2, ge=1, le=10)
    seed: int = 0


class DataConfig(Section):
    root: str | None = None  # a Kaggle `chest_xray` tree or a .zip of it; None = phantoms
    phantom: PhantomConfig = PhantomConfig()
    val_fraction: float = Field(0.15, gt=0.0, lt=0.9)
    image_size: int = Field(96, ge=32, le=1024)
    crop_fraction: float = Field(0.875, ge=0.5, le=1.0)
    mean: float = 0.449  # ImageNet's channel means and stds, averaged: matches summed RGB filters
    std: float = Field(0.226, gt=0.0)
    max_image_pixels: int = Field(60_000_000, ge=1)
    max_zip_bytes: int = Field(32 * 2**30, ge=1)
    # Films a training worker's shuffle buffer holds: what a worker keeps of the data set in memory,
    # whatever its size (films stream from Ray Data, or from disk in-process).
    shuffle_buffer: int = Field(512, ge=1)
    # Decoded films a process keeps between passes (MB, all sets together): a set that fits is
    # read once, a larger one streams on every pass. 0: always stream.
    cache_mb: float = Field(256.0, ge=0.0)
    # Where films are decoded: "worker" (Ray Data streams each set's rows, names and paths, split
    # across the Ray Train workers, and each worker reads and decodes its rows in threads beside
    # training) or "ray_data" (Ray Data tasks on the cluster's nodes decode them and stream the
    # pixels: for GPU workers whose own CPUs cannot keep up). The same rows in the same order.
    decode: Literal["worker", "ray_data"] = "worker"
    # Ray Data tasks that read and decode one set for a training worker at once (decode=ray_data):
    # more on a cluster whose GPUs wait for films, few on a laptop where each is a process to start.
    ingest_tasks: int = Field(2, ge=1)


class ModelConfig(Section):
    arch: ArchName = "resnet18"  # a registered architecture (cycle.models.register)
    pretrained: bool = False
    weights_path: str | None = None
    unfreeze: int | Literal["all"] = "all"
    dropout: float = Field(0.3, ge=0.0, lt=1.0)

    @field_validator("unfreeze")
    @classmethod
    def _non_negative(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 'all' or an integer >= 0 (number of trailing feature blocks)")
        return value


class AugmentConfig(Section):
    enabled: bool = True
    rotation_deg: float = Field(5.0, ge=0.0, le=30.0)
    translate: float = Field(0.04, ge=0.0, le=0.3)
    scale: float = Field(0.05, ge=0.0, le=0.3)
    brightness: float = Field(0.1, ge=0.0, le=0.5)
    contrast: float = Field(0.1, ge=0.0, le=0.5)


class TrainConfig(Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "adam", "radam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    scheduler: Literal["cosine", "none"] = "cosine"
    early_stopping_patience: int = Field(5, ge=1)
    class_weights: Literal["none", "balanced"] = "none"
    amp: bool = False  # mixed precision; only used on CUDA
    max_steps_per_epoch: int | None = Field(None, ge=1)
    augment: AugmentConfig = AugmentConfig()


class CamConfig(Section):
    # auto = the faithful map for the architecture (HiResCAM for Flatten+Linear heads).
    method: Literal["auto", "gradcam", "hirescam"] = "auto"
    # Blocks before the end of `.features` where the map is taken: 0 = the last (the contract's
    # layer); 1 = one earlier, twice the resolution for ResNets; auto = the last block whose map
    # is at least 6 x 6 (cycle.cam.resolve_depth; measured in docs/evidence.md).
    depth: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    batch_size: int = Field(32, ge=1)


# lungseg.weights=phantom: the U-Net trained on the phantoms' lung masks, on any data (on real
# films an explicit choice whose mask quality is unmeasured).
PHANTOM_LUNG_MODEL = "phantom"


class LungsegConfig(Section):
    weights: str | None = None  # a U-Net's best.pt, or "phantom"; None: phantoms only
    image_size: int = Field(96, ge=32, le=1024)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0.0)


class EnhanceConfig(Section):
    mode: ModeName = "context_swap"  # a registered mode (cycle.enhance.register_mode)
    strength: float = Field(1.0, ge=0.0, le=1.0)  # context_swap: 1 = the whole context swapped
    # 0 = every CAM trusted: context_swap uses only the lung mask; set it for highlight/suppress.
    trust_threshold: float = Field(0.0, ge=0.0, le=1.0)
    fallback: Literal["original", "lung_only", "drop"] = "original"
    dilate_px: int = Field(4, ge=0)


class CyclesConfig(Section):
    max: int = Field(1, ge=0)
    archs: list[ArchName] = Field(default_factory=lambda: ["tinyvgg", "resnet18"])
    epochs: int = Field(3, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    stop_epsilon: float = Field(0.01, ge=0.0)  # stop when lung energy share gains less
    # ... or val accuracy drops more (val shares the shortcut: losing it costs some)
    stop_delta: float = Field(0.10, ge=0.0)


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's local default
    experiment: str = "cycle"
    registered_model_name: str = "cycle-classifier"
    # every: each (cycle, arch) run logs its chosen weights as a loadable MLflow model;
    # best: only the registered winner is logged (less storage)
    log_models: Literal["every", "best"] = "every"


class ResourcesConfig(Section):
    num_workers: int = Field(1, ge=0)  # Ray Train workers per architecture; 0 = in-process
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    storage_path: str | None = None  # default: $CYCLE_STORAGE_PATH, else {output_dir}/ray
    max_failures: int = Field(1, ge=0)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray
    local_num_cpus: int = Field(4, ge=1)  # logical CPUs of a local Ray (over-declared on purpose)
    # A stage that makes no progress this long (waiting for CPUs/GPUs it cannot get) says what it
    # waits for and stops; 0 = wait forever. Generous: an autoscaler takes minutes to add a node.
    stall_timeout_s: float = Field(600.0, ge=0.0)


class SweepConfig(Section):
    # "val_accuracy+lung" = val accuracy + lung_weight * val lung energy share; or any metric a
    # cycle logs (e.g. val_accuracy, val_lesion_pointing_game). Always measured on val, never test.
    objective: str = "val_accuracy+lung"
    lung_weight: float = Field(0.5, ge=0.0)
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)  # draws per grid point
    # None: on GPUs as many as the cluster can grow to hold, else half the CPUs
    max_concurrent_trials: int | None = Field(None, ge=1)
    grace_period: int = Field(1, ge=1)  # ASHA: cycles every trial runs before it can be stopped
    reduction_factor: int = Field(2, ge=2)
    cpus_per_trial: float = Field(1.0, gt=0.0)


# Config values that name files or folders (made absolute by the driver before anything runs).
PATH_KEYS = (
    "output_dir",
    "data.root",
    "data.phantom.out_dir",
    "model.weights_path",
    "lungseg.weights",
    "resources.storage_path",
)


class Config(Section):
    output_dir: str = "outputs"
    run_name: str | None = None
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    cam: CamConfig = CamConfig()
    lungseg: LungsegConfig = LungsegConfig()
    enhance: EnhanceConfig = EnhanceConfig()
    cycles: CyclesConfig = CyclesConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    sweep: SweepConfig = SweepConfig()

    def with_overrides(self, values: Mapping[str, Any], source: str = "derived config") -> Config:
        """A validated copy with dotted keys replaced, e.g. {"model.arch": "vgg16"}: the one way
        to derive a config. An unknown key is a ConfigError naming the keys allowed there."""
        raw = self.model_dump(mode="json")
        for key, value in values.items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"invalid config ({source}):\n  {key}: unknown key")
                node = node[part]
            if leaf not in node:
                raise ConfigError(
                    f"invalid config ({source}):\n  {key}: unknown key; allowed keys in "
                    f"'{'.'.join(parents)}': {', '.join(sorted(node))}"
                )
            node[leaf] = value
        return validate_config(raw, source=source)

    def with_absolute_paths(self, base: str | Path | None = None) -> Config:
        """Every local path made absolute against `base` (default: the current folder). The driver
        does this first: Ray Train and Tune move each worker into a folder of its own, where a
        relative path points nowhere."""
        base = Path(base or os.getcwd())
        values = {}
        for key in PATH_KEYS:
            value = self.value_at(key)
            if key == "lungseg.weights" and value == PHANTOM_LUNG_MODEL:
                continue  # a name, not a path
            if value and "://" not in str(value):
                values[key] = str((base / Path(value).expanduser()).resolve())
        return self.with_overrides(values) if values else self

    def value_at(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def phantom_dir(self) -> Path:
        return Path(self.data.phantom.out_dir or Path(self.output_dir) / "phantoms")

    def storage_path(self) -> str:
        """Where Ray Train/Tune keep checkpoints: the config, else $CYCLE_STORAGE_PATH (set on a
        cluster's nodes, see cluster.yaml), else under output_dir."""
        return (
            self.resources.storage_path
            or os.environ.get("CYCLE_STORAGE_PATH")
            or str(Path(self.output_dir, "ray").resolve())
        )


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- YAML file <- `a.b=value` overrides, validated once at the end."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "defaults")


def validate_config(raw: Mapping[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError(f"invalid config ({source}):\n  " + "\n  ".join(lines)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` to a nested dict; the value is parsed as YAML
    (1e-3, true, [a, b])."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"bad value for {key!r}: {err}") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"config key {key!r}: {where!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_hash(cfg: Config, *sections: str) -> str:
    """A stable hash of the whole config, or of some sections (what a stage's output depends on)."""
    dumped = cfg.model_dump(mode="json")
    if sections:
        dumped = {name: dumped[name] for name in sections}
    blob = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


_UNION_TAGS = ("literal[", "function-", "list[")
_TYPE_TAGS = ("int", "float", "bool", "str", "none")


def _describe(error: Mapping[str, Any]) -> str:
    # pydantic appends the union member it tried ('int', "literal['all']"); keep the user's path.
    loc = [str(p) for p in error["loc"]]
    key = ".".join(p for p in loc if not p.startswith(_UNION_TAGS) and p not in _TYPE_TAGS)
    if error["type"] == "extra_forbidden":
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = ", ".join(sorted(_fields_at(parent)))
        where = f"in '{parent}'" if parent else "at the top level"
        return f"{key}: unknown key; allowed keys {where}: {allowed}"
    got = error.get("input")
    msg = error["msg"]
    if error["type"] == "value_error":  # our validators' messages say it all
        msg = msg.removeprefix("Value error, ")
    return f"{key}: {msg} (got {got!r})"


def _fields_at(dotted: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in [p for p in dotted.split(".") if p]:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: a nested config as the dotted keys --set takes."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
