"""The `lorafleet` command: its root, and the `lorafleet registry ...` subcommands.

Each top-level package contributes subcommands through the ``lorafleet.commands`` entry
point group (see pyproject.toml), so this root imports neither `tuning` nor `serving`.
A user error exits 2 with one line on stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from registry.arguments import apply_store_options, emit, registry_options
from registry.errors import LorafleetError
from registry.families import serving_engines
from registry.loop_commands import add_loop_commands
from registry.names import parse_model_ref
from registry.records import VersionRecord
from registry.registry import ARTIFACTS_URL_ENV, REGISTRY_URL_ENV, Registry

COMMAND_GROUP = "lorafleet.commands"
Handler = Callable[[argparse.Namespace], int]


# pyproject.toml's `lorafleet.commands` entry points, for a checkout that is not installed
# (the Bento image runs `python -m registry jobs run`); a test keeps the two equal.
COMMANDS = {
    "base": "tuning.tune_commands:add_base_commands",
    "canary": "serving.cli.canary_commands:add_canary_commands",
    "drift": "serving.cli.drift_report:add_drift_commands",
    "jobs": "tuning.job_commands:add_jobs_commands",
    "registry": "registry.cli:add_commands",
    "serve": "serving.cli.serve:add_serve_commands",
    "tune": "tuning.tune_commands:add_tune_commands",
}


def command_adders() -> list[tuple[str, Callable[[Any], None]]]:
    """(name, function adding its subcommands), from the installed entry points, else from
    COMMANDS."""
    found = entry_points(group=COMMAND_GROUP)
    if found:
        return [(ep.name, ep.load()) for ep in sorted(found, key=lambda e: e.name)]
    adders = []
    for name, target in sorted(COMMANDS.items()):
        module, _, function = target.partition(":")
        adders.append((name, getattr(import_module(module), function)))
    return adders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Fine-tune, register and serve many LoRA adapters on one base model.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for _, add in command_adders():
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    apply_store_options(args)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return handler(args)
    except LorafleetError as err:
        if args.debug:
            raise
        print(f"lorafleet: error: {err}", file=sys.stderr)
        return 2


# ---- lorafleet registry ------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet registry ...`."""
    common, writes = registry_options()
    registry = commands.add_parser(
        "registry",
        help="adapter versions, aliases and their history",
        description="Keep every adapter version with its metadata; promote and roll back "
        "versions by moving aliases (production, staging, canary, or your own).",
    )
    sub = registry.add_subparsers(title="registry commands", metavar="COMMAND", required=True)

    def add(name: str, handler: Handler, help: str, *parents: argparse.ArgumentParser) -> Any:
        p = sub.add_parser(name, help=help, description=help, parents=[common, *parents])
        p.set_defaults(handler=handler)
        return p

    p = add("init", cmd_init, "create a registry bound to one base model (idempotent)", writes)
    p.add_argument("--base", type=Path, required=True, help="base model directory")
    p.add_argument(
        "--max-rank", type=int, default=None, help="largest LoRA rank accepted (default 64)"
    )

    p = add(
        "register",
        cmd_register,
        "validate an adapter directory and store it as the next version",
        writes,
    )
    p.add_argument("name", help="adapter name: ^[a-z0-9][a-z0-9._-]{0,62}$")
    p.add_argument(
        "path", type=Path, help="PEFT adapter directory (adapter_config.json + safetensors)"
    )
    p.add_argument(
        "--metadata", type=Path, help="metadata JSON (default: PATH/lorafleet.json if present)"
    )
    p.add_argument("--alias", help="also point this alias at the new version")
    p.add_argument(
        "--assume-base",
        action="store_true",
        help="accept an adapter whose base cannot be fingerprinted (hub id, no lorafleet.json) "
        "as trained on this registry's base",
    )

    p = add("list", cmd_list, "list adapters, or the versions of one adapter")
    p.add_argument("name", nargs="?", help="adapter name")

    p = add(
        "show", cmd_show, "show one version with its metadata: NAME, NAME:ALIAS or NAME@VERSION"
    )
    p.add_argument("ref", help="NAME (= NAME:production), NAME:ALIAS or NAME@VERSION")

    p = add("promote", cmd_promote, "point an alias (default production) at a version", writes)
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument(
        "--to", dest="alias", default="production", help="alias to move (default production)"
    )
    p.add_argument(
        "--weight",
        type=float,
        help="canary traffic weight in [0, 1] (canary default: kept, or 0.1)",
    )

    p = add(
        "rollback",
        cmd_rollback,
        "move an alias back to its previous holder (repeat to go further back)",
        writes,
    )
    p.add_argument("name")
    p.add_argument("--alias", default="production", help="alias to roll back (default production)")

    p = add(
        "history",
        cmd_history,
        "alias moves and the retraining loop's steps (alert, job, canary verdict), oldest "
        "first (--all: every registry write)",
    )
    p.add_argument("name", nargs="?")
    p.add_argument("--alias", help="only this alias")
    p.add_argument("--all", action="store_true", help="also registrations, archives, gc")
    p.add_argument("--limit", type=int, help="only the last N entries")

    alias = sub.add_parser(
        "alias", help="list, set or remove aliases", description="list, set or remove aliases"
    )
    alias_sub = alias.add_subparsers(title="alias commands", metavar="COMMAND", required=True)
    p = alias_sub.add_parser("list", help="aliases and their versions", parents=[common])
    p.add_argument("name", nargs="?")
    p.set_defaults(handler=cmd_alias_list)
    p = alias_sub.add_parser("set", help="point ALIAS of NAME at VERSION", parents=[common, writes])
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", type=int)
    p.add_argument("--weight", type=float, help="canary traffic weight in [0, 1]")
    p.set_defaults(handler=cmd_alias_set)
    p = alias_sub.add_parser(
        "remove", help="remove ALIAS of NAME (rollback restores it)", parents=[common, writes]
    )
    p.add_argument("name")
    p.add_argument("alias")
    p.set_defaults(handler=cmd_alias_remove)

    p = add(
        "archive", cmd_archive, "retire a version (refused while an alias points at it)", writes
    )
    p.add_argument("name")
    p.add_argument("version", type=int)

    p = add("fsck", cmd_fsck, "check the database, artifacts and aliases; exit 1 if not clean")
    p.add_argument(
        "--repair", action="store_true", help="remove orphans, leftovers and dangling aliases"
    )
    p.add_argument("--verify", action="store_true", help="re-hash every stored artifact")

    p = add("gc", cmd_gc, "remove unreferenced artifact files")
    p.add_argument("--archived", action="store_true", help="also remove files of archived versions")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")

    add("info", cmd_info, "the registry's base model, limits, revision and counts")
    p = add(
        "migrate",
        cmd_migrate,
        "copy this registry, history included, into an empty PostgreSQL database (and its "
        "files into an object store), then check the copy row by row",
        writes,
    )
    p.add_argument("--to", required=True, metavar="URL", help="postgresql://USER:PASSWORD@HOST/DB")
    p.add_argument(
        "--artifacts-to",
        metavar="URL",
        help="where the copy keeps its files: s3://BUCKET/PREFIX, gs://, az://, file:///DIR "
        "(default: where they are now, unless that is this home's artifacts/)",
    )
    add_loop_commands(sub, common, writes)


def _open(args: argparse.Namespace) -> Registry:
    return Registry(args.home)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the registry and say which engines can serve its base; a base that an engine
    refuses is still accepted (the other engine may serve it)."""
    registry = Registry.create(args.home, args.base, max_rank=args.max_rank, actor=args.actor)
    info = registry.info()
    verdicts = serving_engines(Path(info["base_path"]))
    # engine -> None where it serves the base, else why not
    info["engines"] = {v.engine: v.reason for v in verdicts}
    engines = ", ".join(
        f"{v.engine} yes" if v.ok else f"{v.engine} no ({v.reason})" for v in verdicts
    )
    return emit(
        args,
        info,
        f"registry {info['records']} bound to base {info['base_fingerprint']} "
        f"({info['base_path']}), max rank {info['max_rank']}\nartifacts: {info['artifacts']}"
        f"\nengines: {engines}",
    )


def cmd_register(args: argparse.Namespace) -> int:
    registry = _open(args)
    record = registry.register(
        args.name,
        args.path,
        metadata=args.metadata,
        actor=args.actor,
        reason=args.reason,
        assume_base=args.assume_base,
    )
    text = f"registered {record.ref} (rank {record.rank}, sha256 {record.digest[:12]})"
    if args.alias:
        move = registry.set_alias(
            args.name, args.alias, record.version, actor=args.actor, reason=args.reason
        )
        record = registry.get_version(args.name, record.version)
        text += f"; {move.adapter}:{move.alias} -> {move.version}"
    return emit(args, record.to_dict(), text)


def _alias_text(aliases: dict[str, tuple[int, float | None]]) -> str:
    return " ".join(
        f"{a}={v}" + (f"({w:g})" if w is not None else "") for a, (v, w) in sorted(aliases.items())
    )


def cmd_list(args: argparse.Namespace) -> int:
    registry = _open(args)
    if args.name:
        versions = registry.list_versions(args.name)
        rows = [
            f"{r.version:>7}  {r.state:<8}  {r.rank:>4}  {r.size_bytes:>10}  {r.created_at}  "
            f"{r.digest[:12]}  {','.join(r.aliases)}"
            for r in versions
        ]
        header = (
            f"{'VERSION':>7}  {'STATE':<8}  {'RANK':>4}  {'BYTES':>10}  {'CREATED':<29}  "
            f"{'SHA256':<12}  ALIASES"
        )
        return emit(args, [r.to_dict() for r in versions], "\n".join([header, *rows]))
    summary: list[dict[str, Any]] = []
    for name in registry.adapter_names():
        versions = registry.list_versions(name)
        aliases = {a.alias: (a.version, a.weight) for a in registry.aliases(name)}
        summary.append(
            {
                "adapter": name,
                "versions": len(versions),
                "active": sum(r.state == "active" for r in versions),
                "latest": versions[-1].version,
                "aliases": {a: {"version": v, "weight": w} for a, (v, w) in aliases.items()},
                "_text": _alias_text(aliases),
            }
        )
    width = max([len(s["adapter"]) for s in summary] + [7])
    lines = [f"{'ADAPTER':<{width}}  VERSIONS  LATEST  ALIASES"]
    lines += [
        f"{s['adapter']:<{width}}  {s['versions']:>8}  {s['latest']:>6}  {s.pop('_text')}"
        for s in summary
    ]
    if not summary:
        lines = [f"no adapters registered in {registry.home}"]
    return emit(args, summary, "\n".join(lines))


def _version_text(record: VersionRecord) -> str:
    lines = [
        f"{record.ref}  ({record.state})",
        f"  sha256        {record.digest}",
        f"  created       {record.created_at} by {record.actor}",
        f"  aliases       {', '.join(record.aliases) or '-'}",
        f"  rank / alpha  {record.rank} / {record.alpha:g}",
        f"  targets       {', '.join(record.target_modules)}",
        f"  features      {', '.join(record.features) or '-'}",
        f"  engines       {', '.join(record.engines)}"
        + "".join(f"  (not {e}: {why})" for e, why in record.unservable.items()),
        f"  size          {record.size_bytes} bytes"
        + ("  (files removed by gc)" if record.purged else ""),
        f"  base          {record.base_fingerprint}",
    ]
    if record.archived_at:
        lines.append(f"  archived      {record.archived_at}")
    lines += _metadata_lines(record.metadata)
    return "\n".join(lines)


def _metadata_lines(meta: dict[str, Any]) -> list[str]:
    """The metadata a person reads first; `show --json` prints every field."""
    lines = []
    metrics = meta.get("metrics") or {}
    base = metrics.get("base") or {}
    scores = [k for k in ("eval_loss", "perplexity", "exact_match", "token_f1") if k in metrics]
    if scores:
        lines.append("  metrics       adapter     base")
        lines += [
            f"    {k:<14}{metrics[k]:>9.4f}  {base.get(k, float('nan')):>9.4f}" for k in scores
        ]
    if forgetting := metrics.get("forgetting"):
        lines.append(
            f"    reference ppl {forgetting['reference_perplexity']:>9.2f}  "
            f"{forgetting['base_reference_perplexity']:>9.2f}  ({forgetting['change_pct']:+.1f}%)"
        )
    if train := metrics.get("train"):
        early = (
            f", stopped early (best step {train.get('best_step')})"
            if train.get("stopped_early")
            else ""
        )
        lines.append(f"    steps         {train.get('steps')}{early}")
    dataset = meta.get("dataset") or {}
    if dataset.get("fingerprint"):
        lines.append(
            f"  dataset       {dataset.get('examples')} examples, "
            f"sha256 {dataset['fingerprint'][:12]}, from {dataset.get('source')}"
        )
    if config := meta.get("training_config"):
        method, training = config.get("method", {}), config.get("training", {})
        lines.append(
            f"  training      r={method.get('r')} alpha={method.get('alpha')} "
            f"lr={training.get('lr')} seed={meta.get('seed')} (full config: --json)"
        )
    if meta.get("wall_time_s"):
        lines.append(
            f"  run           {meta['wall_time_s']:.1f} s, "
            f"{meta.get('tokens_per_s') or 0:.0f} tokens/s"
        )
    versions = meta.get("library_versions") or {}
    provenance = [f"git {meta['git_commit'][:12]}"] if meta.get("git_commit") else []
    provenance += [
        f"{k} {v}" for k, v in versions.items() if k in ("torch", "transformers", "peft")
    ]
    if provenance:
        lines.append(f"  provenance    {', '.join(provenance)}")
    lineage = [f"trigger {meta.get('trigger', 'manual')}"]
    if meta.get("parent_version"):
        lineage.append(f"parent version {meta['parent_version']}")
    if meta.get("job_id"):
        lineage.append(f"job {meta['job_id']}")
    lines.append(f"  lineage       {', '.join(lineage)}")
    if meta.get("drift_profile"):
        lines.append(f"  drift profile {meta['drift_profile']}")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    record = _open(args).resolve(parse_model_ref(args.ref))
    return emit(args, record.to_dict(), _version_text(record))


def _move_text(move: Any) -> str:
    weight = f" weight {move.weight:g}" if move.weight is not None else ""
    target = "removed" if move.version is None else f"-> {move.version}{weight}"
    was = f" (was {move.previous})" if move.previous is not None else ""
    same = " (unchanged)" if not move.changed else ""
    return f"{move.adapter}:{move.alias} {target}{was}{same}, revision {move.revision}"


def cmd_promote(args: argparse.Namespace) -> int:
    move = _open(args).set_alias(
        args.name,
        args.alias,
        args.version,
        weight=args.weight,
        actor=args.actor,
        reason=args.reason,
    )
    return emit(args, move.to_dict(), _move_text(move))


def cmd_alias_set(args: argparse.Namespace) -> int:
    return cmd_promote(args)


def cmd_rollback(args: argparse.Namespace) -> int:
    move = _open(args).rollback(args.name, args.alias, actor=args.actor, reason=args.reason)
    return emit(args, move.to_dict(), _move_text(move))


def cmd_alias_remove(args: argparse.Namespace) -> int:
    move = _open(args).remove_alias(args.name, args.alias, actor=args.actor, reason=args.reason)
    return emit(args, move.to_dict(), _move_text(move))


def cmd_alias_list(args: argparse.Namespace) -> int:
    records = _open(args).aliases(args.name)
    lines = [
        f"{a.adapter}:{a.alias} -> {a.version}"
        + (f" weight {a.weight:g}" if a.weight is not None else "")
        for a in records
    ]
    return emit(args, [a.to_dict() for a in records], "\n".join(lines) or "no aliases")


def cmd_history(args: argparse.Namespace) -> int:
    events = _open(args).history(args.name, args.alias, all_events=args.all, limit=args.limit)
    lines = []
    for e in events:
        where = e.adapter or ""
        if e.alias:
            where += f":{e.alias}"
        change = ""
        if e.action.startswith("alias."):
            new = "none" if e.version is None else str(e.version)
            old = "none" if e.previous is None else str(e.previous)
            change = f" {old} -> {new}" + (f" weight {e.weight:g}" if e.weight is not None else "")
        elif e.version is not None:
            change = f"@{e.version}"
        if e.job is not None:
            change += f" job {e.job}"
        reason = f"  ({e.reason})" if e.reason else ""
        lines.append(f"#{e.id} r{e.revision} {e.at} {e.actor} {e.action} {where}{change}{reason}")
    return emit(args, [e.to_dict() for e in events], "\n".join(lines) or "no history")


def cmd_archive(args: argparse.Namespace) -> int:
    record = _open(args).archive(args.name, args.version, actor=args.actor, reason=args.reason)
    return emit(args, record.to_dict(), f"archived {record.ref}")


def cmd_fsck(args: argparse.Namespace) -> int:
    report = _open(args).fsck(repair=args.repair, verify=args.verify)
    lines = [f"checked {report.checked_versions} versions"]
    lines += [f"problem: {p}" for p in report.problems]
    lines += [f"repaired: {r}" for r in report.repaired]
    if report.problems and not args.repair:
        lines.append(
            "run `lorafleet registry fsck --repair` to remove orphans and dangling aliases"
        )
    emit(
        args,
        report.to_dict(),
        "\n".join(lines if report.problems or report.repaired else [lines[0] + ", clean"]),
    )
    unrepaired = len(report.problems) - (len(report.repaired) if args.repair else 0)
    return 1 if unrepaired > 0 else 0


def cmd_gc(args: argparse.Namespace) -> int:
    removed = _open(args).gc(archived=args.archived, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    text = "\n".join(f"{verb} {r}" for r in removed) or "nothing to remove"
    return emit(args, {"removed": removed, "dry_run": args.dry_run}, text)


def cmd_migrate(args: argparse.Namespace) -> int:
    result = _open(args).migrate_to(args.to, args.artifacts_to, actor=args.actor)
    rows = ", ".join(f"{n} {table}" for table, n in result["rows"].items())
    text = (
        f"copied {result['from']} to {result['to']}: {rows}; "
        f"{result['artifacts_copied']} artifacts in {result['artifacts']}; "
        f"{result['requests_logged']} logged requests\n"
        f"verified: every row equal, every artifact whole. Open it with --registry URL "
        f"--artifacts {result['artifacts']} (or {REGISTRY_URL_ENV} / {ARTIFACTS_URL_ENV})"
    )
    return emit(args, result, text)


def cmd_info(args: argparse.Namespace) -> int:
    info = _open(args).info()
    return emit(args, info, "\n".join(f"{k:<18} {v}" for k, v in info.items()))
