"""The admin routes (/admin/*, behind the admin key): residency, alias moves, loading,
uploads, drift, the Alertmanager webhook and canary verdicts. Errors map to status codes in
serving/http/app.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from registry.loop_records import Verdict
from registry.names import parse_model_ref
from serving.errors import BadRequest, NotServable
from serving.http.access import require_admin, server_of
from serving.http.schemas import (
    CanaryRequest,
    ModelRequest,
    PromoteRequest,
    RegisterRequest,
    RollbackRequest,
)
from serving.http.uploads import register_upload
from serving.runtime.server import Server
from serving.watch.alert_intake import AlertmanagerPayload, receive_notification

router = APIRouter()


@router.get("/admin/residency")
async def residency(request: Request) -> dict[str, Any]:
    require_admin(request)
    server = server_of(request)
    return {
        "engine": server.engine_name,
        "capacity": server.engine.adapter_slots,
        "resident": server.residency.resident(),
        "pinned": sorted(server.residency.pinned),
        "revision": server.router.map.revision,
    }


@router.post("/admin/promote")
async def promote(body: PromoteRequest, request: Request) -> dict[str, Any]:
    actor = require_admin(request)
    server = server_of(request)
    # A thread: waiting for another process's registry lock must not stall other requests.
    move = await asyncio.to_thread(
        server.registry.set_alias,
        body.adapter,
        body.alias,
        body.version,
        weight=body.weight,
        actor=actor,
        reason=body.reason,
    )
    await _apply(server)
    return move.to_dict()


@router.post("/admin/rollback")
async def rollback(body: RollbackRequest, request: Request) -> dict[str, Any]:
    actor = require_admin(request)
    server = server_of(request)
    move = await asyncio.to_thread(
        server.registry.rollback, body.adapter, body.alias, actor=actor, reason=body.reason
    )
    await _apply(server)
    return move.to_dict()


@router.post("/admin/load")
async def load(body: ModelRequest, request: Request) -> dict[str, Any]:
    require_admin(request)
    server = server_of(request)
    target = server.router.resolve(parse_model_ref(body.model))
    if target is None:
        raise BadRequest("the base model is always loaded; name an adapter")
    started = time.perf_counter()
    await asyncio.to_thread(server.residency.ensure, target)
    return {"loaded": target.key, "seconds": round(time.perf_counter() - started, 4)}


@router.post("/admin/unload")
async def unload(body: ModelRequest, request: Request) -> dict[str, Any]:
    require_admin(request)
    server = server_of(request)
    target = server.router.resolve(parse_model_ref(body.model))
    if target is None:
        raise BadRequest("the base model cannot be unloaded; name an adapter")
    if target.key in server.residency.pinned:
        raise NotServable(f"{target.key} is pinned; it stays resident")
    return {"unloaded": target.key if server.residency.unload(target.key) else None}


@router.post("/admin/adapters/{name}", status_code=201)
async def register_adapter(name: str, body: RegisterRequest, request: Request) -> dict[str, Any]:
    """Register uploaded files as the next version of adapter `name` (201 with its record);
    every validation failure is a 422 with the registry's message and registers nothing.
    With `alias`, that alias then points at the new version."""
    actor = require_admin(request)
    server = server_of(request)
    record = await asyncio.to_thread(
        register_upload,
        server.registry,
        name,
        body.files,
        max_bytes=server.config.max_adapter_bytes,
        actor=actor,
        reason=body.reason,
        alias=body.alias,
    )
    if body.alias is not None:
        await _apply(server)
    return record.to_dict()


@router.get("/admin/drift")
async def drift(request: Request, model: str | None = None) -> dict[str, Any]:
    """Drift of one version (`model`: NAME, NAME:ALIAS, NAME@VERSION or base) with baseline
    and live distributions per signal; without `model`, the scores of every tracked
    version."""
    require_admin(request)
    server = server_of(request)
    if model is None:
        versions = await asyncio.to_thread(server.drift.summary)
        return {
            "enabled": server.drift.settings.enabled,
            "thresholds": dict(server.drift.settings.thresholds),
            "versions": versions,
        }
    adapter, version = server.drift_key(model)
    report = await asyncio.to_thread(server.drift.report, adapter, version)
    return server.spell_tokens(report)


@router.post("/admin/alerts")
async def alerts(request: Request) -> dict[str, Any]:
    """Alertmanager's webhook (payload version 4): each firing alert may queue a retraining
    job; the answer names every alert's outcome. The key is checked before the body is read."""
    require_admin(request)
    try:
        payload = AlertmanagerPayload.model_validate(await request.json())
    except (ValidationError, ValueError) as err:
        errors = err.errors() if isinstance(err, ValidationError) else [{"msg": str(err)}]
        raise RequestValidationError(errors) from err
    server = server_of(request)
    outcomes = await asyncio.to_thread(receive_notification, server.registry, payload)
    return {"received": len(outcomes), "alerts": outcomes}


@router.get("/admin/canary")
async def canary_status(request: Request, adapter: str | None = None) -> dict[str, Any]:
    """The live comparison of every canary (or one adapter's) with production."""
    require_admin(request)
    server = server_of(request)
    found = await asyncio.to_thread(server.canary.status, adapter)
    return {"canaries": [c.to_dict() for c in found]}


@router.post("/admin/canary/promote")
async def canary_promote(body: CanaryRequest, request: Request) -> dict[str, Any]:
    return await _verdict(request, body, "promoted")


@router.post("/admin/canary/rollback")
async def canary_rollback(body: CanaryRequest, request: Request) -> dict[str, Any]:
    return await _verdict(request, body, "rolled_back")


async def _verdict(request: Request, body: CanaryRequest, verdict: Verdict) -> dict[str, Any]:
    actor = require_admin(request)
    server = server_of(request)
    record, comparison = await asyncio.to_thread(
        server.canary.decide, body.adapter, verdict, actor=actor, reason=body.reason
    )
    return {**record.to_dict(), "live": comparison.to_dict() if comparison else None}


async def _apply(server: Server) -> None:
    """Make an alias move through this server take effect before the response."""
    await asyncio.to_thread(server.refresh)
