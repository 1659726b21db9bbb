"""Identifiers: adapter names, aliases and the `model` field of a request.

Grammar (docs/architecture.md, "Identifiers"): an adapter name or alias matches
``^[a-z0-9][a-z0-9._-]{0,62}$``; a model reference is ``base``, ``NAME`` (=
``NAME:production``), ``NAME:ALIAS`` or ``NAME@VERSION``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidName

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
BASE_MODEL = "base"
DEFAULT_ALIAS = "production"
CANARY_ALIAS = "canary"
STANDARD_ALIASES = ("production", "staging", "canary")


def check_name(name: str, what: str = "adapter name") -> str:
    """Return `name` if it is a valid adapter name or alias, else raise InvalidName."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit (no '..')"
        )
    if name == BASE_MODEL and what == "adapter name":
        raise InvalidName("invalid adapter name 'base': it is reserved for the base model")
    return name


@dataclass(frozen=True)
class ModelRef:
    """A parsed `model` field: the base model, an adapter alias or a pinned version."""

    adapter: str | None
    alias: str | None = None
    version: int | None = None

    @property
    def is_base(self) -> bool:
        return self.adapter is None

    def __str__(self) -> str:
        if self.adapter is None:
            return BASE_MODEL
        if self.version is not None:
            return f"{self.adapter}@{self.version}"
        return f"{self.adapter}:{self.alias}"


def version_model(adapter: str, version: int | str) -> str:
    """The `model` that names one version: NAME@VERSION, or `base` for the base model (the
    ("base", 0) of metric labels)."""
    return BASE_MODEL if adapter == BASE_MODEL else f"{adapter}@{version}"


def parse_model_ref(text: str) -> ModelRef:
    """Parse ``base | NAME | NAME:ALIAS | NAME@VERSION``; raise InvalidName with the grammar."""
    grammar = "use 'base', 'NAME', 'NAME:ALIAS' or 'NAME@VERSION'"
    if text == BASE_MODEL:
        return ModelRef(adapter=None)
    if "@" in text:
        name, _, version = text.partition("@")
        if not (version.isascii() and version.isdigit()) or int(version) < 1:  # not '¹'
            raise InvalidName(f"invalid model {text!r}: version must be an integer >= 1; {grammar}")
        return ModelRef(adapter=check_name(name), version=int(version))
    name, sep, alias = text.partition(":")
    if sep:
        return ModelRef(adapter=check_name(name), alias=check_name(alias, "alias"))
    try:
        return ModelRef(adapter=check_name(name), alias=DEFAULT_ALIAS)
    except InvalidName as err:
        raise InvalidName(f"invalid model {text!r}: {grammar}") from err
