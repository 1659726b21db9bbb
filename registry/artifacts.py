"""Content-addressed artifact storage: the one seam between the registry and its files.

An artifact is a flat directory of adapter files stored under the sha256 of its content.
`put` copies into a temporary directory, fsyncs every file and the directory, then renames
it into place, so a killed writer leaves at most an unreferenced temporary or complete
directory, never a half-written artifact under a digest. A shared lock is held from copy to
database commit; `fsck --repair` and `gc` take it exclusively, so they never remove an
artifact that a registration in flight is about to reference.

`LocalArtifactStore` keeps artifacts on a local filesystem; `FsspecArtifactStore`
(registry/object_store.py) keeps them in an object store that many hosts share.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from registry.errors import CorruptArtifact, InvalidAdapter
from registry.faults import pause_point

CHUNK_BYTES = 1024 * 1024


class ArtifactStore(Protocol):
    """Where adapter files live, addressed by the sha256 of their content."""

    location: str  # a directory or a URL, for messages

    def digest_of(self, src_dir: Path) -> tuple[str, int]: ...
    def put(self, src_dir: Path, expected_digest: str) -> None: ...
    def path(self, digest: str) -> Path: ...
    def local_dir(self, digest: str, *, verify: bool = True) -> Path: ...
    def exists(self, digest: str) -> bool: ...
    def verify(self, digest: str) -> None: ...
    def digests(self) -> set[str]: ...
    def leftovers(self) -> list[str]: ...  # paths under the store's root
    def remove(self, digest: str) -> None: ...
    def remove_leftovers(self) -> list[str]: ...
    def lock(self, exclusive: bool) -> AbstractContextManager[None]: ...


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _combine(file_digests: dict[str, str]) -> str:
    """The artifact digest: sha256 over sorted (file name, file sha256) pairs."""
    digest = hashlib.sha256()
    for name in sorted(file_digests):
        digest.update(f"{name}\0{file_digests[name]}\n".encode())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _regular_files(src_dir: Path) -> list[Path]:
    return sorted(p for p in src_dir.iterdir() if p.is_file() and not p.is_symlink())


def directory_digest(src_dir: Path) -> tuple[str, int]:
    """Digest and total size in bytes of the files a `put` of `src_dir` would store (every
    store addresses an artifact so)."""
    files = _regular_files(src_dir)
    return _combine({p.name: sha256_file(p) for p in files}), sum(p.stat().st_size for p in files)


class LocalArtifactStore:
    """Artifacts under ``ROOT/sha256/<digest>/``; temporaries under ``ROOT/tmp/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self.objects = root / "sha256"
        self.tmp = root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock_path = root / ".lock"

    def digest_of(self, src_dir: Path) -> tuple[str, int]:
        return directory_digest(src_dir)

    def put(self, src_dir: Path, expected_digest: str) -> None:
        """Store `src_dir`'s files; refuse if they no longer hash to `expected_digest`."""
        if self.exists(expected_digest):
            return
        staging = self.tmp / uuid.uuid4().hex
        staging.mkdir()
        try:
            file_digests: dict[str, str] = {}
            for src in _regular_files(src_dir):
                file_digests[src.name] = self._copy(src, staging / src.name)
                pause_point("register.copying")
            _fsync_dir(staging)
            if (got := _combine(file_digests)) != expected_digest:
                raise InvalidAdapter(
                    f"adapter directory {src_dir} changed while it was being registered "
                    f"(sha256 {expected_digest[:12]} became {got[:12]}); register it again "
                    "once nothing writes to it"
                )
            pause_point("register.copied")
            try:
                os.rename(staging, self.path(expected_digest))
            except OSError:
                # Another process stored the same content first; theirs is complete.
                if not self.exists(expected_digest):
                    raise
            _fsync_dir(self.objects)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    @staticmethod
    def _copy(src: Path, dst: Path) -> str:
        digest = hashlib.sha256()
        with src.open("rb") as fin, dst.open("wb") as fout:
            while chunk := fin.read(CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        return digest.hexdigest()

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.objects / digest

    def local_dir(self, digest: str, *, verify: bool = True) -> Path:
        """The artifact's directory, checked against its digest unless verify=False."""
        if verify:
            self.verify(digest)
        return self.path(digest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_dir()

    def verify(self, digest: str) -> None:
        """Raise CorruptArtifact unless the stored files still hash to `digest`."""
        path = self.path(digest)
        if not path.is_dir():
            raise CorruptArtifact(f"artifact {digest[:12]} is missing from {self.objects}")
        for p in path.iterdir():
            if p.is_symlink() or not p.is_file():
                raise CorruptArtifact(
                    f"artifact {digest[:12]} contains {p.name!r}, which is not a regular file"
                )
        got = _combine({p.name: sha256_file(p) for p in _regular_files(path)})
        if got != digest:
            raise CorruptArtifact(
                f"artifact {digest[:12]} at {path} was changed after registration "
                f"(its files now hash to {got[:12]}); register the adapter again"
            )

    def digests(self) -> set[str]:
        return {p.name for p in self.objects.iterdir() if p.is_dir()}

    def leftovers(self) -> list[str]:
        """Temporary directories of registrations that never finished (``tmp/NAME``)."""
        return sorted(f"tmp/{p.name}" for p in self.tmp.iterdir())

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest))

    def remove_leftovers(self) -> list[str]:
        names = self.leftovers()
        for name in names:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return names

    @contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Shared while registering, exclusive while removing; released if the process dies."""
        with self._lock_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
