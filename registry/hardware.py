"""What this host computes well, for every entry point (serve, tune, bench): the CPU and its
capability flags, the dtype `auto` resolves to, and the number of torch threads, adapted to
the CPU's load while the work runs.

Measured on the 2-core machines (docs/performance.md, "The host"): bf16 matmuls are fast
only where the CPU has AMX or AVX512-BF16 (on an AVX2-only EPYC a (32x1024)@(1024x2816)
matmul took 148 ms in bf16 vs 4.3 ms in fp32); and two OpenMP threads that meet at every
barrier collapse when another process takes one core (a decode-sized step 14 ms quiet,
110 ms with a busy core, 20 ms on one thread), so a fixed thread count is wrong on a shared
machine.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from registry.errors import LorafleetError

logger = logging.getLogger(__name__)

Dtype = Literal["fp32", "bf16"]
DTYPE_CHOICES = ("auto", "fp32", "bf16")
# What `auto` means on this host when set (fp32 or bf16): one dtype across a fleet of
# mixed CPUs, or a test suite whose references are fp32 on every machine.
DTYPE_ENV = "LORAFLEET_DTYPE"
# The flags that decide dtypes and kernels; the rest of /proc/cpuinfo's list is not recorded.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as every benchmark result records it."""

    model: str
    cores: int  # usable by this process (its affinity mask)
    flags: tuple[str, ...]  # those of FLAGS it has
    torch_capability: str | None  # torch.backends.cpu.get_cpu_capability(), e.g. AVX512

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in NATIVE_BF16)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "cores": self.cores,
            "flags": list(self.flags),
            "torch_capability": self.torch_capability,
            "native_bf16": self.native_bf16,
        }


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@cache
def cpu_info() -> CpuInfo:
    """This host's CPU, read from /proc/cpuinfo (Linux; elsewhere the model only)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    try:
        import torch

        capability: str | None = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        capability = None
    return CpuInfo(model, usable_cores(), tuple(f for f in FLAGS if f in flags), capability)


def resolve_dtype(requested: str, device: str = "cpu") -> Dtype:
    """The dtype to compute in. `auto`: $LORAFLEET_DTYPE when set; else on CUDA bf16 where
    the GPU supports it, on a CPU bf16 where it is native (AMX or AVX512-BF16), fp32
    elsewhere. A bf16 asked for on a CPU without it is kept, with one warning that gives its
    measured cost."""
    if requested not in DTYPE_CHOICES:
        raise LorafleetError(f"dtype {requested!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if requested == "auto":
        chosen = os.environ.get(DTYPE_ENV, "").strip()
        if chosen:
            if chosen not in ("fp32", "bf16"):
                raise LorafleetError(f"${DTYPE_ENV} is {chosen!r}; set it to fp32 or bf16")
            return chosen  # type: ignore[return-value]
        if device == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_info().native_bf16 else "fp32"
    if requested == "bf16" and device == "cpu" and not cpu_info().native_bf16:
        warn_slow_bf16()
    return requested  # type: ignore[return-value]


@cache
def warn_slow_bf16() -> None:
    """Once per process: measure what bf16 costs here and say so."""
    fp32_s, bf16_s = matmul_seconds("fp32"), matmul_seconds("bf16")
    logger.warning(
        "bf16 was asked for, but this CPU (%s) has no native bf16 (AMX or AVX512-BF16): a "
        "(32x1024)@(1024x2816) matmul takes %.1f ms in bf16 vs %.1f ms in fp32 (%.1fx slower "
        "here); use dtype auto or fp32",
        cpu_info().model,
        bf16_s * 1e3,
        fp32_s * 1e3,
        bf16_s / fp32_s,
    )


def matmul_seconds(dtype: Dtype, shape: tuple[int, int, int] = (32, 1024, 2816)) -> float:
    """Best of 3 of one (m x k) @ (k x n) matmul on the CPU in `dtype`."""
    import torch

    m, k, n = shape
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(m, k, dtype=kind), torch.randn(k, n, dtype=kind)
    a @ b  # warm-up: the kernel's first call picks and packs
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@dataclass
class ThreadTuner:
    """torch's intra-op thread count for one compute thread (the engine's, the training
    loop's). `fixed` set: that many, always. Unset: start with every usable core and, every
    `probe_every_s`, run `probe_steps` steps on one thread fewer (or more), then as many
    again on the current count; the trial count is kept when it did `margin` more work per
    second than the current one did around it (the steps just before and just after, so a
    load that changes meanwhile does not decide); a trial at under half the current speed
    ends after two steps. Call `observe` on the compute thread after
    every step: torch's thread count belongs to the thread that sets it."""

    fixed: int | None = None
    most: int = field(default_factory=usable_cores)
    probe_every_s: float = 10.0
    probe_steps: int = 6
    margin: float = 0.1
    clock: Callable[[], float] = time.perf_counter
    set_threads: Callable[[int], None] | None = None  # torch.set_num_threads unless given
    current: int = 0
    changes: list[tuple[int, int, float]] = field(default_factory=list)  # (from, to, gain)

    def __post_init__(self) -> None:
        if self.fixed is not None and self.fixed < 1:
            raise LorafleetError(f"threads must be at least 1, got {self.fixed}")
        self.most = max(1, self.most)
        self._phase = "steady"  # steady -> trial -> back -> steady
        self._incumbent = self._trial = 0
        self._down_first = True
        self._steps: dict[str, deque[tuple[float, float]]] = {
            phase: deque(maxlen=self.probe_steps) for phase in ("steady", "trial", "back")
        }
        self._apply(self.fixed or self.most)
        self._next_probe = self.clock() + self.probe_every_s

    @property
    def adaptive(self) -> bool:
        return self.fixed is None and self.most > 1

    def _apply(self, threads: int) -> None:
        if self.set_threads is None:
            import torch

            torch.set_num_threads(threads)
        else:
            self.set_threads(threads)
        self.current = threads
        self._skip = 1  # a new team's first step pays for starting its threads

    def observe(self, seconds: float, work: float) -> None:
        """One step took `seconds` for `work` (tokens, rows: any measure the next steps
        share)."""
        if not self.adaptive:
            return
        if self._skip:
            self._skip -= 1
            return
        steps = self._steps[self._phase]
        steps.append((work, seconds))
        if self._phase == "trial" and len(steps) >= 2:
            if self._rate("trial") < self._rate("steady") / 2:
                self._end_probe()  # clearly worse: stop paying for it (5x under a busy core)
                return
        if len(steps) < self.probe_steps:
            return
        if self._phase == "steady":
            if self.clock() >= self._next_probe:
                self._begin_trial()
        elif self._phase == "trial":
            self._phase = "back"
            self._apply(self._incumbent)
        else:
            self._decide()

    def _begin_trial(self) -> None:
        down, up = self.current - 1, self.current + 1
        order = (down, up) if self._down_first else (up, down)
        self._down_first = not self._down_first
        self._incumbent = self.current
        self._trial = next(t for t in order if 1 <= t <= self.most)
        self._phase = "trial"
        self._apply(self._trial)

    def _rate(self, phase: str) -> float:
        steps = self._steps[phase]
        seconds = sum(s for _, s in steps)
        return sum(w for w, _ in steps) / seconds if seconds > 0 else 0.0

    def _decide(self) -> None:
        around = (self._rate("steady") + self._rate("back")) / 2
        trial = self._rate("trial")
        if around > 0 and trial > around * (1 + self.margin):
            gain = trial / around
            logger.info(
                "torch threads %d -> %d: %.2fx the work per second (the CPU's load changed)",
                self._incumbent,
                self._trial,
                gain,
            )
            self.changes.append((self._incumbent, self._trial, gain))
            self._incumbent = self._trial
        self._end_probe()

    def _end_probe(self) -> None:
        if self.current != self._incumbent:
            self._apply(self._incumbent)
        for steps in self._steps.values():
            steps.clear()
        self._phase = "steady"
        self._next_probe = self.clock() + self.probe_every_s
