"""`fsck` and `gc`: find and remove what a killed process or an archive left behind.

Both run under the exclusive artifact lock, so a registration in flight (which holds the
lock shared from copy to commit) is never mistaken for an orphan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from registry.artifacts import ArtifactStore
from registry.errors import CorruptArtifact
from registry.storage.backend import Database
from registry.storage.history import insert_event


@dataclass
class FsckReport:
    """What `fsck` found and, with repair, what it fixed."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked_versions: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "problems": self.problems,
            "repaired": self.repaired,
            "checked_versions": self.checked_versions,
        }


def fsck(
    db: Database, artifacts: ArtifactStore, *, actor: str, repair: bool, verify: bool
) -> FsckReport:
    """Check the database, the artifacts and the aliases; with `repair`, fix what can be."""
    report = FsckReport()
    with artifacts.lock(exclusive=True):
        report.problems += [f"database: {p}" for p in db.integrity_problems()]
        rows = db.query("SELECT adapter, version, digest, purged FROM versions")
        report.checked_versions = len(rows)
        for r in rows:
            if r["purged"]:
                continue
            try:
                if verify:
                    artifacts.verify(r["digest"])
                elif not artifacts.exists(r["digest"]):
                    raise CorruptArtifact(f"artifact {r['digest'][:12]} is missing")
            except CorruptArtifact as err:
                report.problems.append(f"{r['adapter']}@{r['version']}: {err}")
        orphans = sorted(artifacts.digests() - {r["digest"] for r in rows if not r["purged"]})
        leftovers = artifacts.leftovers()
        report.problems += [f"orphan artifact {d[:12]} (no version uses it)" for d in orphans]
        report.problems += [f"unfinished registration left {t}" for t in leftovers]
        dangling = db.query(
            "SELECT a.adapter, a.alias, a.version FROM aliases a LEFT JOIN versions v ON"
            " v.adapter = a.adapter AND v.version = a.version"
            " WHERE v.version IS NULL OR v.state != 'active'"
        )
        report.problems += [
            f"alias {r['adapter']}:{r['alias']} points at missing or archived "
            f"version {r['version']}"
            for r in dangling
        ]
        if not repair:
            return report
        for digest in orphans:
            artifacts.remove(digest)
            report.repaired.append(f"removed orphan artifact {digest[:12]}")
        for name in artifacts.remove_leftovers():
            report.repaired.append(f"removed unfinished registration tmp/{name}")
        for r in dangling:
            with db.write("fsck repair") as txn:
                insert_event(
                    txn,
                    actor=actor,
                    reason="dangling alias removed by fsck",
                    action="alias.remove",
                    adapter=r["adapter"],
                    alias=r["alias"],
                    previous=r["version"],
                )
                txn.execute(
                    "DELETE FROM aliases WHERE adapter = ? AND alias = ?",
                    (r["adapter"], r["alias"]),
                )
            report.repaired.append(f"removed dangling alias {r['adapter']}:{r['alias']}")
    return report


def gc(
    db: Database, artifacts: ArtifactStore, *, actor: str, archived: bool, dry_run: bool
) -> list[str]:
    """Remove unreferenced artifacts and temporaries; with `archived`, archived versions'
    files too (their records stay, marked purged). Returns what was (or would be) removed."""
    removed: list[str] = []
    with artifacts.lock(exclusive=True):
        rows = db.query("SELECT adapter, version, digest, state, purged FROM versions")
        kept = {r["digest"] for r in rows if r["state"] == "active"}
        if not archived:
            kept |= {r["digest"] for r in rows if not r["purged"]}
        for digest in sorted(artifacts.digests() - kept):
            users = [f"{r['adapter']}@{r['version']}" for r in rows if r["digest"] == digest]
            removed.append(f"artifact {digest[:12]} ({', '.join(users) or 'orphan'})")
            if not dry_run:
                artifacts.remove(digest)
        removed += artifacts.leftovers()
        if dry_run:
            return removed
        artifacts.remove_leftovers()
        if archived:
            with db.write("gc") as txn:
                purged = txn.execute(
                    "UPDATE versions SET purged = 1 WHERE state = 'archived' AND purged = 0"
                ).rowcount
                if purged:
                    insert_event(
                        txn,
                        actor=actor,
                        reason=f"files of {purged} archived version(s)",
                        action="gc",
                    )
    return removed
