"""Real servers for the shared registry's tests: PostgreSQL and an S3-compatible store.

`postgres_server()` runs Debian's PostgreSQL (`initdb`, `postgres` from
/usr/lib/postgresql/*/bin) in a new temporary directory on a free loopback port, as the
`postgres` user when the tests run as root (PostgreSQL refuses to run as root), and yields
a `Postgres` whose `new_database()` creates an empty database and returns its URL.
`s3_server()` runs moto's S3 server (`python -m moto.server`) on a free loopback port and
yields its endpoint; `new_bucket` makes a bucket for one test. Both are stopped (SIGTERM,
then SIGKILL of the process group) when the block ends, whatever happens inside it.

Tests use them through the `postgres`, `s3` and `shared_store` fixtures of tests/conftest.py.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing(message: str) -> None:
    """Skip, or fail under CI=true, for a server that cannot be started here."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true, so a missing server is a failure", pytrace=False)
    pytest.skip(message)


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@dataclass
class Postgres:
    port: int
    user: str = "postgres"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database of its own; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    bindir = postgres_bin()
    if bindir is None:
        missing(
            "PostgreSQL is not installed: install Debian's postgresql package "
            "(apt-get install postgresql; .ci/run does this)"
        )
        raise AssertionError("unreachable")
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    as_user: str | None = None
    if os.geteuid() == 0:
        as_user = "postgres"
        entry = pwd.getpwnam(as_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data = root / "data"
    try:
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--no-sync"],
            user=as_user, check=True, capture_output=True, cwd=root,
        )
        port = free_port()
        log = (root / "postgres.log").open("wb")
        proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            user=as_user, stdout=log, stderr=subprocess.STDOUT, cwd=root,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                ready = subprocess.run(
                    [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                    capture_output=True,
                )
                if ready.returncode == 0:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "PostgreSQL did not start: " + (root / "postgres.log").read_text()[-4000:]
                    )
                time.sleep(0.2)
            yield Postgres(port)
        finally:
            _stop(proc)
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class S3:
    endpoint: str

    def env(self) -> dict[str, str]:
        """What a client needs to reach this server (s3fs and boto read these)."""
        return {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def new_bucket(self) -> str:
        """An empty bucket of its own; its s3:// URL (with a prefix, as users give one)."""
        import boto3

        name = f"t-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return f"s3://{name}/lorafleet"


@contextmanager
def s3_server() -> Iterator[S3]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        missing("moto is not installed: `make setup` installs it (the dev extra)")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **S3_KEYS},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield S3(endpoint)
    finally:
        _stop(proc)
