"""Artifacts in an object store, for registries that many hosts share: any fsspec URL
(``s3://bucket/prefix``, ``gs://``, ``az://``, ``file:///dir``), with a bounded, verified
local cache of the versions a host serves.

An object store has no atomic rename, so an artifact is complete when its manifest exists:
``ROOT/sha256/DIGEST/FILE`` holds the files and ``ROOT/manifests/DIGEST.json`` (written
last, one PUT) lists each file's name, size and sha256. `put` uploads the files, reads
them back and checks the digest, then writes the manifest; the registry commits its row
after that. A writer killed before the manifest leaves files `leftovers` names and
`remove_leftovers` (fsck --repair, gc) deletes. The lock (shared while registering,
exclusive while removing) is the database's `artifacts_lock`, which every host sharing the
registry takes.

`path(digest)` is the local copy: ``CACHE/sha256/DIGEST``, downloaded into a temporary
directory, checked against the manifest and the digest, then renamed into place. The cache
keeps at most `cache_bytes` (least recently used first out; the newest copy always stays).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from registry.artifacts import (
    CHUNK_BYTES,
    _combine,
    _regular_files,
    directory_digest,
    sha256_file,
)
from registry.errors import CorruptArtifact, InvalidAdapter, LorafleetError
from registry.faults import pause_point

CACHE_BYTES_ENV = "LORAFLEET_ARTIFACT_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 20 * 1024**3


def _check_digest(digest: str) -> str:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest


def cache_bytes_from_env() -> int:
    raw = os.environ.get(CACHE_BYTES_ENV)
    if not raw:
        return DEFAULT_CACHE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise LorafleetError(
            f"{CACHE_BYTES_ENV}={raw!r} is not a positive number of bytes; unset it for "
            f"the default {DEFAULT_CACHE_BYTES}"
        )
    return value


class FsspecArtifactStore:
    """Artifacts under an fsspec URL; `lock` is the shared database's artifacts lock."""

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        lock: Callable[[bool], AbstractContextManager[None]],
        *,
        cache_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        import fsspec

        # botocore says at INFO where it found the keys and the endpoint: not for the CLI
        for name in ("botocore", "aiobotocore", "s3fs"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.url = url.rstrip("/")
        self.location = self.url
        try:
            # Other hosts write here: a cached listing would hide their artifacts.
            self.fs, self.root = fsspec.core.url_to_fs(
                self.url, use_listings_cache=False, **(storage_options or {})
            )
        except (ImportError, ValueError) as err:
            raise LorafleetError(
                f"artifacts URL {url!r}: {err}; use s3://, gs://, az:// or file:// with the "
                "matching fsspec package installed (s3fs, gcsfs, adlfs)"
            ) from err
        self.root = self.root.rstrip("/")
        self.cache = cache_dir / "sha256"
        self.cache_tmp = cache_dir / "tmp"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.cache_tmp.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes_from_env() if cache_bytes is None else cache_bytes
        self._lock = lock

    # ---- names -------------------------------------------------------------------------

    def _files(self, digest: str) -> str:
        return f"{self.root}/sha256/{_check_digest(digest)}"

    def _manifest(self, digest: str) -> str:
        return f"{self.root}/manifests/{_check_digest(digest)}.json"

    def lock(self, exclusive: bool) -> AbstractContextManager[None]:
        return self._lock(exclusive)

    # ---- writing -----------------------------------------------------------------------

    def digest_of(self, src_dir: Path) -> tuple[str, int]:
        return directory_digest(src_dir)

    def put(self, src_dir: Path, expected_digest: str) -> None:
        """Upload `src_dir`'s files, check what the store holds, then write the manifest."""
        if self.exists(expected_digest):
            return
        entries: dict[str, dict[str, Any]] = {}
        self.fs.makedirs(self._files(expected_digest), exist_ok=True)
        for src in _regular_files(src_dir):
            remote = f"{self._files(expected_digest)}/{src.name}"
            self.fs.put_file(str(src), remote)
            entries[src.name] = {"sha256": self._remote_sha256(remote), "size": src.stat().st_size}
            pause_point("register.copying")
        got = _combine({name: e["sha256"] for name, e in entries.items()})
        if got != expected_digest:
            self.fs.rm(self._files(expected_digest), recursive=True)
            raise InvalidAdapter(
                f"adapter directory {src_dir} changed while it was being registered "
                f"(sha256 {expected_digest[:12]} became {got[:12]}); register it again "
                "once nothing writes to it"
            )
        pause_point("register.copied")
        manifest = json.dumps({"digest": expected_digest, "files": entries}, sort_keys=True)
        self.fs.makedirs(f"{self.root}/manifests", exist_ok=True)
        self.fs.pipe_file(self._manifest(expected_digest), manifest.encode())

    def _remote_sha256(self, remote: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(remote, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    # ---- reading -----------------------------------------------------------------------

    def exists(self, digest: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self._manifest(digest)))

    def _read_manifest(self, digest: str) -> dict[str, Any]:
        try:
            data = json.loads(self.fs.cat_file(self._manifest(digest)))
        except FileNotFoundError as err:
            raise CorruptArtifact(f"artifact {digest[:12]} is missing from {self.url}") from err
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict) or data.get("digest") != digest:
            raise CorruptArtifact(f"artifact {digest[:12]} has a malformed manifest in {self.url}")
        if _combine({name: e["sha256"] for name, e in files.items()}) != digest:
            raise CorruptArtifact(
                f"artifact {digest[:12]} in {self.url}: its manifest does not hash to it"
            )
        return files

    def verify(self, digest: str) -> None:
        """Raise CorruptArtifact unless the store's files still hash to `digest` (reads
        every byte: fsck --verify)."""
        files = self._read_manifest(digest)
        stored = {
            Path(p).name for p in self.fs.ls(self._files(digest), detail=False)
        } if self.fs.exists(self._files(digest)) else set()
        if stored != set(files):
            raise CorruptArtifact(
                f"artifact {digest[:12]} in {self.url} holds {sorted(stored)}, its manifest "
                f"lists {sorted(files)}"
            )
        for name, entry in files.items():
            got = self._remote_sha256(f"{self._files(digest)}/{name}")
            if got != entry["sha256"]:
                raise CorruptArtifact(
                    f"artifact {digest[:12]} file {name} in {self.url} was changed after "
                    f"registration (sha256 {got[:12]}); register the adapter again"
                )

    def path(self, digest: str) -> Path:
        return self.cache / _check_digest(digest)

    def local_dir(self, digest: str, *, verify: bool = True) -> Path:
        """The verified local copy of an artifact, downloaded on first use."""
        local = self.path(digest)
        if local.is_dir():
            if verify:
                cached = _combine({p.name: sha256_file(p) for p in _regular_files(local)})
                if cached != digest:  # changed on this host's disk: fetch it again
                    shutil.rmtree(local, ignore_errors=True)
                    return self.local_dir(digest, verify=verify)
            os.utime(local)  # recently used
            return local
        files = self._read_manifest(digest)
        staging = self.cache_tmp / uuid.uuid4().hex
        staging.mkdir()
        try:
            got: dict[str, str] = {}
            for name in files:
                self.fs.get_file(f"{self._files(digest)}/{name}", str(staging / name))
                got[name] = sha256_file(staging / name)
            if _combine(got) != digest:
                bad = sorted(n for n in files if got[n] != files[n]["sha256"])
                raise CorruptArtifact(
                    f"artifact {digest[:12]} in {self.url}: {', '.join(bad)} no longer hash "
                    "to the manifest; register the adapter again"
                )
            try:
                os.rename(staging, local)
            except OSError:
                if not local.is_dir():  # another thread or process cached it first
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self._evict(keep=digest)
        return local

    def _evict(self, keep: str) -> None:
        """Drop least recently used copies until the cache fits `cache_bytes`."""
        copies = []
        for d in self.cache.iterdir():
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            copies.append((d.stat().st_mtime, d, size))
        total = sum(size for _, _, size in copies)
        for _, d, size in sorted(copies):
            if total <= self.cache_bytes:
                break
            if d.name != keep:
                shutil.rmtree(d, ignore_errors=True)
                total -= size

    # ---- maintenance -------------------------------------------------------------------

    def _listed(self, sub: str) -> list[str]:
        path = f"{self.root}/{sub}"
        self.fs.invalidate_cache()
        if not self.fs.exists(path):
            return []
        return [Path(p.rstrip("/")).name for p in self.fs.ls(path, detail=False)]

    def digests(self) -> set[str]:
        return {n.removesuffix(".json") for n in self._listed("manifests") if n.endswith(".json")}

    def leftovers(self) -> list[str]:
        """Uploads that never got their manifest."""
        return sorted(f"sha256/{d}" for d in set(self._listed("sha256")) - self.digests())

    def remove(self, digest: str) -> None:
        """The manifest first: the artifact stops existing before its files go."""
        self.fs.rm(self._manifest(digest))
        if self.fs.exists(self._files(digest)):
            self.fs.rm(self._files(digest), recursive=True)
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def remove_leftovers(self) -> list[str]:
        names = self.leftovers()
        for name in names:
            self.fs.rm(f"{self.root}/{name}", recursive=True)
        for stale in self.cache_tmp.iterdir():
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        return names

