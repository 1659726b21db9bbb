"""The dashboard's view of the registry (registry/storage/fleet.py) and the `pinned` setting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from registry import Registry
from registry.errors import NotFound
from registry.storage import jobs
from registry.storage.fleet import fleet_snapshot
from registry.storage.verdicts import decide_canary


@pytest.fixture
def reg(home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]) -> Registry:
    registry = Registry(home)
    registry.register("support", adapter_factory(tiny_base, seed=1), actor="tests")
    registry.promote("support", 1, actor="alice", reason="first")
    registry.register("support", adapter_factory(tiny_base, seed=2), actor="tests")
    registry.register("legal", adapter_factory(tiny_base, seed=3), actor="tests")
    return registry


def test_snapshot_lists_versions_aliases_and_the_last_move(reg: Registry) -> None:
    reg.promote("support", 2, actor="bob", reason="try 2")
    reg.rollback("support", actor="carol", reason="too slow")
    fleet = fleet_snapshot(reg.db)
    assert fleet["revision"] == reg.revision()
    support, legal = fleet["adapters"][1], fleet["adapters"][0]
    assert (legal["name"], support["name"]) == ("legal", "support")
    assert [v["version"] for v in support["versions"]] == [1, 2]
    assert support["versions"][0]["actor"] == "tests"
    assert support["aliases"] == {
        "production": {
            "version": 1,
            "weight": None,
            "updated_at": support["aliases"]["production"]["updated_at"],
        }
    }
    move = support["last_move"]
    assert (move["action"], move["alias"], move["actor"], move["reason"]) == (
        "alias.rollback",
        "production",
        "carol",
        "too slow",
    )
    assert legal["last_move"] is None and legal["aliases"] == {} and not legal["pinned"]
    # newest first, alias moves only (registrations are not in the default history)
    assert [e["action"] for e in fleet["events"]] == ["alias.rollback", "alias.set", "alias.set"]
    assert len(fleet_snapshot(reg.db, events=2)["events"]) == 2


def test_pin_is_a_setting_with_its_own_history_event(reg: Registry) -> None:
    reg.pin("legal", actor="alice", reason="hot")
    assert reg.settings("legal").pinned
    assert [a["pinned"] for a in fleet_snapshot(reg.db)["adapters"]] == [True, False]
    reg.pin("legal", False, actor="alice", reason="cold")
    assert not reg.settings("legal").pinned
    assert [(e.action, e.reason) for e in reg.history("legal")] == [
        ("adapter.pin", "hot"),
        ("adapter.unpin", "cold"),
    ]
    revision = reg.revision()
    with pytest.raises(NotFound, match="registered adapters: legal, support"):
        reg.pin("nope", reason="typo")
    assert reg.revision() == revision


def test_jobs_carry_their_trigger_result_and_canary_verdict(reg: Registry) -> None:
    job, _ = jobs.queue_job(reg.db, "support", actor="alice", reason="weekly")
    jobs.claim_job(reg.db, actor="runner")
    jobs.finish_job(
        reg.db,
        job.id,
        succeeded=True,
        actor="runner",
        summary="registered support@2",
        version=2,
        result={"gate": {"passed": True, "failures": []}},
        canary=(0.1, "gate passed"),
    )
    listed = fleet_snapshot(reg.db)["jobs"]
    assert [(j["id"], j["trigger"], j["version"]) for j in listed] == [(job.id, "manual", 2)]
    assert listed[0]["result"]["gate"]["passed"] is True
    assert listed[0]["canary_verdict"] is None
    assert fleet_snapshot(reg.db)["adapters"][1]["aliases"]["canary"]["weight"] == 0.1
    decide_canary(reg.db, "support", "promoted", actor="watch", reason="all criteria passed")
    verdict = fleet_snapshot(reg.db)["jobs"][0]["canary_verdict"]
    assert verdict["actor"] == "watch"
    assert verdict["reason"] == "promoted: all criteria passed"
