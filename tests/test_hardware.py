"""registry/hardware.py: the dtype `auto` resolves to on a CPU with and without native bf16,
the warning a forced bf16 gives where it is slow, and the thread count that follows the
CPU's load (a simulated workload whose speed per thread count changes when a busy process
appears and leaves)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import pytest
import torch

from registry import hardware
from registry.errors import LorafleetError
from registry.hardware import CpuInfo, ThreadTuner, cpu_info, resolve_dtype


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, tuple[str, ...]]]:
    """A CPU whose flags the test sets; $LORAFLEET_DTYPE unset."""
    monkeypatch.delenv(hardware.DTYPE_ENV, raising=False)
    flags: dict[str, tuple[str, ...]] = {"flags": ()}
    monkeypatch.setattr(
        hardware, "cpu_info", lambda: CpuInfo("Test CPU", 2, flags["flags"], "AVX2")
    )
    yield flags


def test_auto_is_bf16_only_where_the_cpu_has_it(host: dict[str, tuple[str, ...]]) -> None:
    host["flags"] = ("avx2", "fma")
    assert resolve_dtype("auto") == "fp32"
    host["flags"] = ("avx2", "avx512f", "avx512_bf16")
    assert resolve_dtype("auto") == "bf16"
    host["flags"] = ("avx512f", "amx_tile", "amx_bf16")
    assert resolve_dtype("auto") == "bf16"
    assert resolve_dtype("fp32") == "fp32"  # asked for: kept


def test_the_environment_sets_what_auto_means(
    host: dict[str, tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    host["flags"] = ("amx_bf16",)
    monkeypatch.setenv(hardware.DTYPE_ENV, "fp32")
    assert resolve_dtype("auto") == "fp32"
    monkeypatch.setenv(hardware.DTYPE_ENV, "fp16")
    with pytest.raises(LorafleetError, match=r"LORAFLEET_DTYPE is 'fp16'; set it to fp32 or bf16"):
        resolve_dtype("auto")
    with pytest.raises(LorafleetError, match=r"dtype 'half' is not one of auto, fp32, bf16"):
        resolve_dtype("half")


def test_a_forced_bf16_without_native_support_warns_once_with_its_cost(
    host: dict[str, tuple[str, ...]], caplog: pytest.LogCaptureFixture
) -> None:
    host["flags"] = ("avx2",)
    hardware.warn_slow_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="registry.hardware"):
        assert resolve_dtype("bf16") == "bf16"
        assert resolve_dtype("bf16") == "bf16"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "this CPU (Test CPU) has no native bf16" in warnings[0]
    assert " ms in bf16 vs " in warnings[0] and "use dtype auto or fp32" in warnings[0]
    hardware.warn_slow_bf16.cache_clear()


def test_this_cpu_is_read_from_proc() -> None:
    info = cpu_info()
    assert info.model and info.cores == len(os.sched_getaffinity(0))
    assert set(info.flags) <= set(hardware.FLAGS)
    assert info.native_bf16 == bool({"amx_bf16", "avx512_bf16"} & set(info.flags))
    assert info.torch_capability == torch.backends.cpu.get_cpu_capability()


class Workload:
    """Steps whose time depends on the thread count and on whether a busy process shares
    the CPU, as measured on the 2-core machine (registry/hardware.py's docstring): quiet,
    2 threads take 14 ms and 1 thread 21 ms; with one core busy, 110 ms and 20 ms."""

    def __init__(self) -> None:
        self.now, self.busy, self.threads = 0.0, False, 0
        self.applied: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.applied.append(n)

    def step_s(self) -> float:
        if self.busy:
            return 0.110 if self.threads == 2 else 0.020
        return 0.014 if self.threads == 2 else 0.021

    def run(self, tuner: ThreadTuner, seconds: float) -> list[int]:
        """Run steps for `seconds` of simulated time; the thread count after each."""
        counts, end = [], self.now + seconds
        while self.now < end:
            took = self.step_s()
            self.now += took
            tuner.observe(took, 32)
            counts.append(tuner.current)
        return counts


def tuner_on(work: Workload, **options: object) -> ThreadTuner:
    return ThreadTuner(
        most=2,
        probe_every_s=2.0,
        clock=lambda: work.now,
        set_threads=work.set_threads,
        **options,  # type: ignore[arg-type]
    )


def test_threads_follow_a_busy_core_and_return_when_it_is_free() -> None:
    work = Workload()
    tuner = tuner_on(work)
    assert work.applied == [2]  # every core at start
    quiet = work.run(tuner, 10.0)
    assert quiet[-1] == 2 and tuner.changes == []  # probes of 1 thread lost: kept 2
    assert work.applied.count(1) >= 3  # it did probe
    work.busy = True
    busy = work.run(tuner, 10.0)
    assert tuner.changes[0][:2] == (2, 1)
    assert tuner.changes[0][2] == pytest.approx(5.5, rel=0.05)  # 110 ms / 20 ms
    switched = busy.index(1)
    assert switched * 0.110 < 2.0 + 0.110  # at the first probe (every 2 s here)
    # Later probes of 2 threads end after their two slow steps (plus the one skipped while
    # the team starts): at most 3 x 110 ms per probe.
    assert busy[switched:].count(2) <= 3 * (10.0 / 2.0 + 1)
    work.busy = False
    after = work.run(tuner, 10.0)
    assert tuner.changes[1][:2] == (1, 2) and after[-1] in (1, 2)
    assert tuner.changes[1][2] == pytest.approx(1.5, rel=0.05)
    assert after[len(after) // 2 :].count(2) > 0.9 * (len(after) - len(after) // 2)


def test_a_small_gain_does_not_move_the_threads() -> None:
    work = Workload()
    work.step_s = lambda: 0.014 if work.threads == 2 else 0.0135  # type: ignore[method-assign]
    tuner = tuner_on(work)
    assert work.run(tuner, 20.0)[-1] == 2 and tuner.changes == []  # 4% < margin 10%


def test_fixed_threads_never_move() -> None:
    work = Workload()
    tuner = tuner_on(work, fixed=1)
    work.busy = True
    assert set(work.run(tuner, 10.0)) == {1} and work.applied == [1]
    with pytest.raises(LorafleetError, match="threads must be at least 1, got 0"):
        tuner_on(work, fixed=0)


def test_torch_threads_are_set_on_the_compute_thread() -> None:
    seen: list[int] = []

    def compute() -> None:
        ThreadTuner(fixed=1)
        torch.ones(64, 64) @ torch.ones(64, 64)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=compute)
    thread.start()
    thread.join()
    assert seen == [1]
