"""Request limits in front of the routes (ASGI middleware): the largest request body and
the most requests in flight at once. Both answer before any route runs: 413 naming the
limit without reading a body beyond it, 503 with Retry-After above the concurrency bound."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.http.error_body import error_body

logger = logging.getLogger(__name__)

BOUNDED_PREFIX = "/v1/"  # admin calls and probes stay answerable under inference load
UPLOAD_PREFIX = "/admin/adapters/"  # adapter files, base64 in JSON: bounded by their own limit


class RequestLimits:
    """Refuses bodies over `max_body_bytes` (413) and requests to /v1/ over
    `max_concurrent_requests` in flight (503), both read from the server's config."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = getattr(scope["app"].state, "server", None) if "app" in scope else None
        if scope["type"] != "http" or server is None:
            await self.app(scope, receive, send)
            return
        max_concurrent = server.config.max_concurrent_requests
        max_body, flag = body_limit(str(scope["path"]), server.config)
        bounded = str(scope["path"]).startswith(BOUNDED_PREFIX)
        if bounded and self.in_flight >= max_concurrent:
            message = (
                f"{max_concurrent} requests are in flight, the limit of this server "
                "(--max-concurrent-requests); retry after 1 s"
            )
            await refuse(send, 503, message, "Overloaded", {"retry-after": "1"})
            return
        self.in_flight += bounded
        try:
            body = await read_body(scope, receive, max_body, flag)
            if isinstance(body, str):
                await refuse(send, 413, body, "RequestTooLarge")
                return
            await self.app(scope, replay(body, receive), send)
        finally:
            self.in_flight -= bounded


def body_limit(path: str, config: Any) -> tuple[int, str]:
    """(largest body in bytes, the option that sets it) of a request to `path`: an adapter
    upload may carry --max-adapter-bytes of files, base64-encoded (4/3) in JSON."""
    if path.startswith(UPLOAD_PREFIX):
        return config.max_adapter_bytes * 4 // 3 + 1024 * 1024, "--max-adapter-bytes"
    return config.max_body_bytes, "--max-body-bytes"


async def read_body(scope: Scope, receive: Receive, limit: int, flag: str) -> bytes | str:
    """The whole body, or the message of a 413 as soon as it is known to exceed `limit`:
    from Content-Length before reading anything, else after `limit` + 1 bytes."""
    headers = dict(scope.get("headers") or [])
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_large(f"of {int(declared)} bytes", limit, flag)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the route sees an empty body and no one reads it
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large(f"over {limit} bytes", limit, flag)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def too_large(size: str, limit: int, flag: str) -> str:
    return (
        f"request body {size} exceeds {limit} bytes, the limit of this server; send a "
        f"smaller body or start the server with a larger {flag}"
    )


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then the client's own messages
    (a streaming response listens there for the disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def refuse(
    send: Send, status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> None:
    """An OpenAI-style error body, like every other error of the HTTP API."""
    raw = json.dumps(error_body(status, message, kind)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw, "more_body": False})
    logger.debug("refused a request with %d: %s", status, message)
