"""Alert intake: an Alertmanager webhook notification -> retraining jobs in the registry.

Each *firing* alert goes through registry.alerts.receive_alert (dedupe by fingerprint and
start time, the adapter's cooldown, a job queued with trigger `alert:<fingerprint>`);
resolved alerts are acknowledged and queue nothing. The work is SQLite writes, so the route
runs this off the event loop; a busy registry raises RegistryBusy (503), and Alertmanager
retries the whole notification, whose alerts already recorded then come back as duplicates.
"""

from __future__ import annotations

import logging
from typing import Any

from registry import Registry
from registry.alerts import receive_alert
from serving.errors import BadRequest
from serving.schemas import AlertmanagerPayload

logger = logging.getLogger(__name__)

WEBHOOK_VERSION = "4"


def receive_notification(registry: Registry, payload: AlertmanagerPayload) -> list[dict[str, Any]]:
    """The outcome of every alert of one notification, in its order."""
    if payload.version != WEBHOOK_VERSION:
        raise BadRequest(
            f"Alertmanager webhook payload version {payload.version!r} is not supported: this "
            f"server reads version {WEBHOOK_VERSION} (Alertmanager 0.x); upgrade lorafleet or "
            "send version 4"
        )
    actor = f"alertmanager:{payload.receiver or 'webhook'}"
    outcomes = []
    for alert in payload.alerts:
        if alert.status == "resolved":
            outcomes.append(
                {
                    "fingerprint": alert.fingerprint,
                    "adapter": alert.labels.get("adapter"),
                    "outcome": "ignored",
                    "detail": "resolved: a resolved alert queues nothing",
                    "job": None,
                }
            )
            continue
        outcome = receive_alert(
            registry.db,
            fingerprint=alert.fingerprint,
            starts_at=alert.starts_at,
            labels=alert.labels,
            actor=actor,
        )
        outcomes.append(outcome.to_dict())
    logger.info(
        "alert notification from %s (%s): %s",
        payload.receiver,
        payload.status,
        ", ".join(f"{o['fingerprint']} {o['outcome']}" for o in outcomes) or "no alerts",
    )
    return outcomes
