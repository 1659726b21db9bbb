"""The registry's validation corpus through the admin API (`POST /admin/adapters/NAME`):
every broken adapter and every unsafe file or adapter name is refused with the registry's
message and registers nothing (revision, versions, artifacts, temporary directories
unchanged; fsck clean); a good adapter is accepted and served. A file changed on disk after
registration is refused at load while the previous version keeps serving (the
residency-level check is tests/serving/test_residency.py::test_tampered_artifact_is_refused).

All of it runs in process (conftest's `serve_in_process`: the HTTP app over a real Server
and hf engine): uploads, the registry's refusals and serving what was registered are the
app's and the Server's; nothing here depends on BentoML or on a process of its own.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from registry import Registry

Service = Any  # the server of conftest's `serve_in_process`
MAX_ADAPTER_BYTES = 1_000_000
WEIGHTS = "adapter_model.safetensors"


def _validation_corpus() -> ModuleType:
    """tests/ is no package: load the registry's corpus from its file."""
    name = "lorafleet_tests_validation"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "registry" / "test_validation.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# Every case of the registry's corpus that a file list can carry: a symlink cannot be
# uploaded (the server writes regular files; test_security.py checks register refuses one).
CORPUS = [c for c in _validation_corpus().CORPUS if c[0].__name__ != "symlink_inside"]


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    serve_in_process: Callable[..., AbstractContextManager[Service]],
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("admin-register")
    Registry.create(root / "home", tiny_base, max_rank=16, actor="tests").close()
    uploads = root / "tmp"  # the server's temporary directory: where uploads are decoded
    uploads.mkdir()
    options = {"max_tokens_limit": 16, "max_adapter_bytes": MAX_ADAPTER_BYTES}
    with pytest.MonkeyPatch.context() as env:
        env.setattr(tempfile, "tempdir", str(uploads))  # what $TMPDIR sets for a process
        with serve_in_process(root / "home", tiny_base, {}, **options) as running:
            running.uploads = uploads
            yield running


def encode(adapter: Path) -> dict[str, str]:
    return {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted(adapter.iterdir())}


def upload(service: Service, name: str, files: dict[str, str], **fields: object) -> Any:
    return service.admin(f"/admin/adapters/{name}", {"files": files, **fields})


def state(service: Service) -> tuple[object, ...]:
    """Everything a refused upload must leave unchanged."""
    registry = Registry(service.home)
    try:
        versions = {a: [v.ref for v in registry.list_versions(a)] for a in registry.adapter_names()}
        return (
            registry.revision(),
            versions,
            sorted(os.listdir(service.home / "artifacts" / "sha256")),
            sorted(os.listdir(service.home / "artifacts" / "tmp")),
            uploads_left(service),
        )
    finally:
        registry.close()


def uploads_left(service: Service) -> list[str]:
    """Directories the server decoded uploads into that still exist."""
    return sorted(p.name for p in service.uploads.glob("lorafleet-upload-*"))


def fsck_problems(service: Service) -> list[str]:
    registry = Registry(service.home)
    try:
        return registry.fsck(verify=True).problems
    finally:
        registry.close()


def assert_refused(
    service: Service, name: str, files: dict[str, str], status: int, message: str
) -> None:
    before = state(service)
    response = upload(service, name, files)
    assert response.status_code == status, response.text
    is_json = response.headers.get("content-type", "").startswith("application/json")
    assert message in (response.json()["error"]["message"] if is_json else response.text)
    assert state(service) == before
    assert fsck_problems(service) == []


@pytest.mark.parametrize(("breakage", "message"), CORPUS, ids=[c[0].__name__ for c in CORPUS])
def test_broken_adapter_is_refused_and_nothing_changes(
    breakage: Callable[[Path], None],
    message: str,
    service: Service,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    copy_adapter: Callable[[Path], Path],
) -> None:
    adapter = copy_adapter(adapter_factory(tiny_base))
    breakage(adapter)
    assert_refused(service, "support", encode(adapter), 422, message)


def test_other_base_rank_above_limit_and_pickle_are_refused(
    service: Service,
    tiny_base: Path,
    other_base: Path,
    adapter_factory: Callable[..., Path],
    copy_adapter: Callable[[Path], Path],
) -> None:
    ours = Registry(service.home)
    fingerprint = ours.base.fingerprint
    ours.close()
    other = encode(adapter_factory(other_base))
    assert_refused(service, "support", other, 422, f"bound to base {fingerprint}")
    big = encode(adapter_factory(tiny_base, rank=32))
    assert_refused(service, "support", big, 422, "has rank 32 > max rank 16 of this registry")
    # A pickle beside valid safetensors is still refused: lorafleet never unpickles.
    for suffix in (".bin", ".pt"):
        files = {**encode(adapter_factory(tiny_base)), f"extra{suffix}": "gAR9lC4="}
        assert_refused(service, "support", files, 422, f"contains pickle file 'extra{suffix}'")


@pytest.mark.parametrize(
    "file_name",
    ["../x", "a/b", ".hidden", "..", "/etc/passwd", "sub/adapter_model.safetensors", "a\\b", ""],
)
def test_unsafe_file_names_are_refused_naming_the_file(
    file_name: str, service: Service, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    files = {**encode(adapter_factory(tiny_base)), file_name: "AAAA"}
    assert_refused(service, "support", files, 400, f"file name {file_name!r} is not allowed")


@pytest.mark.parametrize("name", ["Bad", "_x", "base", "a..b", "%2E%2E"])
def test_bad_adapter_names_are_refused(
    name: str, service: Service, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    files = encode(adapter_factory(tiny_base))
    assert_refused(service, name, files, 400, "invalid adapter name")


@pytest.mark.parametrize("name", ["..%2Fevil", "a%2Fb", "%2Fetc%2Fpasswd"])
def test_adapter_names_with_a_slash_match_no_route(
    name: str, service: Service, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    files = encode(adapter_factory(tiny_base))
    assert_refused(service, name, files, 404, "Not Found")


def test_invalid_alias_is_refused_before_registering(
    service: Service, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    before = state(service)
    files = encode(adapter_factory(tiny_base, seed=74))
    response = upload(service, "aliased", files, alias="../production")
    assert response.status_code == 400, response.text
    assert "invalid alias '../production'" in response.json()["error"]["message"]
    assert state(service) == before


def test_oversized_and_undecodable_uploads_are_refused(
    service: Service, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    files = encode(adapter_factory(tiny_base))
    padding = base64.b64encode(b"\0" * (MAX_ADAPTER_BYTES + 3)).decode()
    assert_refused(
        service, "support", {**files, "notes.txt": padding}, 413, f"> {MAX_ADAPTER_BYTES}"
    )
    assert_refused(
        service, "support", {**files, "notes.txt": "not base64!"}, 400, "'notes.txt' is not valid"
    )


def test_good_adapter_is_registered_and_served(
    service: Service, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    adapter = adapter_factory(tiny_base, seed=71)
    response = upload(service, "uploaded", encode(adapter), alias="production", reason="r1")
    assert response.status_code == 201, response.text
    record = response.json()
    assert (record["ref"], record["aliases"], record["actor"]) == (
        "uploaded@1",
        ["production"],
        "api:tester",
    )
    registry = Registry(service.home)
    try:
        stored = registry.artifact_path(registry.get_version("uploaded", 1))
        events = registry.history("uploaded", all_events=True)
        assert [(e.action, e.reason) for e in events] == [("register", "r1"), ("alias.set", "r1")]
    finally:
        registry.close()
    for path in adapter.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert hashlib.sha256((stored / path.name).read_bytes()).hexdigest() == digest
    assert service.served("uploaded")[0] == "uploaded@1"
    assert service.served("uploaded") == service.served("uploaded@1")
    # The same content again names the version that has it; nothing new.
    assert_refused(service, "uploaded", encode(adapter), 409, "version 1 (active) already has")
    assert uploads_left(service) == []


def test_tampered_artifact_is_refused_and_the_previous_version_keeps_serving(
    service: Service, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    first = upload(
        service, "guarded", encode(adapter_factory(tiny_base, seed=72)), alias="production"
    )
    assert first.status_code == 201, first.text
    before = service.served("guarded")
    assert before[0] == "guarded@1"
    second = upload(service, "guarded", encode(adapter_factory(tiny_base, seed=73)))
    assert second.status_code == 201, second.text
    weights = service.home / "artifacts" / "sha256" / second.json()["digest"] / WEIGHTS
    original = weights.read_bytes()
    weights.chmod(0o644)
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        promoted = service.admin("/admin/promote", {"adapter": "guarded", "version": 2})
        assert promoted.status_code == 200, promoted.text
        assert service.served("guarded") == before  # production stays on version 1
        refused = service.http.post(
            "/v1/completions", json={"model": "guarded@2", "prompt": "x", "max_tokens": 2}
        )
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["type"] == "CorruptArtifact"
        assert "was changed after registration" in error["message"]
        assert any("was changed after registration" in p for p in fsck_problems(service))
    finally:
        weights.write_bytes(original)
    assert fsck_problems(service) == []


def test_uploads_are_decoded_into_a_private_directory_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.errors import BadRequest
    from serving.http.uploads import unpacked

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = {"adapter_config.json": base64.b64encode(b'{"r": 4}').decode()}
    with unpacked(files, max_bytes=100) as directory:
        assert directory.parent == tmp_path
        assert directory.stat().st_mode & 0o777 == 0o700
        written = directory / "adapter_config.json"
        assert (written.read_bytes(), written.stat().st_mode & 0o777) == (b'{"r": 4}', 0o600)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadRequest, match=r"'b\.txt' is not valid base64"):
        with unpacked({**files, "b.txt": "!!!!"}, max_bytes=100):
            pass
    assert list(tmp_path.iterdir()) == []
