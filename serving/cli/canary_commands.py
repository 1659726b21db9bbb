"""`lorafleet canary promote|rollback|status`: the manual override of canary verdicts.

promote and rollback write the registry directly (no server needed; running servers follow
within a poll interval) through the same transaction as the servers' automatic verdicts
(registry/storage/verdicts.py). status asks a running server for its live comparison of the
canary with production (GET /admin/canary).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from registry.arguments import registry_options

CANARY_HELP = """Decide a canary by hand. A server judges each canary by itself once it has
served canary_min_requests requests and canary_window_s seconds have passed (adapter
settings): one-sided tests of error rate, latency per token, feedback, drift (and shadow
outputs) against production, each pass / fail / inconclusive; an inconclusive canary is
held or rolled back at canary_max_window_s. promote or rollback here decide it by hand
(also a held one), and status shows the server's live comparison with every test."""


def add_canary_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet canary ...`."""
    canary = commands.add_parser(
        "canary", help="promote, roll back or inspect an adapter's canary", description=CANARY_HELP
    )
    sub = canary.add_subparsers(title="canary commands", metavar="COMMAND", required=True)
    common, writes = registry_options()
    for verb, verdict, what in (
        ("promote", "promoted", "production -> the canary's version, canary alias removed"),
        ("rollback", "rolled_back", "canary alias removed, production unchanged"),
    ):
        p = sub.add_parser(
            verb, help=what, description=f"{verb}: {what}.", parents=[common, writes]
        )
        p.add_argument("name", help="adapter name")
        p.set_defaults(handler=cmd_canary_decide, verdict=verdict)
    p = sub.add_parser(
        "status",
        help="the live comparison of the canary with production, from a running server",
    )
    p.add_argument("name", help="adapter name")
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the server's base URL")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAFLEET_API_KEY"),
        help="the server's admin key (default $LORAFLEET_API_KEY)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(handler=cmd_canary_status)


def cmd_canary_decide(args: argparse.Namespace) -> int:
    from registry.registry import Registry, default_actor

    registry = Registry(args.home)
    try:
        record = registry.decide_canary(
            args.name,
            args.verdict,
            actor=args.actor or default_actor(),
            reason=f"manual: {args.reason or 'no reason given'}",
        )
    finally:
        registry.close()
    if args.json:
        print(json.dumps(record.to_dict(), indent=2, sort_keys=True))
    else:
        print(
            f"{record.adapter}@{record.version} {record.verdict.replace('_', ' ')}: production "
            f"{record.production_before} -> {record.production_after}, canary removed"
        )
    return 0


def cmd_canary_status(args: argparse.Namespace) -> int:
    body = fetch_status(args.url, args.name, args.api_key)
    canaries = body["canaries"]
    if args.json:
        print(json.dumps(canaries, indent=2, sort_keys=True))
        return 0
    if not canaries:
        print(f"{args.name} has no canary")
        return 0
    for c in canaries:
        state = f"waiting for {c['waiting']}" if c["waiting"] else f"ready: {c['verdict']}"
        print(
            f"{c['adapter']}: canary {c['canary_version']} vs production "
            f"{c['production_version']} since {c['since']} ({c['elapsed_s']:.0f} s), {state}"
        )
        for criterion in c["criteria"]:
            mark = {"pass": "ok  ", "fail": "FAIL", "inconclusive": "??  ", "skipped": "--  "}[
                criterion["state"]
            ]
            print(f"  {mark} {criterion['text']}")
    return 0


def fetch_status(url: str, adapter: str, api_key: str | None, timeout_s: float = 30) -> Any:
    """GET /admin/canary?adapter=NAME; AdminCallFailed naming the value and the fix."""
    from serving.cli.admin_client import admin_get

    return admin_get(url, "/admin/canary", {"adapter": adapter}, api_key, timeout_s)
