"""Routing from the in-memory alias map: the model grammar, canary split by weight and
stickiness per session, errors naming what exists."""

from __future__ import annotations

import pytest

from registry.errors import NotFound
from registry.names import parse_model_ref
from serving.runtime.routing import AliasMap, Router, Target

ALIASES = AliasMap(
    revision=7,
    aliases={
        ("sql", "production"): (2, None),
        ("sql", "canary"): (3, 0.25),
        ("sql", "staging"): (4, None),
        ("chat", "production"): (1, None),
    },
    versions={"sql": {1: "archived", 2: "active", 3: "active", 4: "active"}, "chat": {1: "active"}},
)


def resolve(model: str, session: str | None = None) -> Target | None:
    return Router(ALIASES).resolve(parse_model_ref(model), session)


def test_grammar() -> None:
    assert resolve("base") is None
    assert resolve("chat") == Target("chat", 1)
    assert resolve("sql:staging") == Target("sql", 4)
    assert resolve("sql:canary") == Target("sql", 3)
    assert resolve("sql@2").key == "sql@2"  # type: ignore[union-attr]


def test_canary_share_follows_the_weight_and_sessions_stick() -> None:
    served = [resolve("sql", f"session-{i}") for i in range(4000)]
    share = sum(t == Target("sql", 3) for t in served) / len(served)
    assert 0.22 < share < 0.28
    assert all(resolve("sql", f"session-{i}") == served[i] for i in range(200))
    # Without a session header each request draws anew.
    draws = {resolve("sql") for _ in range(200)}
    assert draws == {Target("sql", 2), Target("sql", 3)}


def test_errors_name_what_exists() -> None:
    with pytest.raises(NotFound, match="model 'nope' does not exist; models: base, chat, sql"):
        resolve("nope")
    with pytest.raises(NotFound, match="sql@1 is archived; active versions: 2, 3, 4"):
        resolve("sql@1")
    with pytest.raises(NotFound, match=r"has no alias 'eu'; its aliases: sql:canary -> 3"):
        resolve("sql:eu")
