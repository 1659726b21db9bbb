"""The tune config: every problem reported at once, overrides, commented defaults."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tuning.config import TuneConfig, default_yaml, load_config
from tuning.errors import ConfigError


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(tmp_path / "missing-base"),
                "data": {"train": [str(tmp_path / "nope.jsonl")], "format": "xml"},
                "method": {"r": 0, "colour": "red"},
                "training": {"lr": -1, "schedule": "step"},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.batch_size=0"])
    message = str(err.value)
    for fragment in (
        "data.format",
        "'xml'",
        "method.r",
        "method.colour: Extra inputs are not permitted",
        "training.lr",
        "training.schedule",
        "training.batch_size",
        "data.train[0]: Value error, file",
    ):
        assert fragment in message, fragment
    assert message.startswith("7 problem(s) in")


def test_missing_files_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                f"base={tmp_path}/b",
                f"data.train=[{tmp_path}/t.jsonl]",
                f"data.eval=[{tmp_path}/e.jsonl]",
                f"output.dir={tmp_path}/o",
            ],
        )
    message = str(err.value)
    assert "data.train[0]: Value error, file" in message and "data.eval[0]: Value error" in message


def test_missing_base_is_reported(tmp_path: Path) -> None:
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_config(None, [f"base={tmp_path}/b", f"data.train=[{data}]", f"output.dir={tmp_path}"])


def test_overrides_are_yaml_and_nested(tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello"}\n')
    config = load_config(
        None,
        [
            f"base={tiny_base}",
            f"data.train=[{data}]",
            "data.format=text",
            f"output.dir={tmp_path}",
            "method.target_modules=all-linear",
            "training.lr=3e-4",
            "register.name=x",
        ],
    )
    assert config.method.target_modules == "all-linear"
    assert config.training.lr == 3e-4
    assert config.registry.name == "x"
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_config(None, ["training.lr"])


def test_print_defaults_is_a_complete_commented_config(cli: Callable[..., object]) -> None:
    result = cli("tune", "--print-defaults")
    assert result.returncode == 0
    assert result.stdout == default_yaml()
    parsed = yaml.safe_load(result.stdout)
    assert set(parsed) == {a.alias or n for n, a in TuneConfig.model_fields.items()}
    assert "# LoRA+ ratio: the B matrices train at lr * lr_ratio_b." in result.stdout
    assert parsed["training"]["lr"] == 1e-3


def test_cli_config_error_is_one_line(cli: Callable[..., object], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training: {lr: -1}\n")
    result = cli("tune", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "training.lr" in result.stderr and "base: Field required" in result.stderr
