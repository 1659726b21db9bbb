"""What every `lorafleet` subcommand that reads or writes the registry shares: the
`--home` / `--registry` / `--artifacts` / `--json` options, the `--actor` / `--reason`
options of writes, and printing a result as text or JSON."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from registry.registry import ARTIFACTS_URL_ENV, HOME_ENV, REGISTRY_URL_ENV, default_home


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """--registry and --artifacts: where a shared registry keeps its records and files."""
    parser.add_argument(
        "--registry",
        metavar="URL",
        dest="registry_url",
        help=f"the records in PostgreSQL (postgresql://USER:PASSWORD@HOST:PORT/DB) instead of "
        f"the home's SQLite file (default ${REGISTRY_URL_ENV})",
    )
    parser.add_argument(
        "--artifacts",
        metavar="URL",
        dest="artifacts_url",
        help=f"the files in an object store (s3://BUCKET/PREFIX, gs://, az://, file://) "
        f"instead of the home's artifacts/ (default ${ARTIFACTS_URL_ENV})",
    )


def apply_store_options(args: argparse.Namespace) -> None:
    """Set the variables from --registry / --artifacts, so this command and every process
    it starts (servers, workers, jobs) open the same registry."""
    for attribute, variable in (
        ("registry_url", REGISTRY_URL_ENV),
        ("artifacts_url", ARTIFACTS_URL_ENV),
    ):
        if value := getattr(args, attribute, None):
            os.environ[variable] = value


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
    add_store_options(common)
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
