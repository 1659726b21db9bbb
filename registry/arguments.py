"""What every `lorafleet` subcommand that reads or writes the registry shares: the
`--home` / `--json` options, the `--actor` / `--reason` options of writes, and printing a
result as text or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from registry.registry import HOME_ENV, default_home


def registry_options(
    *, reason: bool = True
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Parent parsers: (common: --home, --json; writes: --actor and, with `reason`,
    --reason)."""
    from pathlib import Path

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        type=Path,
        default=None,
        help=f"registry directory (default: ${HOME_ENV} or ~/.lorafleet; now {default_home()})",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument(
        "--actor", help="who makes the change (default: $LORAFLEET_ACTOR or user@host)"
    )
    if reason:
        writes.add_argument("--reason", default="", help="why; kept in the history")
    return common, writes


def emit(args: argparse.Namespace, data: Any, text: str) -> int:
    """Print `data` as JSON with --json, else `text`."""
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0
