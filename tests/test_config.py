from pathlib import Path

import pytest
import yaml

from cycle.config import Config, ConfigError, apply_override, config_hash, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_spells_out_the_embedded_defaults():
    # configs/default.yaml is documentation of Config(); the two must never drift apart.
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "kaggle_resnet101.yaml"])
def test_shipped_configs_validate(name):
    load_config(ROOT / "configs" / name)


def test_kaggle_config_has_the_original_recipe():
    cfg = load_config(ROOT / "configs" / "kaggle_resnet101.yaml")
    assert (cfg.data.image_size, cfg.data.crop_fraction) == (224, 0.75)
    assert (cfg.model.arch, cfg.model.unfreeze, cfg.model.pretrained) == ("resnet101", 1, True)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay) == ("radam", 1e-4, 1e-3)
    assert (cfg.train.scheduler, cfg.train.epochs, cfg.train.early_stopping_patience) == (
        "cosine",
        20,
        5,
    )


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "model.unfreeze=2",
            "cycles.archs=[resnet18, vgg16]",
            "train.augment.enabled=false",
            "data.root=/data/chest_xray",
        ],
    )
    assert cfg.train.lr == 3e-4
    assert cfg.model.unfreeze == 2
    assert cfg.cycles.archs == ["resnet18", "vgg16"]
    assert cfg.train.augment.enabled is False
    assert cfg.data.root == "/data/chest_xray"


def test_override_wins_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "train": {"epochs": 4}}))
    cfg = load_config(path, ["train.epochs=7"])
    assert (cfg.seed, cfg.train.epochs, cfg.train.lr) == (3, 7, Config().train.lr)


def test_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lrr=1e-3"])
    message = str(err.value)
    assert "train.lrr: unknown key" in message
    assert "lr" in message and "epochs" in message


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modell:\n  arch: resnet18\n")
    with pytest.raises(ConfigError, match="modell: unknown key; allowed keys at the top level"):
        load_config(path)


def test_bad_choice_names_the_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.arch=resnet19"])
    message = str(err.value)
    assert "model.arch" in message and "resnet19" in message
    assert "'resnet18'" in message and "'tinyvgg'" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("data.crop_fraction=1.5", "data.crop_fraction"),
        ("model.unfreeze=-2", "model.unfreeze"),
        ("cycles.archs=[resnet18, alexnet]", "cycles.archs.1"),
        ("enhance.mode=blur", "enhance.mode"),
        ("train.epochs=ten", "train.epochs"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("item", ["noequals", "=3", "a..b=1"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="bad override"):
        apply_override({}, item)


def test_override_into_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer"):
        load_config(None, ["seed.x=1"])
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(path, ["seed.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_config_hash_is_stable_and_sensitive():
    a, b = Config(), Config()
    assert config_hash(a) == config_hash(b)
    c = load_config(None, ["train.lr=0.5"])
    assert config_hash(c) != config_hash(a)
    assert config_hash(c, "data") == config_hash(a, "data")
