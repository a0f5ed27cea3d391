"""Config: defaults validate, overrides map onto fields, bad values fail early with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtail.config import (
    ConfigError,
    FedtailConfig,
    apply_overrides,
    build_config,
    from_run_config,
    load_config,
    parse_override,
    to_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_and_presets_validate() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.dataset.name == "digits"
    assert cfg.num_tasks == 10 // cfg.tasks.classes_per_task
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(preset)


def test_set_overrides_are_parsed_as_yaml() -> None:
    assert parse_override("partition.alpha=0.1") == ("partition.alpha", 0.1)
    assert parse_override("tasks.classes_per_task=null") == ("tasks.classes_per_task", None)
    cfg = load_config(ROOT / "params.yaml", ["partition.alpha=0.1", "tasks.classes_per_task=null"])
    assert cfg.partition.alpha == 0.1 and cfg.num_tasks == 1


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ({"partition.alpha": 0}, "partition.alpha", "greater than 0"),
        ({"partition.alpha": -1.0}, "partition.alpha", "greater than 0"),
        ({"federation.num_clients": 5000}, "num_clients", "allowed: 1.."),
        ({"tasks.classes_per_task": 3}, "tasks.classes_per_task", "[1, 2, 5, 10]"),
        ({"strategy.name": "fedmagic"}, "strategy.name", "known: fedavg"),
        ({"train.objective": "nope"}, "train.objective", "known: ce"),
        ({"continual.method": "nope"}, "continual.method", "known: finetune"),
        ({"dataset.name": "imagenet"}, "dataset.name", "known: "),
        ({"engine.name": "spark"}, "engine.name", "inprocess"),
        ({"train.lr": 0}, "train.lr", "greater than 0"),
        ({"partition.bogus": 1}, "partition.bogus", "unknown field"),
    ],
)
def test_invalid_values_name_field_and_allowed(override: dict, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(apply_overrides({}, override))
    text = str(err.value)
    assert field in text and hint in text, text


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("partition.alpha")


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("does-not-exist.yaml")


def test_flower_run_config_round_trip() -> None:
    cfg = build_config({"partition": {"alpha": 0.2}, "tasks": {"classes_per_task": None}})
    flat = to_run_config(cfg)
    assert flat["partition.alpha"] == 0.2
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert from_run_config(flat) == cfg


def test_flower_run_config_file_plus_overrides() -> None:
    cfg = from_run_config({"config-file": "params.yaml", "partition.alpha": 0.05}, root=ROOT)
    assert cfg.partition.alpha == 0.05
    assert cfg.federation.num_clients == load_config(ROOT / "params.yaml").federation.num_clients


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = FedtailConfig(), FedtailConfig()
    assert a.fingerprint() == b.fingerprint()
    c = build_config({"seed": 1})
    assert a.fingerprint() != c.fingerprint()
    assert a.fingerprint("dataset") == c.fingerprint("dataset")
