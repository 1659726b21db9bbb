"""Pause points for crash tests, and faults injected into a server's requests for canary
tests (`injected_faults`).

Setting ``LORAFLEET_PAUSE_AT=register.copied`` (a comma-separated list) makes a process stop
at that point of a multi-step write, announce it on stderr and sleep, so a test can SIGKILL
it there and check that nothing partial became visible. Unset, a pause point costs one
environment lookup.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

PAUSE_ENV = "LORAFLEET_PAUSE_AT"
PAUSE_S = 600.0


def pause_point(name: str) -> None:
    """Sleep here if `name` is listed in $LORAFLEET_PAUSE_AT."""
    targets = os.environ.get(PAUSE_ENV)
    if targets and name in targets.split(","):
        sys.stderr.write(f"lorafleet: paused at {name}\n")
        sys.stderr.flush()
        time.sleep(PAUSE_S)


FAULTS_ENV = "LORAFLEET_FAULTS"


@dataclass(frozen=True)
class Fault:
    """What a server does to every request of one adapter version (tests only)."""

    delay_s: float = 0.0  # added before each generated token is handed on
    error: bool = False  # the request ends with finish reason "error" at its first token


def injected_faults() -> dict[str, Fault]:
    """Faults by NAME@VERSION from ``LORAFLEET_FAULTS`` (comma-separated
    ``NAME@VERSION=delay:SECONDS`` or ``NAME@VERSION=error``), read once by a server at
    start so canary tests can serve a version that is really slower or failing. Unset:
    an empty dict. ValueError naming the entry and the syntax."""
    faults: dict[str, Fault] = {}
    for entry in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        key, _, what = entry.strip().partition("=")
        kind, _, value = what.partition(":")
        try:
            if "@" not in key:
                raise ValueError("no NAME@VERSION")
            if kind == "error" and not value:
                faults[key] = Fault(error=True)
            elif kind == "delay":
                faults[key] = Fault(delay_s=float(value))
            else:
                raise ValueError(f"unknown fault {what!r}")
        except ValueError as err:
            raise ValueError(
                f"{FAULTS_ENV} entry {entry!r}: {err}; write NAME@VERSION=delay:SECONDS or "
                "NAME@VERSION=error"
            ) from err
    return faults
