"""Several processes registering and moving aliases at once: no lost update, and the
history is one consistent sequence."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from registry import Registry

WORKER = """
import json, random, sys
from registry import Registry
from registry.errors import AliasConflict

home, worker, ops, versions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(worker)
registry = Registry(home, busy_timeout_s=60)
done = []
for _ in range(ops):
    try:
        if rng.random() < 0.6:
            move = registry.promote("support", rng.randint(1, versions), actor=f"w{worker}")
        else:
            move = registry.rollback("support", actor=f"w{worker}")
    except AliasConflict:
        continue
    if move.changed:
        done.append([move.revision, move.previous, move.version])
print(json.dumps(done))
"""

REGISTER = """
import json, sys
from registry import Registry
home, dirs = sys.argv[1], sys.argv[2:]
registry = Registry(home, busy_timeout_s=60)
print(json.dumps([registry.register("shared", d).version for d in dirs]))
"""


def run_workers(script: str, arg_lists: list[list[str]]) -> list[list[object]]:
    procs = [
        subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
        for args in arg_lists
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        outputs.append(json.loads(out))
    return outputs


def test_concurrent_promote_and_rollback_lose_nothing(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = Registry(home)
    for seed in range(5):
        registry.register("support", adapter_factory(tiny_base, seed=seed))
    registry.promote("support", 1)
    workers, ops = 5, 40

    results = run_workers(WORKER, [[str(home), str(w), str(ops), "5"] for w in range(workers)])

    moves = sorted(tuple(m) for result in results for m in result)  # type: ignore[arg-type]
    history = registry.history("support", "production")
    # Every move a worker saw committed is in the history, at its own revision, and
    # nothing else is: no lost update, no duplicate.
    assert [(e.revision, e.previous, e.version) for e in history[1:]] == moves
    assert len(moves) > workers * ops // 4
    # One consistent sequence: each move starts where the one before it ended.
    for before, after in itertools.pairwise(history):
        assert after.previous == before.version
        assert after.revision > before.revision
    assert registry.resolve("support").version == history[-1].version
    assert registry.revision() == max(e.revision for e in registry.history(all_events=True))
    assert registry.fsck(verify=True).clean


def test_concurrent_registers_get_distinct_versions(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    dirs = [str(adapter_factory(tiny_base, seed=100 + i)) for i in range(12)]
    results = run_workers(REGISTER, [[str(home), *dirs[i::4]] for i in range(4)])
    versions = sorted(v for result in results for v in result)  # type: ignore[type-var]
    assert versions == list(range(1, 13))
    registry = Registry(home)
    assert len({v.digest for v in registry.list_versions("shared")}) == 12
    assert registry.fsck(verify=True).clean
