"""The server's one config object: set by `lorafleet serve`, passed to the BentoML service
in the LORAFLEET_SERVE_CONFIG environment variable (JSON), validated at load time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.errors import LorafleetError
from registry.profile import SIGNALS

CONFIG_ENV = "LORAFLEET_SERVE_CONFIG"
# The file a worker writes its start-up failure to (serving/http/service.py), set and watched
# by `lorafleet serve` (serving/cli/serve.py).
START_FAILURE_ENV = "LORAFLEET_START_FAILURE_FILE"


class ServeConfig(BaseModel):
    """Every option of the server, each in one place: its name, default, bound and help.
    `lorafleet serve` has one flag per field (serving/cli/serve.py); `cli` in a field's
    json_schema_extra names a flag other than --FIELD-NAME, an environment default or a
    metavar."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    base: Path = Field(json_schema_extra={"cli": {"metavar": "DIR"}})
    """Base model directory; must be the registry's base."""
    home: Path | None = Field(None, json_schema_extra={"cli": {"metavar": "DIR"}})
    """Registry directory (default $LORAFLEET_HOME or ~/.lorafleet)."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """auto: vllm where CUDA is present, else hf (the embedded CPU default)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype; auto: bf16 where the CPU has AMX or AVX512-BF16 (or on a GPU with
    bf16), fp32 elsewhere, or $LORAFLEET_DTYPE when set (registry/hardware.py)."""
    threads: int | None = Field(None, ge=1, le=1024, json_schema_extra={"cli": {"metavar": "N"}})
    """torch threads of the hf engine; unset: every core, fewer while other processes keep
    one busy (measured as the engine runs)."""
    compile: bool = False
    """Run the hf engine's decode step through torch.compile (inductor): a step ~1.27x as
    fast (2 cores, bf16), for a compile of 20-90 s on 2 cores at start and at the first
    step of each routing (base only, some adapter slots, every slot) and thread count;
    fix --threads to keep the tuner's trials from compiling (docs/architecture.md)."""
    max_adapters: int = Field(8, ge=1, le=1024)
    """Adapter versions resident at once (engine slots)."""
    max_rank: int = Field(16, ge=1, le=1024)
    """Largest LoRA rank the engine serves."""
    max_batch: int = Field(32, ge=1, le=1024)
    """Requests decoded together."""
    max_len: int = Field(1024, ge=16)
    """Prompt plus completion tokens per request."""
    max_queue: int = Field(256, ge=1)
    """Requests waiting for a batch row before 503."""
    max_tokens_limit: int = Field(512, ge=1)
    """Largest max_tokens a request may ask for."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body in bytes; a larger one gets 413."""
    max_concurrent_requests: int = Field(512, ge=1, le=1024)
    """Requests to /v1/ in flight at once (streams included); more get 503 with Retry-After.
    At most BentoML's traffic.max_concurrency (1024), which would answer 429 first."""
    api_key: str | None = Field(None, json_schema_extra={"cli": {"env": "LORAFLEET_API_KEY"}})
    """Key of the admin API (Authorization: Bearer KEY); admin is off without one."""
    inference_key: str | None = Field(
        None, json_schema_extra={"cli": {"env": "LORAFLEET_INFERENCE_KEY"}}
    )
    """Key of /v1/* (Authorization: Bearer KEY) when set; /metrics, /readyz, /livez stay open."""
    max_adapter_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """Largest adapter (decoded files, bytes) accepted by POST /admin/adapters/NAME."""
    pinned: list[str] = Field([], json_schema_extra={"cli": {"flag": "--pin", "metavar": "NAME"}})
    """Adapters whose production and canary versions stay resident."""
    poll_interval_s: float = Field(0.25, gt=0, le=60)
    """How often the registry revision is checked."""
    drift: bool = Field(
        True,
        json_schema_extra={
            "cli": {"flag": "--no-drift", "help": "keep no drift windows and export no scores"}
        },
    )
    """Keep drift windows and export drift scores (serving/watch/drift.py)."""
    drift_window: int = Field(500, ge=1, le=100_000)
    """Requests per adapter version in its drift window."""
    drift_window_s: float = Field(3600.0, gt=0, le=30 * 86400)
    """Seconds a request stays in the drift window."""
    drift_min_samples: int = Field(50, ge=1)
    """Requests in a window before its request signals are scored."""
    drift_min_feedback: int = Field(20, ge=1)
    """Feedback ratings in a window before the feedback signal is scored."""
    drift_thresholds: dict[str, float] = Field(
        {}, json_schema_extra={"cli": {"flag": "--drift-threshold", "metavar": "SIGNAL=VALUE"}}
    )
    """Per-signal thresholds replacing the defaults of serving/watch/drift.py."""
    request_log: bool = Field(
        True,
        json_schema_extra={
            "cli": {
                "flag": "--no-request-log",
                "help": "log no requests (adapters also opt out one by one: setting "
                "request_log=false)",
            }
        },
    )
    """Log adapter requests for retraining (adapters opt out with their request_log setting)."""
    request_log_max_rows: int = Field(100_000, ge=1)
    """Logged requests kept per adapter (the oldest are deleted first)."""
    request_log_max_age_days: float = Field(30.0, gt=0)
    """Days a logged request is kept."""
    canary_verdicts: bool = Field(
        True,
        json_schema_extra={
            "cli": {
                "flag": "--no-canary-verdicts",
                "help": "never promote or roll back canaries automatically (manual verdicts "
                "still work)",
            }
        },
    )
    """Judge canaries and promote or roll them back automatically (serving/watch/canary.py)."""
    canary_interval_s: float = Field(1.0, gt=0, le=3600)
    """Seconds between canary checks."""

    @model_validator(mode="after")
    def _drift_consistent(self) -> ServeConfig:
        problems = []
        if self.drift_min_samples > self.drift_window:
            problems.append(
                f"drift_min_samples {self.drift_min_samples} > drift_window {self.drift_window}"
                ": no score would ever be exported; lower --drift-min-samples or raise "
                "--drift-window"
            )
        if self.drift_min_feedback > self.drift_window:
            problems.append(
                f"drift_min_feedback {self.drift_min_feedback} > drift_window "
                f"{self.drift_window}; lower --drift-min-feedback or raise --drift-window"
            )
        for name, value in self.drift_thresholds.items():
            if name not in SIGNALS:
                problems.append(f"unknown drift signal {name!r}; signals: {', '.join(SIGNALS)}")
            elif not value > 0:
                problems.append(f"drift threshold of {name} is {value}; use a value > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_env(self) -> str:
        return self.model_dump_json()


def load_serve_config() -> ServeConfig:
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise LorafleetError(f"{CONFIG_ENV} is not set; start the server with `lorafleet serve`")
    try:
        return ServeConfig.model_validate(json.loads(raw))
    except (ValidationError, ValueError) as err:
        raise LorafleetError(f"invalid {CONFIG_ENV}: {err}") from err
