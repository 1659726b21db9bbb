"""The body of every error answer of the HTTP API, in OpenAI's shape, so a client's error
handling reads one format whether a route, the request limits or the key check refused."""

from __future__ import annotations

from typing import Any


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """{"error": {"message", "type", "param", "code"}}: `kind` is the error's type name,
    `param` the request field at fault, if one is."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
