"""Per-adapter settings of the watch-and-retrain loop: request logging, what retraining
jobs add to the data, the evaluation gate, the canary and the alert cooldown.

One JSON document per adapter in the `settings` table; an adapter without a row has the
defaults. A change is one transaction that also appends a `settings` event and bumps the
revision, so servers pick it up (e.g. a request-log opt-out) within a poll interval.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.database import Database, Transaction
from registry.errors import InvalidSettings
from registry.history import insert_event, utc_now
from registry.problems import parse_assignment, validation_problems


class AdapterSettings(BaseModel):
    """What the loop does for one adapter. Every field has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    request_log: bool = True
    """Store prompts and outputs of this adapter's requests for retraining (false: opt out)."""
    retrain_data_dir: str | None = None
    """Directory of new training files (the adapter's data format) that retraining adds."""
    retrain_overrides: list[str] = []
    """Training config overrides of retraining jobs, KEY.SUB=VALUE (e.g. training.max_steps=50)."""
    corrections: Literal["accepted", "all", "none"] = "accepted"
    """Feedback corrections retraining adds: accepted ones, all not rejected, or none."""
    gate_tolerance: float = Field(0.0, ge=0.0, le=1.0)
    """Gate slack: a candidate passes with eval loss <= production's x (1 + tolerance) and
    exact match >= production's - tolerance, on the same held-out set."""
    canary_weight: float = Field(0.1, gt=0.0, le=1.0)
    """Traffic share of a retrained version's canary."""
    canary_min_requests: int = Field(50, ge=1)
    """Canary requests needed before its verdict."""
    canary_window_s: float = Field(300.0, ge=0.0)
    """Seconds a canary runs at least before its verdict."""
    canary_max_error_rate_increase: float = Field(0.02, ge=0.0, le=1.0)
    """Largest error rate of the canary above production's that still promotes."""
    canary_max_latency_ratio: float = Field(1.5, ge=1.0)
    """Largest canary / production ratio of p95 time per completion token that still promotes."""
    canary_max_feedback_drop: float = Field(0.2, ge=0.0, le=2.0)
    """Largest drop of mean feedback score (in [-1, 1]) below production's that still promotes."""
    alert_cooldown_s: float = Field(3600.0, ge=0.0)
    """Seconds after an alert-triggered job during which further alerts queue nothing."""
    pinned: bool = False
    """Keep the production and canary versions resident in every server (as serve --pin)."""


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (values as in registry/problems.py) -> a dict; InvalidSettings."""
    out: dict[str, Any] = {}
    for item in assignments:
        try:
            key, value = parse_assignment(item)
        except ValueError as err:
            raise InvalidSettings(
                f"setting {item!r} is not KEY=VALUE, e.g. canary_weight=0.2; keys: "
                f"{', '.join(AdapterSettings.model_fields)}"
            ) from err
        out[key] = value
    return out


def _validate(data: dict[str, Any], adapter: str) -> AdapterSettings:
    try:
        return AdapterSettings.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(validation_problems(err, root="(settings)"))
        raise InvalidSettings(
            f"invalid settings for {adapter!r}: {problems}; keys and defaults: "
            "`lorafleet registry settings --defaults`"
        ) from err


def get_settings(db: Database | Transaction, adapter: str) -> AdapterSettings:
    """The settings of `adapter` (the defaults without a row), read through a database or
    inside an open transaction."""
    sql, params = "SELECT settings FROM settings WHERE adapter = ?", (adapter,)
    rows = db.query(sql, params) if isinstance(db, Database) else db.execute(sql, params).fetchall()
    return AdapterSettings.model_validate(json.loads(rows[0][0])) if rows else AdapterSettings()


def all_settings(db: Database) -> dict[str, AdapterSettings]:
    """Settings of every adapter that has a row (others have the defaults)."""
    return {
        r["adapter"]: AdapterSettings.model_validate(json.loads(r["settings"]))
        for r in db.query("SELECT adapter, settings FROM settings")
    }


def update_settings(
    db: Database,
    adapter: str,
    changes: dict[str, Any],
    *,
    actor: str,
    reason: str,
    reset: bool = False,
    action: str = "settings",
) -> AdapterSettings:
    """Apply `changes` over the current settings (over the defaults with `reset`); the
    history event is `action` (`adapter.pin` and `adapter.unpin` for the pin)."""
    with db.write("settings") as txn:
        row = txn.execute("SELECT settings FROM settings WHERE adapter = ?", (adapter,)).fetchone()
        current = {} if reset or row is None else json.loads(row[0])
        updated = _validate({**current, **changes}, adapter)
        document = updated.model_dump_json(exclude_defaults=True)
        txn.execute(
            "INSERT INTO settings (adapter, settings, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (adapter) DO UPDATE SET settings = excluded.settings,"
            " updated_at = excluded.updated_at",
            (adapter, document, utc_now()),
        )
        insert_event(
            txn,
            actor=actor,
            reason=reason or document,
            action=action,
            adapter=adapter,
        )
    return updated
