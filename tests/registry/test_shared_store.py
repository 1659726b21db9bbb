"""The shared registry's own guarantees, on real PostgreSQL and S3 servers (tests/stores.py):
nothing of it lands in the home but the cache; artifacts are complete only with their
manifest and verified on the way down; a promote by another process is notified at once;
and bad URLs are refused with messages that never show a password."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from registry import Registry
from registry.errors import CorruptArtifact, LorafleetError, NotInitialized
from registry.object_store import FsspecArtifactStore

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def s3fs_of(registry: Registry) -> Any:
    store = registry.artifacts
    assert isinstance(store, FsspecArtifactStore)
    return store


def test_records_and_files_live_in_the_servers(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path], shared_store: dict[str, str]
) -> None:
    registry = Registry(home)
    record = registry.register("support", adapter_factory(tiny_base, seed=1))
    registry.promote("support", 1)
    assert not (home / "registry.db").exists() and not (home / "artifacts").exists()
    with psycopg.connect(shared_store["LORAFLEET_REGISTRY_URL"]) as conn:
        rows = conn.execute("SELECT adapter, version, digest FROM versions").fetchall()
        applied = conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert rows == [("support", 1, record.digest)]
    assert applied == [(2,), (3,)]
    store = s3fs_of(registry)
    bucket = shared_store["LORAFLEET_ARTIFACTS_URL"].removeprefix("s3://")
    names = {p.rsplit("/", 1)[-1] for p in store.fs.find(bucket)}
    assert f"{record.digest}.json" in names and "adapter_model.safetensors" in names
    local = registry.artifact_path(record)
    assert local == home / "artifact-cache" / "sha256" / record.digest
    assert sorted(p.name for p in local.iterdir()) == sorted(
        p.name for p in adapter_factory(tiny_base, seed=1).iterdir() if p.is_file()
    )
    registry.close()


def test_a_changed_object_is_found_and_never_served(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = Registry(home)
    record = registry.register("support", adapter_factory(tiny_base, seed=2))
    store = s3fs_of(registry)
    weights = f"{store._files(record.digest)}/adapter_model.safetensors"
    store.fs.pipe_file(weights, store.fs.cat_file(weights)[:-8] + b"\0" * 8)
    problems = registry.fsck(verify=True).problems
    assert any("adapter_model.safetensors" in p and "changed after" in p for p in problems)
    with pytest.raises(CorruptArtifact, match="no longer hash"):
        registry.artifact_path(record)  # nothing cached: the download is checked
    assert not store.path(record.digest).exists()
    registry.close()


def test_a_changed_cached_copy_is_fetched_again(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = Registry(home)
    record = registry.register("support", adapter_factory(tiny_base, seed=3))
    local = registry.artifact_path(record)
    original = (local / "adapter_model.safetensors").read_bytes()
    (local / "adapter_model.safetensors").write_bytes(original[:-4] + b"\0\0\0\0")
    assert (registry.artifact_path(record) / "adapter_model.safetensors").read_bytes() == original
    registry.close()


def test_the_cache_stays_within_its_bound(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = Registry(home)
    records = [registry.register("support", adapter_factory(tiny_base, seed=s)) for s in (4, 5, 6)]
    store = s3fs_of(registry)
    one = sum(p.stat().st_size for p in adapter_factory(tiny_base, seed=4).iterdir())
    store.cache_bytes = int(one * 2.5)
    for record in records:
        registry.artifact_path(record)
        time.sleep(0.05)  # distinct use times
    cached = sorted(p.name for p in store.cache.iterdir())
    assert cached == sorted(r.digest for r in records[1:])  # the oldest went first
    registry.close()


def test_an_upload_without_its_manifest_is_a_leftover_gc_removes(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = Registry(home)
    store = s3fs_of(registry)
    source = adapter_factory(tiny_base, seed=7)
    digest, _ = store.digest_of(source)
    store.fs.put_file(str(source / "adapter_config.json"), f"{store._files(digest)}/x.json")
    assert not store.exists(digest)
    assert store.leftovers() == [f"sha256/{digest}"]
    assert registry.fsck().problems == [f"unfinished registration left sha256/{digest}"]
    assert registry.gc() == [f"sha256/{digest}"]
    assert store.leftovers() == [] and registry.fsck().problems == []
    registry.close()


def test_a_promote_elsewhere_is_notified_at_once(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path], shared_store: dict[str, str]
) -> None:
    registry = Registry(home)
    registry.register("support", adapter_factory(tiny_base, seed=8))
    assert registry.wait_for_change(0.2) is False  # listening now; nothing changed
    before = registry.revision()
    other = subprocess.Popen(
        [sys.executable, "-c", "from registry import Registry; import sys; "
         "Registry(sys.argv[1]).promote('support', 1, actor='elsewhere')", str(home)],
    )
    started = time.monotonic()
    try:
        assert registry.wait_for_change(60) is True
        waited = time.monotonic() - started
    finally:
        assert other.wait(timeout=60) == 0
    assert registry.revision() == before + 1
    print(f"\nnotified {waited:.2f} s after the promoting process started")
    registry.close()


def test_urls_that_cannot_work_are_refused_without_their_password(
    backend: str, tmp_path: Path, tiny_base: Path, postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_REGISTRY_URL", "mysql://root:hunter2@db/lorafleet")
    with pytest.raises(LorafleetError, match="is not a postgresql:// URL") as found:
        Registry.create(tmp_path / "a", tiny_base)
    assert "hunter2" not in str(found.value)
    wrong = f"postgresql://nobody:hunter2@127.0.0.1:{postgres.port}/nothing"
    monkeypatch.setenv("LORAFLEET_REGISTRY_URL", wrong)
    with pytest.raises(LorafleetError, match="cannot reach the registry database") as found:
        Registry.create(tmp_path / "b", tiny_base)
    assert "hunter2" not in str(found.value) and "nobody:***@127.0.0.1" in str(found.value)
    monkeypatch.setenv("LORAFLEET_REGISTRY_URL", postgres.new_database())
    with pytest.raises(NotInitialized, match="no registry at postgresql://"):
        Registry(tmp_path / "c")


def test_base_fetch_copies_the_registrys_base_from_the_object_store(
    home: Path, tiny_base: Path, other_base: Path, cli: Callable[..., Any]
) -> None:
    registry = Registry(home)
    store = s3fs_of(registry)
    bucket = store.url.removeprefix("s3://").split("/")[0]
    for name, base in (("tiny", tiny_base), ("other", other_base)):
        store.fs.put(str(base), f"{bucket}/bases/{name}", recursive=True)
    out = home.parent / "replica" / "base"
    done = cli("base", "fetch", f"s3://{bucket}/bases/tiny", "--out", str(out), home=home)
    assert done.returncode == 0, done.stderr
    assert "the registry's base" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_base.iterdir())
    again = cli("base", "fetch", f"s3://{bucket}/bases/tiny", "--out", str(out), home=home)
    assert again.returncode == 0, again.stderr  # already there: kept
    elsewhere = out.parent / "other"
    wrong = cli("base", "fetch", f"s3://{bucket}/bases/other", "--out", str(elsewhere), home=home)
    assert wrong.returncode == 2
    assert f"bound to {registry.base.fingerprint}" in wrong.stderr
    assert [p.name for p in out.parent.iterdir()] == ["base"]  # nothing of the wrong one
    registry.close()
