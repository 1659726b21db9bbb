"""Text of user errors shared by every entry point: pydantic validation problems as
`field: message` lines, and `KEY=VALUE` assignments with one value grammar.

Values of assignments (`lorafleet tune KEY=VALUE`, `registry settings set KEY=VALUE`,
`serve --drift-threshold SIGNAL=VALUE`) are YAML scalars or flow collections: `3e-4` and
`0.2` are numbers, `true` / `false` booleans, `null` none, `[a, b]` a list, `{"a": 1}` a
mapping (JSON is YAML), anything else a string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError


def field_path(loc: Sequence[int | str]) -> str:
    """`messages[0].content` for the loc ("messages", 0, "content"); '' for the root."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path


def validation_problems(
    err: ValidationError, *, root: str = "(root)", names: dict[str, str] | None = None
) -> list[str]:
    """One `field: message (got VALUE)` line per problem. `names` renames top-level fields
    (e.g. to the command-line flag the user typed); `root` names the whole object."""
    lines = []
    for problem in err.errors():
        loc = list(problem["loc"])
        field = field_path(loc) or root
        if names and loc and isinstance(loc[0], str) and loc[0] in names:
            rest = field_path(loc[1:])
            field = names[loc[0]] + (f" {rest}" if rest else "")
        given = problem.get("input")
        got = "" if isinstance(given, dict) or not loc else f" (got {given!r})"
        lines.append(f"{field}: {problem['msg']}{got}")
    return lines


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (KEY, the value parsed as a YAML scalar); ValueError if not KEY=VALUE."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # e.g. a string with a colon and a space: taken as it is
    return key, value
