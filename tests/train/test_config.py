"""Config errors name the dotted field; YAML and --set overrides resolve to typed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.train.config import ConfigError, TrainConfig, apply_overrides, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("raw, field", [
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"batch_size": 0}}, "optim.batch_size"),
    ({"optim": {"schedule": "exp"}}, "optim.schedule"),
    ({"optim": {"lora_plus_ratio": 0.5}}, "optim.lora_plus_ratio"),
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"lora": {"targets": []}}, "lora.targets"),
    ({"lora": {"dropout": 1.5}}, "lora.dropout"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset"),
    ({"data": {"dataset": "text-file"}}, "data.path"),
    ({"run": {"precision": "fp8"}}, "run.precision"),
    ({"task": "translation"}, "task"),
    ({"optim": {"learning_rate": 1e-3}}, "optim.learning_rate"),
    ({"optimizer": {}}, "optimizer"),
])
def test_errors_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        TrainConfig.from_dict(raw)


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=5e-4", "lora.targets=[query, value]", "run.seed=7"])
    cfg = TrainConfig.from_dict(raw)
    assert cfg.optim.lr == 5e-4 and cfg.lora.targets == ["query", "value"] and cfg.run.seed == 7


def test_bad_override_is_named() -> None:
    with pytest.raises(ConfigError, match="optim.lr"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"'optim\.lr' is not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match=r"\['a'\]: unknown"):
        TrainConfig.from_dict(apply_overrides({}, ["a.b.c=1"]))


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: -3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.lr'"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
