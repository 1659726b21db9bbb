"""Adapter files uploaded to `POST /admin/adapters/NAME`: names checked, size bounded,
decoded into a private temporary directory, registered (the registry validates everything)
and removed again. A refused upload leaves the registry exactly as it was."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from registry.names import check_name
from registry.records import VersionRecord
from registry.registry import Registry
from serving.errors import AdapterTooLarge, BadRequest

logger = logging.getLogger(__name__)

# A flat file name: no path separators, no '..', not hidden (the first character is
# alphanumeric), at most 128 characters.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_FILES = 32


def check_file_names(names: list[str]) -> None:
    """Raise BadRequest naming the first file name that is not a plain, visible file name."""
    if len(names) > MAX_FILES:
        raise BadRequest(
            f"files: {len(names)} files > {MAX_FILES}; upload the adapter's files only"
        )
    for name in names:
        if not FILE_NAME.fullmatch(name) or ".." in name:
            raise BadRequest(
                f"files: file name {name!r} is not allowed; use a plain file name of "
                "letters, digits, '.', '_' or '-' starting with a letter or digit (no "
                "directories, no '..', no hidden files), e.g. adapter_model.safetensors"
            )


def check_size(files: dict[str, str], max_bytes: int) -> None:
    """Bound the decoded size from the base64 lengths, before anything is decoded."""
    decoded = sum(len(text) * 3 // 4 for text in files.values())
    if decoded > max_bytes:
        raise AdapterTooLarge(
            f"files: the adapter's files decode to about {decoded} bytes > {max_bytes}, the "
            "limit of this server; start it with a larger --max-adapter-mb or register the "
            "directory with `lorafleet registry register`"
        )


@contextmanager
def unpacked(files: dict[str, str], max_bytes: int) -> Iterator[Path]:
    """The uploaded files decoded into a new private directory, removed when the block ends."""
    check_file_names(sorted(files))
    check_size(files, max_bytes)
    directory = Path(tempfile.mkdtemp(prefix="lorafleet-upload-"))  # mode 0700
    try:
        for name, text in files.items():
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as err:
                raise BadRequest(
                    f"files: {name!r} is not valid base64 ({err}); encode each file's bytes "
                    "with standard base64"
                ) from err
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(directory / name, flags, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def register_upload(
    registry: Registry,
    adapter: str,
    files: dict[str, str],
    *,
    max_bytes: int,
    actor: str,
    reason: str,
    alias: str | None = None,
) -> VersionRecord:
    """Decode, validate and register the files as the next version of `adapter`, then point
    `alias` at it; names are checked before anything is decoded or registered."""
    check_name(adapter)
    if alias is not None:
        check_name(alias, "alias")
    reason = reason or "uploaded over the admin API"
    with unpacked(files, max_bytes) as directory:
        record = registry.register(adapter, directory, actor=actor, reason=reason)
    logger.info("registered %s from an upload by %s", record.ref, actor)
    if alias is None:
        return record
    registry.set_alias(adapter, alias, record.version, actor=actor, reason=reason)
    return registry.get_version(adapter, record.version)
