"""The operator dashboard: `/dashboard` serves a static page (serving/http/static/dashboard/,
shipped in the package, no build step) that polls `GET /admin/dashboard` with the admin key
the operator typed in, and acts through the admin routes (promote, rollback, canary weight,
`POST /admin/pin` / `/admin/unpin`), each with a reason that lands in the registry history.

The page itself holds no data, so it is open; everything it shows comes from /admin, behind
the admin key (serving/http/access.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from serving.http.access import require_admin, server_of
from serving.http.schemas import PinRequest
from serving.watch.drift_plots import KINDS, TITLES, drawn, plot_signal
from serving.watch.samples import SERIES_LIMIT

router = APIRouter()
STATIC = resources.files("serving.http") / "static" / "dashboard"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Scripts and styles from this server only, no inline code, images only from data: URIs
# (the drift plots).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
STARTED = time.time()


@router.get("/dashboard", include_in_schema=False)
async def page() -> Response:
    html = (STATIC / "index.html").read_bytes()
    return Response(html, media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/{asset}", include_in_schema=False)
async def asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise HTTPException(404, f"no dashboard file {asset!r}; files: {', '.join(ASSETS)}")
    return Response((STATIC / asset).read_bytes(), media_type=ASSETS[asset], headers=HEADERS)


@router.get("/admin/dashboard")
async def state(
    request: Request,
    adapter: str = Query("", max_length=200, description="show adapters containing this"),
    series: int = Query(SERIES_LIMIT, ge=1, le=50, description="versions drawn at most"),
) -> dict[str, Any]:
    """Everything the page shows, in one answer: the fleet from the registry (one snapshot),
    residency, the last minutes of traffic and drift, and the canaries' live comparison.
    Charts are drawn for at most `series` versions whose adapter name contains `adapter`:
    the busiest for traffic, drifted then most sampled for drift."""
    require_admin(request)
    server = server_of(request)
    needle = adapter.lower()

    def match(name: str) -> bool:
        return needle in name.lower()

    fleet, canaries, drift_now, traffic = await asyncio.gather(
        asyncio.to_thread(server.registry.fleet_snapshot),
        asyncio.to_thread(server.canary.status, None),
        asyncio.to_thread(server.drift.summary),
        asyncio.to_thread(server.traffic.series, match, series),
    )
    tracked = [v for v in drift_now if v["adapter"] != "base" and match(v["adapter"])]
    tracked.sort(key=lambda v: (not v["drifted"], -v["samples"]))
    drawn = {(v["adapter"], str(v["version"])) for v in tracked[:series]}
    residency = server.residency
    return {
        "server": {
            "engine": server.engine_name,
            "base": str(server.config.base),
            "home": str(server.registry.home),
            "capacity": server.engine.adapter_slots,
            "serving_revision": server.router.map.revision,
            "pid": os.getpid(),
            "started_at": STARTED,
            "now": time.time(),
        },
        "fleet": fleet,
        "residency": {
            "resident": residency.resident(),
            "pinned": sorted(residency.pinned),
            "evicted": dict(residency.evicted),
        },
        "traffic": traffic,
        "drift": {
            "enabled": server.drift.settings.enabled,
            "thresholds": dict(server.drift.settings.thresholds),
            "titles": {name: f"{TITLES[name]}: {KINDS[name]}" for name in TITLES},
            "now": drift_now,
            "matching": len(tracked),
            "history": server.drift_history.series(drawn),
            "window_s": server.drift_history.window_s,
        },
        "canaries": [c.to_dict() for c in canaries],
    }


@router.get("/admin/dashboard/drift")
async def drift_plots(request: Request, model: str) -> dict[str, Any]:
    """One version's drift report (as `GET /admin/drift?model=`) with each signal's plot of
    baseline vs live, the PNGs of `lorafleet drift report`, as data: URIs."""
    require_admin(request)
    server = server_of(request)
    adapter, version = server.drift_key(model)
    report = server.spell_tokens(await asyncio.to_thread(server.drift.report, adapter, version))

    def render() -> dict[str, str]:
        return {
            name: "data:image/png;base64," + base64.b64encode(plot_signal(name, s)).decode()
            for name, s in drawn(report["signals"]).items()
        }

    return {**report, "plots": await asyncio.to_thread(render)}


@router.post("/admin/pin")
async def pin(body: PinRequest, request: Request) -> dict[str, Any]:
    return await _pin(request, body, True)


@router.post("/admin/unpin")
async def unpin(body: PinRequest, request: Request) -> dict[str, Any]:
    return await _pin(request, body, False)


async def _pin(request: Request, body: PinRequest, pinned: bool) -> dict[str, Any]:
    """Set the adapter's `pinned` setting (every server sharing the registry follows it) and
    apply it here before answering."""
    actor = require_admin(request)
    server = server_of(request)
    await asyncio.to_thread(
        server.registry.pin, body.adapter, pinned, actor=actor, reason=body.reason
    )
    await asyncio.to_thread(server.refresh)
    keys = sorted(k for k in server.residency.pinned if k.split("@")[0] == body.adapter)
    return {"adapter": body.adapter, "pinned": pinned, "resident_pinned": keys}
