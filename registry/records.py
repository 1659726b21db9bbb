"""The registry's records: versions, aliases, history entries and version metadata.

`VersionMetadata` is the schema of `lorafleet.json`, the file a tuning run writes beside
its adapter; `register` reads it from the adapter directory (or from --metadata). The
records of the watch-and-retrain loop are in registry/loop_records.py; registry/storage/
builds both from its rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import InvalidMetadata
from registry.problems import validation_problems

VersionState = Literal["active", "archived"]
METADATA_FILE = "lorafleet.json"


class DatasetInfo(BaseModel):
    """Where the training data came from and what it hashed to."""

    model_config = ConfigDict(extra="forbid")
    fingerprint: str | None = None
    """sha256 over the training examples as used."""
    source: str | None = None
    """Paths or URIs of the data files, comma-separated."""
    files: dict[str, str] = Field(default_factory=dict)
    """sha256 of each data file."""
    examples: int | None = Field(default=None, ge=0)
    """Number of training examples after filtering."""


class VersionMetadata(BaseModel):
    """Metadata of one adapter version (docs/architecture.md, "Registry and the storage seam")."""

    model_config = ConfigDict(extra="forbid")
    base_fingerprint: str | None = None
    """Fingerprint of the base model the adapter was trained on."""
    tokenizer_hash: str | None = None
    """sha256 over the tokenizer files used in training."""
    chat_template_hash: str | None = None
    """sha256 of the chat template used in training."""
    dataset: DatasetInfo = Field(default_factory=DatasetInfo)
    """Training data source and fingerprint."""
    training_config: dict[str, Any] = Field(default_factory=dict)
    """The resolved training config."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    """Task metric, eval loss, base comparison, forgetting."""
    library_versions: dict[str, str] = Field(default_factory=dict)
    """torch, transformers, peft, ... versions used in training."""
    git_commit: str | None = None
    """Commit of the code that trained the adapter."""
    seed: int | None = None
    """Random seed of the run."""
    parent_version: int | None = Field(default=None, ge=1)
    """Version this one was warm-started from."""
    trigger: str = "manual"
    """What started the run: manual, schedule, or alert:<id>."""
    job_id: int | None = None
    """Retraining job that produced this version."""
    drift_profile: str | None = None
    """File name, inside the artifact, of the drift baseline profile."""
    wall_time_s: float | None = Field(default=None, ge=0)
    """Training wall time in seconds."""
    tokens_per_s: float | None = Field(default=None, ge=0)
    """Training throughput in tokens per second."""
    labels: list[str] | None = None
    """Class labels of a classification adapter, in the order of its head's rows."""


@dataclass(frozen=True)
class VersionRecord:
    """One registered, immutable adapter version."""

    adapter: str
    version: int
    digest: str  # sha256 over the artifact's files
    state: VersionState
    created_at: str  # ISO 8601, UTC
    actor: str
    rank: int
    alpha: float
    size_bytes: int
    base_fingerprint: str
    target_modules: list[str]
    features: list[str]
    unservable: dict[str, str]
    metadata: dict[str, Any]
    aliases: list[str] = field(default_factory=list)
    archived_at: str | None = None
    purged: bool = False  # artifact files removed by `gc --archived`

    @property
    def ref(self) -> str:
        return f"{self.adapter}@{self.version}"

    @property
    def engines(self) -> list[str]:
        return [e for e in ("hf", "vllm") if e not in self.unservable]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ref": self.ref, "engines": self.engines}


@dataclass(frozen=True)
class AliasRecord:
    """An alias of an adapter and the version it points at."""

    adapter: str
    alias: str
    version: int
    weight: float | None  # traffic weight in [0, 1]; canary only
    updated_at: str
    revision: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """One entry of the registry's history: an alias move, a registration, an archive."""

    id: int
    revision: int
    at: str
    actor: str
    reason: str
    # register | archive | alias.set | alias.rollback | alias.remove | fsck.repair | settings |
    # adapter.pin | adapter.unpin |
    # alert.received | job.queued | job.started | job.succeeded | job.failed | canary.verdict
    action: str
    adapter: str | None
    version: int | None
    alias: str | None = None
    previous: int | None = None
    weight: float | None = None
    job: int | None = None  # the retraining job an event belongs to

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AliasMove:
    """The outcome of promote / alias set / rollback / alias remove."""

    adapter: str
    alias: str
    version: int | None  # None: the alias was removed
    previous: int | None
    weight: float | None
    changed: bool
    revision: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_metadata(
    source: Path, metadata: VersionMetadata | dict[str, Any] | Path | None
) -> VersionMetadata:
    if isinstance(metadata, VersionMetadata):
        return metadata.model_copy(deep=True)
    where = "--metadata"
    data: object = metadata
    if metadata is None or isinstance(metadata, Path):
        path = metadata or source / METADATA_FILE
        where = str(path)
        if not path.is_file():
            if metadata is not None:
                raise InvalidMetadata(f"metadata file {path} does not exist")
            return VersionMetadata()
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidMetadata(f"{path} is not valid JSON: {err}") from err
    try:
        return VersionMetadata.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(validation_problems(err))
        raise InvalidMetadata(f"{where} does not follow the metadata schema: {problems}") from err
