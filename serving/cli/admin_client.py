"""The CLI side of the admin API: one GET with the admin key, its failures turned into a
one-line AdminCallFailed naming the server, the value and the fix (`lorafleet drift report`,
`lorafleet canary status`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from serving.errors import AdminCallFailed


def admin_get(
    url: str, route: str, params: dict[str, str], api_key: str | None, timeout_s: float = 30
) -> Any:
    """GET `route` (e.g. /admin/drift) of the server at `url` with the admin key; the JSON."""
    query = urllib.parse.urlencode(params)
    request = urllib.request.Request(
        f"{url.rstrip('/')}{route}?{query}",
        headers={"Authorization": f"Bearer {api_key or ''}", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise AdminCallFailed(_http_problem(url, route, params, api_key, err)) from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise AdminCallFailed(
            f"cannot reach a lorafleet server at {url} ({reason}); start one with "
            "`lorafleet serve` or pass --url"
        ) from err


def _http_problem(
    url: str, route: str, params: dict[str, str], api_key: str | None, err: urllib.error.HTTPError
) -> str:
    try:
        message: str | None = json.loads(err.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None  # not a lorafleet error body
    asked = ", ".join(f"{k} {v!r}" for k, v in params.items())
    if err.code == 401:
        given = "no admin key was given" if not api_key else "it refused the admin key given"
        return (
            f"the server at {url} needs its admin key and {given}; pass --api-key KEY or set "
            "LORAFLEET_API_KEY to the server's --api-key"
        )
    if message is None and err.code in (404, 405):
        return f"the server at {url} has no {route} endpoint; check --url or upgrade it"
    if err.code in (400, 404):
        return f"{message} (asked {url} for {asked})"
    return f"the server at {url} answered {err.code} for {asked}: {message or err.reason}"
