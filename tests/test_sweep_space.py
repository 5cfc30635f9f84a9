"""Search spaces, the objective and the sweep's bookkeeping, without Ray."""

from pathlib import Path

import numpy as np
import pytest

from cycle.config import Config, ConfigError, load_config
from cycle.report import sweep_table
from cycle.runner import should_stop
from cycle.sweep import (
    best_config,
    best_overrides,
    check_objective,
    objective,
    read_space,
    trial_config,
    validate_space,
)

SPACES = Path(__file__).resolve().parent.parent / "tune_spaces"


@pytest.mark.parametrize("name", ["default.yaml", "architectures.yaml", "smoke.yaml"])
def test_shipped_spaces_are_valid(name):
    validate_space(read_space(SPACES / name), Config(), source=name)


def test_a_typo_in_a_key_fails_naming_the_key_and_the_allowed_ones(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("enhance.strenght: {uniform: [0.5, 1.0]}\nmodel.arch: {choice: [resnet18]}\n")
    with pytest.raises(ConfigError, match=r"enhance.strenght: unknown key.*strength"):
        validate_space(read_space(path), Config())


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"model.arch": {"choice": ["resnet18", "resnet999"]}}, "model.arch"),
        ({"enhance.strength": {"uniform": [0.5, 1.5]}}, "enhance.strength"),
        ({"cycles.lr": {"loguniform": [0.0, 1e-3]}}, "low > 0"),
        ({"train.epochs": {"randint": [5, 2]}}, "low < high"),
        ({"train.epochs": {"between": [1, 2]}}, "expected one sampler"),
        ({"train.epochs": {"choice": []}}, "non-empty list"),
        ({"model": {"choice": [1]}}, "model"),
    ],
)
def test_bad_samplers_and_values_fail_before_any_trial(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_space(spec, Config())


def test_unfreeze_takes_ints_and_all_and_randint_excludes_its_high_end():
    validate_space({"model.unfreeze": {"choice": [0, 2, "all"]}}, Config())
    validate_space({"train.epochs": {"randint": [1, 2]}}, Config())  # probes 1 only
    with pytest.raises(ConfigError):
        validate_space({"train.epochs": {"randint": [0, 2]}}, Config())  # 0 epochs is refused


def test_objective_is_val_accuracy_plus_weighted_val_lung_share_and_never_test():
    cfg = load_config(None, ["sweep.lung_weight=2.0"])
    metrics = {
        "val_accuracy": 0.8,
        "val_lung_energy_share": 0.25,
        "lung_energy_share": 0.9,
        "test_accuracy": 1.0,
    }
    assert objective(metrics, cfg) == pytest.approx(1.3)
    single = load_config(None, ["sweep.objective=val_lesion_pointing_game"])
    with pytest.raises(KeyError, match="val_lesion_pointing_game"):
        objective(metrics, single)
    assert objective({**metrics, "val_lesion_pointing_game": 0.4}, single) == 0.4
    check_objective(single)
    with pytest.raises(ConfigError, match="never chosen on test"):
        check_objective(load_config(None, ["sweep.objective=test_accuracy"]))


def test_trial_config_trains_in_the_trial_one_arch_untracked():
    cfg = trial_config(
        Config(), {"model.arch": "resnet50", "enhance.strength": 0.6}, "/tmp/sweep/trials"
    )
    assert cfg.cycles.archs == ["resnet50"] and cfg.enhance.strength == 0.6
    assert (
        cfg.resources.num_workers == 0
        and not cfg.tracking.enabled
        and cfg.output_dir == "/tmp/sweep/trials"
    )
    assert Path(cfg.data.phantom.out_dir).is_absolute()  # every trial reads the one phantom tree


def test_summary_best_overrides_and_best_config_round_trip(tmp_path):
    rows = [
        {
            "trial_id": "a",
            "values": {"enhance.strength": 0.75, "model.unfreeze": "all"},
            "objective": 1.1,
            "cycles": 2,
            "status": "finished",
        },
        {
            "trial_id": "b",
            "values": {"enhance.strength": 0.5, "model.unfreeze": 1},
            "objective": np.nan,
            "cycles": 1,
            "status": "stopped early",
        },
    ]
    space = {"enhance.strength": {}, "model.unfreeze": {}}
    table = sweep_table(rows, space, "val_accuracy+lung")
    assert "| 1 | a | 0.75 | all | 1.1000 | 2 | finished |" in table and "stopped early" in table
    overrides = best_overrides(rows[0])
    assert overrides == ["enhance.strength=0.75", "model.unfreeze=all"]
    assert load_config(None, overrides) == best_config(Config(), rows[0])
    from cycle.config import dump_yaml

    (tmp_path / "best.yaml").write_text(dump_yaml(best_config(Config(), rows[0])))
    assert load_config(tmp_path / "best.yaml").enhance.strength == 0.75


def test_stop_rule_decides_on_val_not_test():
    base = {"val_accuracy": 0.9, "val_lung_energy_share": 0.20, "lung_energy_share": 0.20}
    assert should_stop([base], 0.01, 0.1) is None
    gained_on_test_only = {
        "val_accuracy": 0.9,
        "val_lung_energy_share": 0.205,
        "lung_energy_share": 0.5,
    }
    assert "lung energy share gained" in should_stop([base, gained_on_test_only], 0.01, 0.1)
    gained = {"val_accuracy": 0.85, "val_lung_energy_share": 0.3, "lung_energy_share": 0.2}
    assert should_stop([base, gained], 0.01, 0.1) is None
    collapsed = {"val_accuracy": 0.7, "val_lung_energy_share": 0.5}
    assert "val accuracy fell" in should_stop([base, collapsed], 0.01, 0.1)
