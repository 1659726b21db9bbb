"""`lorafleet serve`'s options are built from ServeConfig: one flag per field, the defaults
and bounds ServeConfig's own, errors naming the flag the user typed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from registry.errors import LorafleetError
from serving.cli.serve import LISTEN_OPTIONS, config_from_args, option_of
from serving.serve_config import ServeConfig


def parse(*argv: str) -> argparse.Namespace:
    from serving.cli.serve import add_serve_commands

    parser = argparse.ArgumentParser(prog="lorafleet")
    add_serve_commands(parser.add_subparsers())
    return parser.parse_args(["serve", "--base", "b", *argv])


def flags() -> dict[str, str]:
    return {name: option_of(name, f).flags[0] for name, f in ServeConfig.model_fields.items()}


def test_every_field_has_its_flag_and_help() -> None:
    parser = argparse.ArgumentParser(prog="lorafleet")
    from serving.cli.serve import add_serve_commands

    add_serve_commands(parser.add_subparsers())
    text = parse_help(parser)
    for name, flag in flags().items():
        assert flag in text, f"no flag for ServeConfig.{name}"
    assert "--pin NAME" in text and "--drift-threshold SIGNAL=VALUE" in text
    assert "(default 8)" in text  # max_adapters' default, read from ServeConfig
    assert set(LISTEN_OPTIONS) == {"host", "port"}  # the only options that are not fields


def parse_help(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return str(sub.choices["serve"].format_help())


def test_no_options_give_serve_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    monkeypatch.delenv("LORAFLEET_INFERENCE_KEY", raising=False)
    config = config_from_args(parse())
    assert config == ServeConfig(base=Path("b").resolve())


def test_options_reach_the_config(tmp_path: Path) -> None:
    args = parse(
        "--home",
        str(tmp_path),
        "--max-adapters",
        "3",
        "--engine",
        "hf",
        "--pin",
        "alpha",
        "--pin",
        "beta",
        "--no-drift",
        "--drift-threshold",
        "prompt_tokens=0.3",
        "--no-canary-verdicts",
        "--canary-interval-s",
        "2.5",
    )
    config = config_from_args(args)
    expected: dict[str, Any] = {
        "home": tmp_path.resolve(),
        "max_adapters": 3,
        "engine": "hf",
        "pinned": ["alpha", "beta"],
        "drift": False,
        "drift_thresholds": {"prompt_tokens": 0.3},
        "canary_verdicts": False,
        "canary_interval_s": 2.5,
    }
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.max_rank == ServeConfig.model_fields["max_rank"].default


def test_errors_name_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LorafleetError) as caught:
        config_from_args(parse("--max-adapters", "0", "--max-batch", "5000"))
    message = str(caught.value)
    assert "--max-adapters: Input should be greater than or equal to 1 (got 0)" in message
    assert "--max-batch: Input should be less than or equal to 1024 (got 5000)" in message
    with pytest.raises(LorafleetError, match="--drift-threshold 'prompt_tokens' is not SIGNAL"):
        config_from_args(parse("--drift-threshold", "prompt_tokens"))
    with pytest.raises(LorafleetError, match="unknown drift signal 'nope'"):
        config_from_args(parse("--drift-threshold", "nope=0.2"))
    with pytest.raises(SystemExit):  # argparse: not an integer
        parse("--max-adapters", "many")
