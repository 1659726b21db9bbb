"""Pause points for crash tests.

Setting ``LORAFLEET_PAUSE_AT=register.copied`` (a comma-separated list) makes a process stop
at that point of a multi-step write, announce it on stderr and sleep, so a test can SIGKILL
it there and check that nothing partial became visible. Unset, a pause point costs one
environment lookup.
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "LORAFLEET_PAUSE_AT"
PAUSE_S = 600.0


def pause_point(name: str) -> None:
    """Sleep here if `name` is listed in $LORAFLEET_PAUSE_AT."""
    targets = os.environ.get(PAUSE_ENV)
    if targets and name in targets.split(","):
        sys.stderr.write(f"lorafleet: paused at {name}\n")
        sys.stderr.flush()
        time.sleep(PAUSE_S)
