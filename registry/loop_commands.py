"""`lorafleet registry settings | pin | unpin | feedback | requests`: what the
watch-and-retrain loop keeps per adapter — its settings (the pin among them), the feedback
with corrections a user reviews, and the log of served requests."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from registry.arguments import emit
from registry.errors import LorafleetError
from registry.loop_records import AdapterSettings, parse_assignments
from registry.registry import Registry


def add_loop_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    writes: argparse.ArgumentParser,
) -> None:
    keys = ", ".join(AdapterSettings.model_fields)
    p = sub.add_parser(
        "settings",
        help="show or change an adapter's loop settings (request log, retraining, canary)",
        description="Show an adapter's settings, or change some with KEY=VALUE (values in "
        f"JSON, else strings). Keys: {keys}. `--defaults` lists each with its meaning.",
        parents=[common, writes],
    )
    p.add_argument("name", nargs="?", help="adapter name")
    p.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--reset", action="store_true", help="start from the defaults")
    p.add_argument("--defaults", action="store_true", help="list every key, default, meaning")
    p.set_defaults(handler=cmd_settings)

    for verb, pinned in (("pin", True), ("unpin", False)):
        p = sub.add_parser(
            verb,
            help="keep an adapter's production and canary versions resident in every server"
            if pinned
            else "let a pinned adapter's versions be evicted again",
            description="Set the adapter's `pinned` setting; every server sharing the registry "
            "follows it within a poll interval (as `lorafleet serve --pin NAME` does for one "
            "server). Recorded in the history as adapter.pin / adapter.unpin with --reason.",
            parents=[common, writes],
        )
        p.add_argument("name", help="adapter name")
        p.set_defaults(handler=cmd_pin, pinned=pinned)

    feedback = sub.add_parser(
        "feedback",
        help="list feedback, accept or reject corrections for retraining",
        description="Feedback on served responses (POST /v1/feedback). Retraining adds the "
        "corrections an adapter's `corrections` setting allows (default: accepted ones).",
    )
    fsub = feedback.add_subparsers(title="feedback commands", metavar="COMMAND", required=True)
    p = fsub.add_parser("list", help="feedback of an adapter, oldest first", parents=[common])
    p.add_argument("name")
    p.add_argument("--review", choices=["pending", "accepted", "rejected"], help="only these")
    p.set_defaults(handler=cmd_feedback_list)
    for verb, review in (("accept", "accepted"), ("reject", "rejected")):
        p = fsub.add_parser(verb, help=f"mark feedback ids {review}", parents=[common])
        p.add_argument("ids", nargs="+", type=int, metavar="ID")
        p.set_defaults(handler=cmd_feedback_review, review=review)

    p = sub.add_parser(
        "requests",
        help="export logged requests of an adapter (JSON lines)",
        description="Logged requests of an adapter, oldest first, one JSON object a line: "
        "prompt, output, the version that served it, finish reason, token counts and the "
        "feedback on it (score, correction, review).",
        parents=[common],
    )
    p.add_argument("name")
    p.add_argument("--version", type=int, help="only this version")
    p.add_argument("--limit", type=int, help="only the newest N")
    p.add_argument("--out", type=Path, help="write to this file instead of stdout")
    p.add_argument("--purge", action="store_true", help="delete the adapter's logged requests")
    p.set_defaults(handler=cmd_requests)


def cmd_settings(args: argparse.Namespace) -> int:
    if args.defaults:
        lines = [
            f"{name} = {json.dumps(field.default)}\n    {field.description}"
            for name, field in AdapterSettings.model_fields.items()
        ]
        return emit(args, AdapterSettings().model_dump(), "\n".join(lines))
    if not args.name:
        raise LorafleetError("name an adapter (or use --defaults)")
    registry = Registry(args.home)
    if args.assignments or args.reset:
        current = registry.update_settings(
            args.name,
            parse_assignments(args.assignments),
            actor=args.actor,
            reason=args.reason,
            reset=args.reset,
        )
    else:
        registry.list_versions(args.name)  # NotFound naming the registered adapters
        current = registry.settings(args.name)
    changed = current.model_dump(exclude_defaults=True)
    text = "\n".join(
        f"{k:<32} {json.dumps(v)}" + ("" if k in changed else "  (default)")
        for k, v in current.model_dump().items()
    )
    return emit(args, current.model_dump(), text)


def cmd_pin(args: argparse.Namespace) -> int:
    current = Registry(args.home).pin(args.name, args.pinned, actor=args.actor, reason=args.reason)
    state = "pinned" if current.pinned else "not pinned"
    return emit(args, {"adapter": args.name, "pinned": current.pinned}, f"{args.name}: {state}")


def cmd_feedback_list(args: argparse.Namespace) -> int:
    rows = Registry(args.home).feedback(args.name)
    if args.review:
        rows = [r for r in rows if r["review"] == args.review]
    lines = [
        f"#{r['id']} {r['at']} {r['adapter']}@{r['version']} score {r['score']:+g} "
        f"{r['review']}" + (f" correction {r['correction']!r}" if r["correction"] else "")
        for r in rows
    ]
    return emit(args, rows, "\n".join(lines) or f"no feedback for {args.name}")


def cmd_feedback_review(args: argparse.Namespace) -> int:
    changed = Registry(args.home).review_feedback(args.ids, args.review)
    return emit(args, {"changed": changed}, f"{changed} marked {args.review}")


def cmd_requests(args: argparse.Namespace) -> int:
    registry = Registry(args.home)
    registry.list_versions(args.name)
    if args.purge:
        removed = registry.request_log.delete(args.name)
        print(f"removed {removed} logged requests of {args.name}", file=sys.stderr)
        return 0
    rows = registry.logged_requests(args.name, args.version, args.limit)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {len(rows)} requests to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
