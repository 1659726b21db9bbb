"""The adapter registry: versions, aliases, history and artifacts bound to one base model.

register = validate -> hash -> copy to a temporary directory -> fsync -> rename into place
-> one transaction. A version becomes visible only with that transaction's commit, so a kill
at any point leaves no partial version; `fsck` finds and removes the unreferenced files a
kill can leave. Alias moves are single transactions that also append to the history.

`Registry` holds no SQL: it calls the functions of registry/storage/, the one place that
talks to the database.
"""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path
from typing import Any

from registry.artifacts import ArtifactStore, LocalArtifactStore
from registry.basemodel import inspect_base
from registry.errors import (
    AliasConflict,
    AlreadyInitialized,
    BaseMismatch,
    CorruptArtifact,
    DuplicateContent,
    InvalidName,
    LorafleetError,
    NotFound,
    NotInitialized,
)
from registry.faults import pause_point
from registry.jobs_api import Jobs
from registry.loop_records import AdapterSettings, AlertOutcome, Verdict, VerdictRecord
from registry.names import ModelRef, check_name, parse_model_ref
from registry.records import (
    METADATA_FILE,
    AliasMove,
    AliasRecord,
    Event,
    VersionMetadata,
    VersionRecord,
    load_metadata,
)
from registry.storage import (
    aliases,
    canary_events,
    feedback,
    fleet,
    maintenance,
    settings,
    transfer,
    verdicts,
    versions,
)
from registry.storage.alerts import receive_alert
from registry.storage.backend import Database, Transaction, is_postgres_url, open_database, redact
from registry.storage.history import insert_event, list_events
from registry.storage.maintenance import FsckReport
from registry.storage.requestlog import RequestLog
from registry.validation import AdapterReport, validate_adapter

HOME_ENV = "LORAFLEET_HOME"
REGISTRY_URL_ENV = "LORAFLEET_REGISTRY_URL"
ARTIFACTS_URL_ENV = "LORAFLEET_ARTIFACTS_URL"
ACTOR_ENV = "LORAFLEET_ACTOR"
DB_FILE = "registry.db"
DEFAULT_MAX_RANK = 64


def default_home() -> Path:
    """$LORAFLEET_HOME, else ~/.lorafleet."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".lorafleet").expanduser()


def registry_location(home: Path, url: str | None = None) -> Path | str:
    """Where the records live: `url` or $LORAFLEET_REGISTRY_URL (a ``postgresql://`` URL),
    else the SQLite file in `home`."""
    url = url or os.environ.get(REGISTRY_URL_ENV) or None
    if url is None:
        return home / DB_FILE
    if not is_postgres_url(url):
        raise LorafleetError(
            f"registry URL {url.split('@')[-1]!r} is not a postgresql:// URL; give one "
            f"(--registry or {REGISTRY_URL_ENV}), or neither for the SQLite registry in the home"
        )
    return url


def open_artifacts(home: Path, db: Database, url: str | None = None) -> ArtifactStore:
    """Where the files live: `url` or $LORAFLEET_ARTIFACTS_URL (any fsspec URL, with a
    local cache in `home`), else `home`/artifacts."""
    url = url or os.environ.get(ARTIFACTS_URL_ENV) or None
    if url is None:
        return LocalArtifactStore(home / "artifacts")
    from registry.object_store import FsspecArtifactStore

    return FsspecArtifactStore(url, home / "artifact-cache", db.artifacts_lock)


def default_actor() -> str:
    """$LORAFLEET_ACTOR, else user@host."""
    return os.environ.get(ACTOR_ENV) or f"{getpass.getuser()}@{socket.gethostname()}"


class Registry:
    """A registry at `home` (default $LORAFLEET_HOME or ~/.lorafleet), created by `create`."""

    def __init__(
        self,
        home: Path | str | None = None,
        *,
        url: str | None = None,
        artifacts_url: str | None = None,
        busy_timeout_s: float | None = None,
    ) -> None:
        """`url`: the records' PostgreSQL URL (default $LORAFLEET_REGISTRY_URL, else the
        SQLite file in `home`); `artifacts_url`: where the files live (default
        $LORAFLEET_ARTIFACTS_URL, else `home`/artifacts); `busy_timeout_s`: how long a
        statement waits for another process's lock before RegistryBusy (default
        $LORAFLEET_BUSY_TIMEOUT_S, else 30)."""
        self.home = Path(home).expanduser() if home else default_home()
        location = registry_location(self.home, url)
        where = self.home if isinstance(location, Path) else redact(location)
        missing = NotInitialized(
            f"no registry at {where}; create one with `lorafleet registry init --base DIR` "
            f"or point {HOME_ENV} (--home) or {REGISTRY_URL_ENV} (--registry) at an existing one"
        )
        if isinstance(location, Path) and not location.is_file():
            raise missing
        self.db = open_database(location, busy_timeout_s)
        base = versions.read_base(self.db)
        if base is None:
            self.db.close()
            raise missing
        self.base = base
        try:
            self.artifacts = open_artifacts(self.home, self.db, artifacts_url)
        except BaseException:
            self.db.close()
            raise
        self._request_log: RequestLog | None = None
        self.jobs = Jobs(self.db)
        """Retraining jobs and schedules (registry/jobs_api.py)."""

    @classmethod
    def create(
        cls,
        home: Path | str | None,
        base_dir: Path | str,
        *,
        max_rank: int | None = None,
        actor: str | None = None,
        url: str | None = None,
        artifacts_url: str | None = None,
        busy_timeout_s: float | None = None,
    ) -> Registry:
        """Create a registry bound to `base_dir`'s fingerprint; idempotent for the same base.

        On an existing registry of the same base, a different `max_rank` updates the limit.
        """
        if max_rank is not None and max_rank < 1:
            raise LorafleetError(f"max rank {max_rank} is invalid: use an integer >= 1")
        home_path = Path(home).expanduser() if home else default_home()
        info = inspect_base(base_dir)
        home_path.mkdir(parents=True, exist_ok=True)
        actor = actor or default_actor()
        location = registry_location(home_path, url)
        db = open_database(location, busy_timeout_s)
        try:
            with db.write("init") as txn:
                bound_base, bound_rank = versions.bound_base_in(txn) or (None, None)
                if bound_base is None:
                    versions.insert_registry(txn, info, max_rank or DEFAULT_MAX_RANK)
                    insert_event(txn, actor=actor, reason=info.path, action="init")
                elif bound_base != info.fingerprint:
                    raise AlreadyInitialized(
                        f"registry at {db.location} is bound to base {bound_base}, "
                        f"not {info.fingerprint} ({info.path}); use another --home "
                        f"({HOME_ENV}) or --registry ({REGISTRY_URL_ENV}) for that base"
                    )
                elif max_rank is not None and bound_rank != max_rank:
                    versions.set_max_rank(txn, max_rank)
                    insert_event(
                        txn,
                        actor=actor,
                        reason=f"max rank {bound_rank} -> {max_rank}",
                        action="limits",
                    )
        finally:
            db.close()
        return cls(
            home_path, url=url, artifacts_url=artifacts_url, busy_timeout_s=busy_timeout_s
        )

    def close(self) -> None:
        if self._request_log is not None:
            self._request_log.close()
        self.db.close()

    # ---- reading -------------------------------------------------------------------------

    @property
    def max_rank(self) -> int:
        return versions.max_rank(self.db)

    def revision(self) -> int:
        """The change feed: increases with every write; cheap enough to poll."""
        return versions.revision(self.db)

    def migrate_to(
        self, url: str, artifacts_url: str | None = None, *, actor: str | None = None
    ) -> dict[str, Any]:
        """Copy this registry, history included, into the empty PostgreSQL database at
        `url` with its files in `artifacts_url` (default: where they are now, unless that is
        this home's local directory), then check the copy: every row equal, every artifact
        whole. Files first, then all rows in one transaction, so an interrupted migration
        leaves the target without a registry and can be run again."""
        target_location = registry_location(self.home, url)
        if artifacts_url is None and isinstance(self.artifacts, LocalArtifactStore):
            raise LorafleetError(
                f"the artifacts in {self.artifacts.location} are local to this host: give "
                "--artifacts-to URL (s3://BUCKET/PREFIX, or file:///DIR on a filesystem "
                "every host mounts)"
            )
        target = open_database(target_location)
        try:
            store = open_artifacts(self.home, target, artifacts_url or self.artifacts.location)
            digests = versions.stored_digests(self.db)
            with store.lock(False):
                for digest in digests:
                    store.put(self.artifacts.local_dir(digest, verify=True), digest)
                counts = transfer.copy_records(self.db, target)
            problems = transfer.differences(self.db, target)
            for digest in digests:
                try:
                    store.verify(digest)
                except CorruptArtifact as err:
                    problems.append(str(err))
            if problems:
                raise LorafleetError(
                    f"the copy in {target.location} differs from {self.db.location}: "
                    + "; ".join(problems[:5])
                )
            logged = 0
            if (self.home / "requests.db").is_file() and not self.shared:
                copy = RequestLog(self.home, target.busy_timeout_s, shared=target)
                for adapter in self.request_log.counts():
                    rows = self.request_log.read(adapter)
                    copy.append(rows)
                    logged += len(rows)
                copied, source_counts = copy.counts(), self.request_log.counts()
                if copied != source_counts:
                    raise LorafleetError(
                        f"the request log copied to {target.location} differs from "
                        f"{self.request_log.location}: {copied} vs {source_counts}"
                    )
            with target.write("migrate") as txn:
                insert_event(
                    txn, actor=actor or default_actor(), reason=f"from {self.db.location}",
                    action="migrate",
                )
        finally:
            target.close()
        return {
            "from": self.db.location,
            "to": target.location,
            "artifacts": store.location,
            "rows": counts,
            "artifacts_copied": len(digests),
            "requests_logged": logged,
        }

    def wait_for_change(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a change by another process: True as soon as
        PostgreSQL notifies one (LISTEN/NOTIFY); the SQLite registry only waits (False), and
        its readers poll `revision()`."""
        return self.db.wait_for_change(timeout_s)

    def info(self) -> dict[str, Any]:
        state = versions.registry_state(self.db)
        return {
            "home": str(self.home),
            "records": self.db.location,
            "artifacts": self.artifacts.location,
            "revision": state["revision"],
            "created_at": state["created_at"],
            "max_rank": state["max_rank"],
            "base_fingerprint": self.base.fingerprint,
            "base_path": self.base.path,
            "base_model_type": self.base.model_type,
            "adapters": state["adapters"],
            "versions": state["versions"],
            "archived_versions": state["archived_versions"],
        }

    def adapter_names(self) -> list[str]:
        return versions.adapter_names(self.db)

    def list_versions(self, adapter: str) -> list[VersionRecord]:
        """All versions of `adapter`, oldest first; NotFound if it has none."""
        check_name(adapter)
        records = versions.list_versions(self.db, adapter)
        if not records:
            raise NotFound(self._unknown_adapter(adapter))
        return records

    def _unknown_adapter(self, adapter: str) -> str:
        names = self.adapter_names()
        known = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "none"
        return f"no adapter named {adapter!r}; registered adapters: {known}"

    def get_version(self, adapter: str, version: int) -> VersionRecord:
        """One version; NotFound naming the versions that exist."""
        for record in self.list_versions(adapter):
            if record.version == version:
                return record
        have = ", ".join(str(r.version) for r in self.list_versions(adapter))
        raise NotFound(f"adapter {adapter!r} has no version {version}; its versions: {have}")

    def aliases(self, adapter: str | None = None) -> list[AliasRecord]:
        return versions.list_aliases(self.db, adapter)

    def resolve(self, ref: str | ModelRef) -> VersionRecord:
        """The version a reference (``NAME``, ``NAME:ALIAS``, ``NAME@VERSION``) points at."""
        parsed = parse_model_ref(ref) if isinstance(ref, str) else ref
        if parsed.adapter is None:
            raise InvalidName("'base' is the base model, not an adapter version")
        if parsed.version is not None:
            return self.get_version(parsed.adapter, parsed.version)
        records = self.list_versions(parsed.adapter)
        for record in records:
            if parsed.alias in record.aliases:
                return record
        held = [f"{a.alias} -> {a.version}" for a in self.aliases(parsed.adapter)]
        raise NotFound(
            f"adapter {parsed.adapter!r} has no alias {parsed.alias!r}; its aliases: "
            f"{', '.join(held) or 'none'}; versions: "
            f"{', '.join(str(r.version) for r in records)} (use {parsed.adapter}@VERSION)"
        )

    def history(
        self,
        adapter: str | None = None,
        alias: str | None = None,
        *,
        all_events: bool = False,
        limit: int | None = None,
    ) -> list[Event]:
        """Events oldest first: alias moves and the loop's steps (alerts, jobs, canary
        verdicts), or every write with `all_events`."""
        return list_events(self.db, adapter, alias, all_events=all_events, limit=limit)

    def serving_snapshot(self) -> tuple[int, list[AliasRecord], dict[str, dict[int, str]]]:
        """Revision, aliases and version states read in one consistent snapshot."""
        return versions.serving_snapshot(self.db)

    def add_feedback(self, response_id: str, score: float, **fields: Any) -> int:
        """Store feedback on one served response, for retraining
        (registry/storage/feedback.py)."""
        return feedback.add_feedback(self.db, response_id, score, **fields)

    def feedback(self, adapter: str | None = None) -> list[dict[str, Any]]:
        """Stored feedback, oldest first, optionally of one adapter."""
        return feedback.list_feedback(self.db, adapter)

    def review_feedback(self, ids: list[int], review: str) -> int:
        """Mark feedback accepted / rejected / pending for retraining."""
        return feedback.review_feedback(self.db, ids, review)

    def corrections(self, adapter: str, policy: str) -> list[dict[str, Any]]:
        """Feedback corrections of `adapter` that retraining may use under `policy`
        (accepted, all or none; registry/storage/feedback.py)."""
        return feedback.corrections(self.db, adapter, policy)

    def settings(self, adapter: str) -> AdapterSettings:
        """The loop settings of `adapter` (defaults unless changed)."""
        return settings.get_settings(self.db, adapter)

    def all_settings(self) -> dict[str, AdapterSettings]:
        """The loop settings of every adapter that changed any, by adapter."""
        return settings.all_settings(self.db)

    def fleet_snapshot(self, *, events: int = 50, jobs: int = 50) -> dict[str, Any]:
        """The whole fleet in one read: versions, aliases, settings, the newest `events`
        history events and `jobs` jobs (registry/storage/fleet.py)."""
        return fleet.fleet_snapshot(self.db, events=events, jobs=jobs)

    # ---- the loop --------------------------------------------------------------------------

    def receive_alert(
        self, *, fingerprint: str, starts_at: str, labels: dict[str, str], actor: str
    ) -> AlertOutcome:
        """Record one firing alert; maybe queue a retraining job (registry/storage/alerts.py)."""
        return receive_alert(
            self.db, fingerprint=fingerprint, starts_at=starts_at, labels=labels, actor=actor
        )

    def decide_canary(
        self,
        adapter: str,
        verdict: Verdict,
        *,
        actor: str,
        reason: str,
        version: int | None = None,
    ) -> VerdictRecord:
        """Promote or roll back `adapter`'s canary; with `version`, only if the canary still
        points at it (registry/storage/verdicts.py)."""
        return verdicts.decide_canary(
            self.db, adapter, verdict, actor=actor, reason=reason, version=version
        )

    def hold_canary(self, adapter: str, version: int, *, actor: str, reason: str) -> bool:
        """Record that `adapter`'s canary at `version` is held for a manual verdict; False
        if that was recorded already or the canary moved (registry/storage/verdicts.py)."""
        return verdicts.hold_canary(self.db, adapter, version, actor=actor, reason=reason)

    def update_settings(
        self,
        adapter: str,
        changes: dict[str, Any],
        *,
        actor: str | None = None,
        reason: str = "",
        reset: bool = False,
        action: str = "settings",
    ) -> AdapterSettings:
        """Change some settings of a registered adapter (one transaction, revision bumped,
        recorded as `action`)."""
        self.list_versions(adapter)  # NotFound naming the registered adapters
        return settings.update_settings(
            self.db,
            adapter,
            changes,
            actor=actor or default_actor(),
            reason=reason,
            reset=reset,
            action=action,
        )

    def pin(
        self, adapter: str, pinned: bool = True, *, actor: str | None = None, reason: str = ""
    ) -> AdapterSettings:
        """Keep `adapter`'s production and canary versions resident in every server (or stop
        keeping them): its `pinned` setting, recorded as adapter.pin / adapter.unpin."""
        action = "adapter.pin" if pinned else "adapter.unpin"
        return self.update_settings(
            adapter, {"pinned": pinned}, actor=actor, reason=reason, action=action
        )

    @property
    def shared(self) -> bool:
        """Records many hosts share (PostgreSQL): the request log and the canary's samples
        are kept there too."""
        return self.db.dialect == "postgresql"

    def add_canary_samples(self, samples: list[canary_events.Sample]) -> None:
        """Pool the canary's samples of one server with every replica's (a shared registry
        only; registry/storage/canary_events.py)."""
        self._require_shared("pooled canary samples")
        canary_events.append(self.db, samples)

    def canary_samples_since(
        self, adapter: str, version: int, start: float, limit: int
    ) -> tuple[list[tuple[float, bool, float | None]], list[tuple[float, float]]]:
        """Every replica's requests and ratings of `adapter@version` since `start`."""
        self._require_shared("pooled canary samples")
        return canary_events.since(self.db, adapter, version, start, limit)

    def prune_canary_samples(self, before: float) -> int:
        self._require_shared("pooled canary samples")
        return canary_events.prune(self.db, before)

    def _require_shared(self, what: str) -> None:
        if not self.shared:
            raise LorafleetError(
                f"{what} need a registry the servers share (PostgreSQL, "
                f"{REGISTRY_URL_ENV}); {self.db.location} is this host's own"
            )

    @property
    def request_log(self) -> RequestLog:
        """The log of served requests: its own SQLite file beside the registry's, or the
        shared database's `requests` table."""
        if self._request_log is None:
            self._request_log = RequestLog(
                self.home, self.db.busy_timeout_s, shared=self.db if self.shared else None
            )
        return self._request_log

    def logged_requests(
        self, adapter: str, version: int | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Logged requests of `adapter`, oldest first, each with the feedback on it."""
        rows = [r.to_dict() for r in self.request_log.read(adapter, version, limit)]
        notes = {f["response_id"]: f for f in feedback.list_feedback(self.db, adapter)}
        for row in rows:
            note = notes.get(row["response_id"], {})
            row.update(
                score=note.get("score"),
                correction=note.get("correction"),
                review=note.get("review"),
            )
        return rows

    def artifact_path(self, record: VersionRecord, *, verify: bool = True) -> Path:
        """Directory of a version's files, checked against its sha256 unless verify=False."""
        if record.purged:
            raise NotFound(f"{record.ref} is archived and its files were removed by gc")
        return self.artifacts.local_dir(record.digest, verify=verify)

    # ---- register ------------------------------------------------------------------------

    def register(
        self,
        adapter: str,
        adapter_dir: Path | str,
        *,
        metadata: VersionMetadata | dict[str, Any] | Path | None = None,
        actor: str | None = None,
        reason: str = "",
        assume_base: bool = False,
    ) -> VersionRecord:
        """Validate and store an adapter directory as the next version of `adapter`."""
        check_name(adapter)
        source = Path(adapter_dir).expanduser().absolute()
        meta = load_metadata(source, metadata)
        report = validate_adapter(source, self.base, self.max_rank, meta.labels)
        meta.base_fingerprint = self._claimed_base(source, report, meta, assume_base)
        digest, size = self.artifacts.digest_of(source)
        self._refuse_duplicate(adapter, digest)
        pause_point("register.validated")
        actor = actor or default_actor()
        with self.artifacts.lock(exclusive=False):
            self.artifacts.put(source, digest)
            pause_point("register.stored")
            with self.db.write("register") as txn:
                self._refuse_duplicate(adapter, digest, txn)
                version = versions.next_version_in(txn, adapter)
                versions.insert_version(
                    txn,
                    adapter,
                    version,
                    digest=digest,
                    actor=actor,
                    report=report,
                    size_bytes=size,
                    base_fingerprint=self.base.fingerprint,
                    metadata=meta,
                )
                insert_event(
                    txn,
                    actor=actor,
                    reason=reason or str(source),
                    action="register",
                    adapter=adapter,
                    version=version,
                )
                pause_point("register.committing")
        return self.get_version(adapter, version)

    def _refuse_duplicate(self, adapter: str, digest: str, txn: Transaction | None = None) -> None:
        held = versions.version_with_digest(txn if txn else self.db, adapter, digest)
        if held:
            version, state = held
            raise DuplicateContent(
                f"adapter {adapter!r} version {version} ({state}) already has this content "
                f"(sha256 {digest[:12]}); nothing registered: use {adapter}@{version}"
            )

    def _claimed_base(
        self, source: Path, report: AdapterReport, meta: VersionMetadata, assume_base: bool
    ) -> str:
        """Fingerprint of the base the adapter was trained on; BaseMismatch if not ours."""
        claimed = meta.base_fingerprint
        where = f"{METADATA_FILE} base_fingerprint"
        base_path = report.peft_config.get("base_model_name_or_path")
        if claimed is None and isinstance(base_path, str) and Path(base_path).is_dir():
            claimed = inspect_base(base_path).fingerprint
            where = f"base_model_name_or_path {base_path}"
        if claimed is None:
            if assume_base:
                return self.base.fingerprint
            raise BaseMismatch(
                f"cannot tell which base adapter {source} was trained on: "
                f"base_model_name_or_path {base_path!r} is not a local directory and there is no "
                f"{METADATA_FILE} with base_fingerprint; pass --assume-base to accept it on this "
                f"registry's base {self.base.fingerprint} (its shapes already matched)"
            )
        if claimed != self.base.fingerprint:
            raise BaseMismatch(
                f"adapter {source} was trained on base {claimed} ({where}) but this registry is "
                f"bound to base {self.base.fingerprint} ({self.base.path}); register it in a "
                f"registry for its base (--home) or retrain it on {self.base.path}"
            )
        return claimed

    # ---- aliases -------------------------------------------------------------------------

    def set_alias(
        self,
        adapter: str,
        alias: str,
        version: int,
        *,
        weight: float | None = None,
        actor: str | None = None,
        reason: str = "",
    ) -> AliasMove:
        """Point `alias` at `version`. Only `canary` carries a weight in [0, 1]."""
        return aliases.set_alias(
            self.db,
            adapter,
            alias,
            version,
            weight=weight,
            actor=actor or default_actor(),
            reason=reason,
        )

    def promote(
        self, adapter: str, version: int, *, alias: str = "production", **kw: Any
    ) -> AliasMove:
        """`set_alias` with the production alias as default."""
        return self.set_alias(adapter, alias, version, **kw)

    def rollback(
        self, adapter: str, alias: str = "production", *, actor: str | None = None, reason: str = ""
    ) -> AliasMove:
        """Move `alias` back to the holder it had before its last move (repeatable)."""
        if not versions.has_versions(self.db, adapter):
            raise NotFound(self._unknown_adapter(adapter))
        return aliases.rollback_alias(
            self.db, adapter, alias, actor=actor or default_actor(), reason=reason
        )

    def remove_alias(
        self, adapter: str, alias: str, *, actor: str | None = None, reason: str = ""
    ) -> AliasMove:
        """Delete an alias (recorded; `rollback` restores it)."""
        return aliases.remove_alias(
            self.db, adapter, alias, actor=actor or default_actor(), reason=reason
        )

    # ---- archive, fsck, gc ---------------------------------------------------------------

    def archive(
        self, adapter: str, version: int, *, actor: str | None = None, reason: str = ""
    ) -> VersionRecord:
        """Retire a version; refused while an alias points at it."""
        check_name(adapter)
        with self.db.write("archive") as txn:
            aliases.require_active(txn, adapter, version, "archive it again")
            held = versions.holders_in(txn, adapter, version)
            if held:
                raise AliasConflict(
                    f"{adapter}@{version} is held by alias {', '.join(held)}; move "
                    f"{'them' if len(held) > 1 else 'it'} to another version first "
                    f"(lorafleet registry promote {adapter} VERSION --to {held[0]})"
                )
            versions.mark_archived(txn, adapter, version)
            insert_event(
                txn,
                actor=actor or default_actor(),
                reason=reason,
                action="archive",
                adapter=adapter,
                version=version,
            )
        return self.get_version(adapter, version)

    def fsck(self, *, repair: bool = False, verify: bool = False) -> FsckReport:
        """Check database, artifacts and aliases; `repair` removes what nothing uses and
        dangling aliases; `verify` re-hashes every stored artifact."""
        return maintenance.fsck(
            self.db, self.artifacts, actor=default_actor(), repair=repair, verify=verify
        )

    def gc(self, *, archived: bool = False, dry_run: bool = False) -> list[str]:
        """Remove unreferenced files; with `archived`, also archived versions' files."""
        return maintenance.gc(
            self.db, self.artifacts, actor=default_actor(), archived=archived, dry_run=dry_run
        )
