"""Routing: a request's `model` field -> the adapter version that serves it.

Resolution reads an in-memory alias map, never the database, so the hot path does no I/O
and keeps serving while the registry is busy. The map is replaced whole (one reference
swap) when the registry revision changes. `NAME` means `NAME:production`; when the adapter
also has a `canary` alias with weight w, a share w of those requests goes to the canary,
sticky per `X-Session-Id` (the same session always lands on the same side).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

from registry import Registry
from registry.errors import NotFound
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS, ModelRef
from serving.metrics import ALIAS_INFO


@dataclass(frozen=True)
class Target:
    """One adapter version."""

    adapter: str
    version: int

    @property
    def key(self) -> str:
        return f"{self.adapter}@{self.version}"


@dataclass(frozen=True)
class AliasMap:
    """What the registry said at one revision."""

    revision: int
    aliases: dict[tuple[str, str], tuple[int, float | None]]  # (adapter, alias) -> version, weight
    versions: dict[str, dict[int, str]]  # adapter -> version -> state

    @classmethod
    def load(cls, registry: Registry) -> AliasMap:
        revision, aliases, versions = registry.serving_snapshot()
        return cls(
            revision, {(a.adapter, a.alias): (a.version, a.weight) for a in aliases}, versions
        )

    def targets(self) -> dict[tuple[str, str], Target]:
        return {key: Target(key[0], version) for key, (version, _) in self.aliases.items()}

    def with_alias(self, key: tuple[str, str], value: tuple[int, float | None] | None) -> AliasMap:
        aliases = dict(self.aliases)
        if value is None:
            aliases.pop(key, None)
        else:
            aliases[key] = value
        return replace(self, aliases=aliases)


def sticky_uniform(session: str, adapter: str) -> float:
    """A number in [0, 1) fixed for (session, adapter)."""
    digest = hashlib.sha256(f"{session}\0{adapter}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Router:
    def __init__(self, aliases: AliasMap) -> None:
        self.map = aliases
        self._exported: set[tuple[str, str, str]] = set()
        self._export(aliases)

    def swap(self, aliases: AliasMap) -> None:
        self.map = aliases
        self._export(aliases)

    def _export(self, aliases: AliasMap) -> None:
        """lorafleet_alias_info = 1 per routed alias; label sets of gone aliases removed."""
        current = {(a, alias, str(v)) for (a, alias), (v, _) in aliases.aliases.items()}
        for labels in self._exported - current:
            ALIAS_INFO.remove(labels)
        for labels in current - self._exported:
            ALIAS_INFO.set(labels, 1.0)
        self._exported = current

    def resolve(
        self, ref: ModelRef, session: str | None = None, at: AliasMap | None = None
    ) -> Target | None:
        """The version serving `ref` (None: the base model) in the alias map `at` (default:
        the current one); NotFound naming what exists."""
        current = at or self.map
        if ref.adapter is None:
            return None
        states = current.versions.get(ref.adapter)
        if states is None:
            names = ", ".join(["base", *sorted(current.versions)])
            raise NotFound(f"model {ref.adapter!r} does not exist; models: {names}")
        if ref.version is not None:
            state = states.get(ref.version)
            if state != "active":
                have = ", ".join(str(v) for v, s in sorted(states.items()) if s == "active")
                why = "is archived" if state else "does not exist"
                raise NotFound(f"{ref.adapter}@{ref.version} {why}; active versions: {have}")
            return Target(ref.adapter, ref.version)
        alias = ref.alias or DEFAULT_ALIAS
        held = current.aliases.get((ref.adapter, alias))
        if held is None:
            aliases = [
                f"{ref.adapter}:{a} -> {v}"
                for (n, a), (v, _) in current.aliases.items()
                if n == ref.adapter
            ]
            raise NotFound(
                f"adapter {ref.adapter!r} has no alias {alias!r}; its aliases: "
                f"{', '.join(sorted(aliases)) or 'none'} (or use {ref.adapter}@VERSION)"
            )
        version = held[0]
        canary = current.aliases.get((ref.adapter, CANARY_ALIAS))
        if alias == DEFAULT_ALIAS and canary is not None and canary[0] != version and canary[1]:
            draw = sticky_uniform(session, ref.adapter) if session else random.random()
            if draw < canary[1]:
                version = canary[0]
        return Target(ref.adapter, version)
