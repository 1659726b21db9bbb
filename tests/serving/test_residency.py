"""Residency on the hf engine: LRU eviction bounded by slots, pins never evicted, tampered
artifacts refused before loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from registry import Registry
from registry.errors import CorruptArtifact
from serving.engines.hf import HFEngine
from serving.errors import Overloaded
from serving.runtime.residency import Residency
from serving.runtime.routing import Target


@pytest.fixture
def setup(home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]):  # type: ignore[no-untyped-def]
    registry = Registry(home)
    for seed in range(3):
        registry.register("a", adapter_factory(tiny_base, seed=40 + seed))
    engine = HFEngine(tiny_base, max_batch=2, max_len=64, adapter_slots=2, max_rank=8)
    yield registry, engine, Residency(engine, "hf", registry)
    engine.shutdown()


def test_lru_evicts_the_least_recently_used(setup) -> None:  # type: ignore[no-untyped-def]
    _, engine, residency = setup
    residency.ensure(Target("a", 1))
    residency.ensure(Target("a", 2))
    residency.ensure(Target("a", 1))  # a@1 is now the most recent
    residency.ensure(Target("a", 3))
    assert residency.resident() == ["a@1", "a@3"]
    assert engine.resident() == ["a@1", "a@3"]


def test_pinned_versions_stay(setup) -> None:  # type: ignore[no-untyped-def]
    registry, engine, _ = setup
    residency = Residency(engine, "hf", registry, slot_wait_s=0.5)
    residency.ensure(Target("a", 1))
    residency.ensure(Target("a", 2))
    residency.pinned = {"a@1", "a@2"}
    with pytest.raises(Overloaded, match="pinned or busy"):
        residency.ensure(Target("a", 3))
    assert residency.resident() == ["a@1", "a@2"]


def test_a_version_being_admitted_is_not_evicted(setup) -> None:  # type: ignore[no-untyped-def]
    """Between a request's residency check and its submit, another request's miss must
    evict something else (or wait), never the version that request is about to use."""
    _, engine, residency = setup
    residency.ensure(Target("a", 1))
    residency.ensure(Target("a", 2))
    with residency.held("a@1"):  # a@1 is the least recently used
        residency.ensure(Target("a", 3))
        assert "a@1" in engine.resident()
    assert residency.resident() == ["a@1", "a@3"]


def test_tampered_artifact_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    registry, engine, residency = setup
    record = registry.get_version("a", 2)
    weights = registry.artifact_path(record) / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="was changed after registration"):
        residency.ensure(Target("a", 2))
    assert "a@2" not in engine.resident()
