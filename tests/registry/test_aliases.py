"""Alias semantics: promote, rollback (walking back), remove, canary weights, archive
rules, history and the revision counter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from registry import Registry
from registry.errors import AliasConflict, InvalidName, NotFound


@pytest.fixture
def reg(home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]) -> Registry:
    """A registry with support@1..4 (four different adapters)."""
    registry = Registry(home)
    for seed in range(4):
        registry.register("support", adapter_factory(tiny_base, seed=seed), actor="ci")
    return registry


def holder(reg: Registry, alias: str = "production") -> int | None:
    held = {a.alias: a.version for a in reg.aliases("support")}
    return held.get(alias)


def test_promote_moves_alias_and_records_history(reg: Registry) -> None:
    start = reg.revision()
    first = reg.promote("support", 1, actor="alice", reason="launch")
    second = reg.promote("support", 2, actor="bob", reason="better eval")
    assert (first.previous, first.version, second.previous, second.version) == (None, 1, 1, 2)
    assert reg.revision() == start + 2 == second.revision
    assert reg.resolve("support").ref == "support@2"
    assert reg.resolve("support:production").version == 2
    history = reg.history("support")
    assert [(e.actor, e.reason, e.previous, e.version) for e in history] == [
        ("alice", "launch", None, 1),
        ("bob", "better eval", 1, 2),
    ]
    assert all(e.at.endswith("+00:00") for e in history)


def test_rollback_walks_back_through_earlier_holders(reg: Registry) -> None:
    for version in (1, 2, 3):
        reg.promote("support", version)
    assert reg.rollback("support").version == 2
    assert reg.rollback("support").version == 1
    with pytest.raises(AliasConflict, match="no previous holder"):
        reg.rollback("support")
    assert holder(reg) == 1
    # A new promote after rollbacks starts a new step on top of the current holder.
    reg.promote("support", 4)
    assert reg.rollback("support").version == 1
    actions = [(e.action, e.previous, e.version) for e in reg.history("support", "production")]
    assert actions == [
        ("alias.set", None, 1),
        ("alias.set", 1, 2),
        ("alias.set", 2, 3),
        ("alias.rollback", 3, 2),
        ("alias.rollback", 2, 1),
        ("alias.set", 1, 4),
        ("alias.rollback", 4, 1),
    ]


def test_promote_to_same_version_is_a_no_op(reg: Registry) -> None:
    reg.promote("support", 1)
    revision = reg.revision()
    move = reg.promote("support", 1)
    assert not move.changed and reg.revision() == revision
    assert len(reg.history("support")) == 1


def test_remove_then_rollback_restores(reg: Registry) -> None:
    reg.set_alias("support", "staging", 3)
    reg.remove_alias("support", "staging", reason="cleanup")
    assert holder(reg, "staging") is None
    with pytest.raises(NotFound, match="has no alias 'staging'"):
        reg.resolve("support:staging")
    assert reg.rollback("support", "staging").version == 3
    assert holder(reg, "staging") == 3


def test_canary_weight_rules(reg: Registry) -> None:
    assert reg.set_alias("support", "canary", 2).weight == 0.1
    assert reg.set_alias("support", "canary", 3).weight == 0.1  # kept
    assert reg.set_alias("support", "canary", 3, weight=0.5).weight == 0.5
    assert reg.rollback("support", "canary").weight == 0.1
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(AliasConflict, match="outside \\[0, 1\\]"):
            reg.set_alias("support", "canary", 2, weight=bad)
    with pytest.raises(AliasConflict, match="takes no weight"):
        reg.promote("support", 2, weight=0.3)


def test_user_defined_aliases_and_bad_ones(reg: Registry) -> None:
    reg.set_alias("support", "eu-west", 2)
    assert reg.resolve("support:eu-west").version == 2
    with pytest.raises(InvalidName):
        reg.set_alias("support", "Bad Alias", 2)


def test_archive_rules(reg: Registry) -> None:
    reg.promote("support", 1)
    reg.promote("support", 2)
    with pytest.raises(AliasConflict, match="held by alias production"):
        reg.archive("support", 2)
    archived = reg.archive("support", 1, reason="superseded")
    assert archived.state == "archived" and archived.archived_at
    with pytest.raises(AliasConflict, match="archived, so no alias may point at it"):
        reg.promote("support", 1)
    with pytest.raises(AliasConflict, match="archived"):
        reg.rollback("support")  # its previous holder is archived
    assert holder(reg) == 2
    with pytest.raises(AliasConflict, match="archived"):
        reg.archive("support", 1)
    # Archived versions stay resolvable by number (history, audits) until gc removes files.
    assert reg.resolve("support@1").state == "archived"
    assert any("support@1" in r for r in reg.gc(archived=True))
    with pytest.raises(NotFound, match="files were removed by gc"):
        reg.artifact_path(reg.get_version("support", 1))
    assert reg.fsck(verify=True).clean


def test_unknown_names_list_what_exists(reg: Registry) -> None:
    with pytest.raises(NotFound, match="no adapter named 'nope'; registered adapters: support"):
        reg.resolve("nope")
    with pytest.raises(NotFound, match="has no version 9; its versions: 1, 2, 3, 4"):
        reg.promote("support", 9)
    with pytest.raises(NotFound, match="no adapter named 'nope'"):
        reg.rollback("nope")


def test_versions_are_immutable_and_numbered(reg: Registry) -> None:
    versions = reg.list_versions("support")
    assert [v.version for v in versions] == [1, 2, 3, 4]
    assert len({v.digest for v in versions}) == 4
    events = reg.history(all_events=True)
    assert [e.revision for e in events] == sorted({e.revision for e in events})
