"""The CLI end to end, as a user types it: build a base, make a peft adapter, register,
promote, roll back, read the history; and a registry bound to another base refuses it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

REGISTRY_COMMANDS = [
    "init",
    "register",
    "list",
    "show",
    "promote",
    "rollback",
    "history",
    "alias",
    "archive",
    "fsck",
    "gc",
    "info",
    "settings",
    "pin",
    "unpin",
]


def test_help_describes_every_subcommand(cli: Callable[..., object]) -> None:
    top = cli("--help")
    assert top.returncode == 0
    for command in ("base", "registry"):
        assert command in top.stdout
    registry = cli("registry", "--help")
    for command in REGISTRY_COMMANDS:
        assert f"    {command} " in registry.stdout, command
        sub = cli("registry", command, "--help")
        assert sub.returncode == 0 and "usage: lorafleet registry" in sub.stdout
    assert "tiny" in cli("base", "--help").stdout


def test_user_walkthrough(cli: Callable[..., object], tmp_path: Path) -> None:
    base, other = tmp_path / "base", tmp_path / "other"
    home = tmp_path / "home"
    assert cli("base", "tiny", "--out", str(base)).returncode == 0
    assert cli("base", "tiny", "--out", str(other), "--seed", "7").returncode == 0
    for seed in (1, 2):
        made = cli(
            "base",
            "adapter",
            "--base",
            str(base),
            "--out",
            str(tmp_path / f"a{seed}"),
            "--rank",
            "4",
            "--seed",
            str(seed),
        )
        assert made.returncode == 0, made.stderr

    def ok(*args: str) -> str:
        result = cli(*args, home=home, env={"LORAFLEET_ACTOR": "alice"})
        assert result.returncode == 0, result.stderr
        return result.stdout

    ok("registry", "init", "--base", str(base))
    assert "registered support@1" in ok("registry", "register", "support", str(tmp_path / "a1"))
    ok("registry", "register", "support", str(tmp_path / "a2"), "--reason", "more data")
    assert "support:production -> 1" in ok("registry", "promote", "support", "1")
    assert "-> 2 (was 1)" in ok("registry", "promote", "support", "2", "--reason", "eval +3%")
    assert "-> 1 (was 2)" in ok("registry", "rollback", "support", "--reason", "latency")
    history = json.loads(ok("registry", "history", "support", "--json"))
    assert [(e["previous"], e["version"], e["reason"]) for e in history] == [
        (None, 1, ""),
        (1, 2, "eval +3%"),
        (2, 1, "latency"),
    ]
    assert all(e["actor"] == "alice" for e in history)
    assert "alias.rollback support:production 2 -> 1" in ok("registry", "history")
    shown = json.loads(ok("registry", "show", "support", "--json"))
    assert (shown["ref"], shown["aliases"]) == ("support@1", ["production"])
    listing = json.loads(ok("registry", "list", "--json"))
    assert listing[0]["aliases"]["production"] == {"version": 1, "weight": None}
    assert "clean" in ok("registry", "fsck", "--verify")
    assert "support: pinned" in ok("registry", "pin", "support", "--reason", "hot")
    assert json.loads(ok("registry", "settings", "support", "--json"))["pinned"] is True
    assert "support: not pinned" in ok("registry", "unpin", "support", "--reason", "cold")
    pins = json.loads(ok("registry", "history", "support", "--json"))[-2:]
    assert [(e["action"], e["reason"]) for e in pins] == [
        ("adapter.pin", "hot"),
        ("adapter.unpin", "cold"),
    ]

    other_home = tmp_path / "other-home"
    assert cli("registry", "init", "--base", str(other), home=other_home).returncode == 0
    refused = cli("registry", "register", "support", str(tmp_path / "a1"), home=other_home)
    assert refused.returncode == 2
    ours = json.loads(ok("registry", "info", "--json"))["base_fingerprint"]
    theirs = json.loads(cli("registry", "info", "--json", home=other_home).stdout)
    assert ours in refused.stderr and theirs["base_fingerprint"] in refused.stderr


def test_user_errors_exit_2_with_one_line(cli: Callable[..., object], tmp_path: Path) -> None:
    result = cli("registry", "list", home=tmp_path / "none")
    assert result.returncode == 2
    assert result.stderr.startswith("lorafleet: error: no registry at")
    assert result.stderr.count("\n") == 1
    debug = cli("--debug", "registry", "list", home=tmp_path / "none")
    assert "Traceback" in debug.stderr


def test_commands_table_equals_the_entry_points_and_serves_an_uninstalled_checkout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Bento image is not an installed project: `python -m registry ...` finds the
    subcommands through registry.cli.COMMANDS, which must list pyproject.toml's entry points."""
    import tomllib

    import registry.cli

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["lorafleet.commands"]
    assert registry.cli.COMMANDS == declared
    monkeypatch.setattr(registry.cli, "entry_points", lambda group: [])
    parser = registry.cli.build_parser()
    args = parser.parse_args(["jobs", "run", "--max-jobs", "0"])
    assert args.handler.__module__ == "tuning.job_commands" and args.max_jobs == 0
    names = [name for name, _ in registry.cli.command_adders()]
    assert names == sorted(declared)
