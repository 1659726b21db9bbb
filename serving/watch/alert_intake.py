"""Alert intake: an Alertmanager webhook notification -> retraining jobs in the registry.

Each *firing* alert goes through `Registry.receive_alert` (registry/storage/alerts.py: dedupe
by fingerprint and start time, the adapter's cooldown, a job queued with trigger
`alert:<fingerprint>`); resolved alerts are acknowledged and queue nothing. The work is
SQLite writes, so the route runs this off the event loop; a busy registry raises
RegistryBusy (503), and Alertmanager retries the whole notification, whose alerts already
recorded then come back as duplicates.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry import Registry
from serving.errors import BadRequest

logger = logging.getLogger(__name__)

WEBHOOK_VERSION = "4"

# Alertmanager's payload, version 4, with the fields its documentation lists. Unlike our own
# bodies, unknown fields are accepted and ignored: the sender is another program that may
# add fields within version 4, and refusing them would make it retry the notification
# forever while no alert gets through. An incompatible payload changes `version`, which is
# checked (400 naming it).
Lenient = ConfigDict(extra="ignore", populate_by_name=True)


class WebhookAlert(BaseModel):
    model_config = Lenient
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    starts_at: str = Field(alias="startsAt", min_length=1, max_length=64)
    ends_at: str = Field("", alias="endsAt", max_length=64)
    generator_url: str = Field("", alias="generatorURL", max_length=4096)
    fingerprint: str = Field(min_length=1, max_length=128)


class AlertmanagerPayload(BaseModel):
    model_config = Lenient
    version: str
    group_key: str = Field("", alias="groupKey")
    truncated_alerts: int = Field(0, alias="truncatedAlerts", ge=0)
    status: Literal["firing", "resolved"]
    receiver: str = ""
    group_labels: dict[str, str] = Field({}, alias="groupLabels")
    common_labels: dict[str, str] = Field({}, alias="commonLabels")
    common_annotations: dict[str, str] = Field({}, alias="commonAnnotations")
    external_url: str = Field("", alias="externalURL")
    alerts: list[WebhookAlert] = Field(max_length=10_000)


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
        outcome = registry.receive_alert(
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
