"""The records of the watch-and-retrain loop: retraining jobs and schedules, canary verdicts,
alert outcomes, logged requests and the per-adapter loop settings.

Plain types with no storage in them: registry/storage/ reads and writes them, `Registry`
hands them out, and `tuning` and `serving` import them from here.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import InvalidSchedule, InvalidSettings
from registry.problems import parse_assignment, validation_problems

# ---- retraining jobs and schedules ---------------------------------------------------------

JobState = Literal["queued", "running", "succeeded", "failed"]
INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class JobRecord:
    """One retraining job."""

    id: int
    adapter: str
    state: JobState
    trigger: str  # manual | schedule | alert:<fingerprint>
    created_at: str
    actor: str
    reason: str
    details: dict[str, Any]  # e.g. the alert's labels
    started_at: str | None
    heartbeat_at: str | None
    finished_at: str | None
    worker: str | None  # host:pid of the process running it
    parent_version: int | None  # the production version it was warm-started from
    version: int | None  # the version it registered
    result: dict[str, Any] | None  # gate verdict, metrics, canary
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScheduleRecord:
    """A recurring retraining of one adapter: every `every_s` seconds or by `cron`."""

    adapter: str
    every_s: float | None
    cron: str | None
    next_at: str
    created_at: str
    actor: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def worker_id() -> str:
    """This process as a job's worker: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def parse_interval(text: str) -> float:
    """`90s`, `30m`, `6h`, `1d`, `2w` -> seconds; InvalidSchedule otherwise."""
    match = INTERVAL.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise InvalidSchedule(
            f"interval {text!r} is not a positive number with a unit s, m, h, d or w "
            "(e.g. --every 1d, --every 6h)"
        )
    return float(match.group(1)) * UNIT_S[match.group(2)]


# ---- canary verdicts and alerts -----------------------------------------------------------

Verdict = Literal["promoted", "rolled_back"]


@dataclass(frozen=True)
class VerdictRecord:
    """What a verdict did: the canary version, production before and after, the job."""

    adapter: str
    version: int  # the canary version judged
    verdict: Verdict
    reason: str
    actor: str
    production_before: int | None
    production_after: int | None
    job: int | None  # the job that registered the canary version (its metadata job_id)
    revision: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AlertOutcomeKind = Literal["queued", "duplicate", "cooldown", "ignored"]


@dataclass(frozen=True)
class AlertOutcome:
    """What one received alert did: queued a job, or why it queued none."""

    fingerprint: str
    adapter: str | None
    outcome: AlertOutcomeKind
    detail: str
    job: JobRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "adapter": self.adapter,
            "outcome": self.outcome,
            "detail": self.detail,
            "job": self.job.id if self.job else None,
        }


# ---- the request log ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedRequest:
    """One served request: what was asked, what was answered, and by which version."""

    response_id: str  # as returned to the client (cmpl-..., chatcmpl-...)
    adapter: str
    version: int
    model: str  # the request's model field (NAME, NAME:ALIAS, NAME@VERSION)
    prompt: str  # the rendered prompt (chat requests: after the chat template)
    output: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    at: float  # unix time the request finished

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
        }


# ---- per-adapter settings -----------------------------------------------------------------


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
    gate_forgetting_tolerance: float = Field(0.1, ge=0.0)
    """Forgetting slack: general-text perplexity <= production's x (1 + it), on the same text."""
    canary_weight: float = Field(0.1, gt=0.0, le=1.0)
    """Traffic share of a retrained version's canary."""
    canary_min_requests: int = Field(50, ge=1)
    """Requests the canary serves before its verdict; also the fewest requests (and latency
    samples) each side needs for the error-rate and latency tests (fewer: inconclusive)."""
    canary_window_s: float = Field(300.0, ge=0.0)
    """Seconds a canary runs at least before its verdict."""
    canary_max_window_s: float = Field(3600.0, ge=0.0)
    """Seconds after the alias move an inconclusive canary keeps collecting; then
    canary_inconclusive applies (never before canary_window_s)."""
    canary_inconclusive: Literal["hold", "rollback"] = "hold"
    """What an inconclusive canary gets at canary_max_window_s: hold (keeps its traffic, a
    `canary.held` event, decided by hand) or rollback."""
    canary_alpha: float = Field(0.05, gt=0.0, le=0.5)
    """False-alarm rate: the chance that a canary no worse than production is rolled back
    (or a worse one promoted) over all its looks; spent alpha/2, alpha/6, ... at looks at
    canary_min_requests x 1, 2, 4, ... requests, each split over the criteria tested."""
    canary_min_ratings: int = Field(10, ge=2)
    """Feedback ratings each side needs before feedback is compared (fewer: skipped)."""
    canary_max_error_rate_increase: float = Field(0.02, ge=0.0, le=1.0)
    """Tolerated error rate of the canary above production's (it passes once its rate is
    significantly below production's + this, fails when significantly worse beyond it)."""
    canary_max_latency_ratio: float = Field(1.5, ge=1.0)
    """Tolerated canary / production ratio of median time per completion token."""
    canary_max_feedback_drop: float = Field(0.2, ge=0.0, le=2.0)
    """Tolerated drop of mean feedback score (in [-1, 1]) below production's."""
    shadow_share: float = Field(0.0, ge=0.0, le=1.0)
    """Share of production's requests also run on the canary off the request path, their
    outputs compared (0: no shadow comparison)."""
    shadow_min_agreement: float = Field(0.5, ge=0.0, le=1.0)
    """Lowest share of shadowed prompts on which canary and production give the same output."""
    shadow_min_pairs: int = Field(20, ge=1)
    """Shadowed prompts needed before the shadow comparison counts (fewer: skipped)."""
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


def validate_settings(data: dict[str, Any], adapter: str) -> AdapterSettings:
    """`data` as the settings of `adapter`; InvalidSettings naming every problem."""
    try:
        return AdapterSettings.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(validation_problems(err, root="(settings)"))
        raise InvalidSettings(
            f"invalid settings for {adapter!r}: {problems}; keys and defaults: "
            "`lorafleet registry settings --defaults`"
        ) from err
