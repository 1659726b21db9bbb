"""Who may call what: the admin key guards every /admin path, the optional inference key
every /v1/ path; /metrics, /readyz and /livez stay open. The check runs before routing and
before the body is read, so an unknown admin path or a malformed body without the key is a
401 too. Keys are compared in constant time (hmac.compare_digest) and never logged."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import Unauthorized
from serving.http.error_body import error_body

if TYPE_CHECKING:
    from serving.runtime.server import Server

ADMIN_PREFIX = "/admin"
ACTOR_HEADER = "X-Lorafleet-Actor"  # who an admin call acts for, in the history
INFERENCE_PREFIX = "/v1/"
ADMIN_REFUSAL = "admin endpoints need Authorization: Bearer <the server's --api-key>"
INFERENCE_REFUSAL = "this server needs Authorization: Bearer <its --inference-key> on /v1/ routes"


@dataclass(frozen=True)
class Keys:
    """The admin key (admin is off without one) and the optional inference key."""

    admin: str | None
    inference: str | None


def bearer_matches(authorization: str, key: str | None) -> bool:
    """True if `authorization` is `Bearer <key>`; constant time in the token's content."""
    if not key:
        return False
    token = (
        authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else ""
    )
    return hmac.compare_digest(token.encode(), key.encode())


def server_of(request: Request) -> Server:
    """The Server a route works on (set on the app by serving/http/service.py)."""
    server: Server = request.app.state.server
    return server


def require_admin(request: Request) -> str:
    """The actor of an admin call; Unauthorized (401) unless the bearer token equals the
    server's admin key (checked again here: a route must not rely on the middleware alone)."""
    key = server_of(request).config.api_key
    if not bearer_matches(request.headers.get("authorization", ""), key):
        raise Unauthorized()
    return "api:" + request.headers.get(ACTOR_HEADER, "admin")


def refusal(path: str, authorization: str, keys: Keys) -> str | None:
    """Why a request to `path` is refused (401), or None if it may pass."""
    if path.startswith(ADMIN_PREFIX):
        return None if bearer_matches(authorization, keys.admin) else ADMIN_REFUSAL
    if keys.inference and path.startswith(INFERENCE_PREFIX):
        return None if bearer_matches(authorization, keys.inference) else INFERENCE_REFUSAL
    return None


def unauthorized_body(message: str) -> bytes:
    return json.dumps(error_body(401, message, "Unauthorized")).encode()


class KeyCheck:
    """ASGI middleware: answer 401 for a guarded path without its key, before the app runs."""

    def __init__(self, app: ASGIApp, keys: Callable[[], Keys]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        authorization = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), ""
        )
        message = refusal(path, authorization, self.keys())
        if message is None:
            await self.app(scope, receive, send)
            return
        body = unauthorized_body(message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
