"""`lorafleet jobs ...`: queue, schedule, list and run retraining jobs (tuning/retrain.py)."""

from __future__ import annotations

import argparse
import logging
from typing import Any, get_args

from registry import Registry
from registry.arguments import emit, registry_options
from registry.loop_records import JobRecord, JobState, parse_interval
from registry.registry import default_actor

JOBS_HELP = """Retraining jobs of the watch-and-retrain loop. A job retrains one adapter:
its production version's training data + new files from the adapter's retrain_data_dir +
feedback corrections, warm-started from production, with production's config plus the
adapter's retrain_overrides. Candidate and production are scored on the same held-out set
and the same general text; only a candidate at least as good (the gate: eval loss <=
production's x (1 + gate_tolerance), exact match >= production's - gate_tolerance, and
perplexity on general text, the forgetting check of `lorafleet tune`, <= production's x (1 +
gate_forgetting_tolerance)) is registered, with lineage (parent version, job, trigger), and
becomes the canary at canary_weight. Jobs come from `jobs queue` (manual), schedules (`jobs
schedule`) and alerts (POST /admin/alerts)."""

RUN_HELP = """Mark jobs whose worker died as failed, queue a job for every due schedule,
then claim and run queued jobs one by one until none is left (or --max-jobs), printing one
line per job. Meant for cron or a Kubernetes CronJob; several runners may share a registry
(each job is claimed once). Files of job N: $LORAFLEET_HOME/jobs/N/.

exit codes:
  0  every job run succeeded or was refused by the gate (or there was nothing to run)
  1  a job failed for another reason: no production version, missing data files, invalid
     retrain_overrides, an error while training
  2  usage or registry error (one line on stderr)"""

STATES = get_args(JobState)


def add_jobs_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet jobs ...`."""
    common, writes = registry_options(reason=False)
    jobs = commands.add_parser(
        "jobs", help="retraining jobs: queue, schedule, list, run", description=JOBS_HELP
    )
    sub = jobs.add_subparsers(title="jobs commands", metavar="COMMAND", required=True)

    def add(name: str, handler: Any, help: str, *parents: argparse.ArgumentParser) -> Any:
        p = sub.add_parser(name, help=help, description=help, parents=[common, *parents])
        p.set_defaults(handler=handler)
        return p

    p = add("list", cmd_list, "jobs, newest first")
    p.add_argument("name", nargs="?", help="only this adapter's jobs")
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--limit", type=int, help="only the newest N jobs")
    p = add("show", cmd_show, "one job with its gate numbers, data and lineage")
    p.add_argument("id", type=int, help="job id (see `lorafleet jobs list`)")
    p = add("queue", cmd_queue, "queue a manual retraining job for an adapter", writes)
    p.add_argument("name", help="adapter name")
    p.add_argument("--reason", default="", help="why; kept with the job and in the history")
    p = add(
        "schedule", cmd_schedule, "retrain an adapter on a schedule (replaces its schedule)", writes
    )
    p.add_argument("name", help="adapter name")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", help="interval: a number with s, m, h, d or w (e.g. 1d, 6h)")
    when.add_argument("--cron", help="cron expression in UTC, five fields (e.g. '0 3 * * *')")
    p = add("unschedule", cmd_unschedule, "remove an adapter's retraining schedule", writes)
    p.add_argument("name", help="adapter name")
    add("schedules", cmd_schedules, "retraining schedules and their next times")
    p = sub.add_parser(
        "run",
        help="run queued and due jobs (for cron / a Kubernetes CronJob)",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common, writes],
    )
    p.set_defaults(handler=cmd_run)
    p.add_argument("--job", type=int, help="run only this queued job")
    p.add_argument("--max-jobs", type=int, help="run at most N jobs (0: only queue due ones)")
    p.add_argument("--verbose", action="store_true", help="log training progress on stderr")


def _open(args: argparse.Namespace) -> Registry:
    return Registry(args.home)


def _job_line(job: JobRecord) -> str:
    """One line per job: id, adapter, state and what came of it."""
    head = f"job {job.id} {job.adapter} {job.state} ({job.trigger})"
    if job.state == "succeeded":
        result = job.result or {}
        c, p = result["gate"]["candidate"], result["gate"]["production"]
        line = (
            f"{head}: {job.adapter}@{job.version} from @{job.parent_version}, canary "
            f"{result['canary_weight']:g}; eval loss {c['eval_loss']:.4f} vs production "
            f"{p['eval_loss']:.4f}"
        )
        if "reference_perplexity" in c and "reference_perplexity" in p:
            ref_c, ref_p = c["reference_perplexity"], p["reference_perplexity"]
            line += f", reference perplexity {ref_c:.2f} vs {ref_p:.2f}"
        return line
    if job.state == "failed":
        return f"{head}: {job.error}"
    return head


def cmd_list(args: argparse.Namespace) -> int:
    jobs = _open(args).jobs.recent(args.name, args.state, args.limit)
    lines = [f"{'ID':>5}  {'ADAPTER':<20}  {'STATE':<9}  {'TRIGGER':<20}  {'CREATED':<29}  RESULT"]
    for job in jobs:
        result = f"{job.adapter}@{job.version}" if job.version else (job.error or "")
        lines.append(
            f"{job.id:>5}  {job.adapter:<20}  {job.state:<9}  {job.trigger[:20]:<20}  "
            f"{job.created_at:<29}  {result[:100]}"
        )
    text = "\n".join(lines) if jobs else "no jobs"
    return emit(args, [j.to_dict() for j in jobs], text)


def cmd_show(args: argparse.Namespace) -> int:
    job = _open(args).jobs.get(args.id)
    result = job.result or {}
    lines = [
        f"job {job.id}  {job.adapter}  {job.state}",
        f"  trigger     {job.trigger} (by {job.actor}{': ' + job.reason if job.reason else ''})",
        f"  created     {job.created_at}",
        f"  started     {job.started_at or '-'} on {job.worker or '-'}",
        f"  heartbeat   {job.heartbeat_at or '-'}",
        f"  finished    {job.finished_at or '-'}",
        f"  parent      {f'{job.adapter}@{job.parent_version}' if job.parent_version else '-'}",
        f"  version     {f'{job.adapter}@{job.version}' if job.version else '-'}",
    ]
    if gate := result.get("gate"):
        c, p = gate["candidate"], gate["production"]
        state = "passed" if gate["passed"] else "failed"
        lines.append(f"  gate        {state:<28}{'candidate':>9}  {'production':>10}")
        lines += [
            f"    {k:<38}{c[k]:>9.4f}  {p[k]:>10.4f}"
            for k in ("eval_loss", "exact_match", "reference_perplexity")
            if k in c and k in p
        ]
        slack = f"tolerance {gate['tolerance']:g}"
        if "forgetting_tolerance" in gate:  # jobs from before the forgetting check lack it
            slack += f", forgetting tolerance {gate['forgetting_tolerance']:g}"
        lines += [f"    {slack}", *(f"    {note}" for note in gate.get("skipped", []))]
    if "canary_weight" in result:
        lines.append(f"  canary      weight {result['canary_weight']:g}")
    if data := result.get("data"):
        lines.append(
            f"  data        {len(data['train_files'])} training file(s), "
            f"{len(data['new_files'])} new file(s), {data['corrections']} correction(s); "
            f"held out: {', '.join(data['held_out_files'])}"
        )
    if job.error:
        lines.append(f"  error       {job.error}")
    return emit(args, job.to_dict(), "\n".join(lines))


def cmd_queue(args: argparse.Namespace) -> int:
    actor = args.actor or default_actor()
    job, new = _open(args).jobs.queue(args.name, "manual", actor=actor, reason=args.reason)
    text = (
        f"queued job {job.id} for {job.adapter} (manual)"
        if new
        else f"job {job.id} for {job.adapter} is already queued ({job.trigger}); nothing queued"
    )
    return emit(args, {**job.to_dict(), "queued": new}, text)


def cmd_schedule(args: argparse.Namespace) -> int:
    every_s = parse_interval(args.every) if args.every else None
    schedule = _open(args).jobs.set_schedule(
        args.name,
        every_s=every_s,
        cron=args.cron,
        actor=args.actor or default_actor(),
    )
    what = f"every {args.every}" if args.every else f"cron {args.cron!r} (UTC)"
    return emit(args, schedule.to_dict(), f"{args.name}: retrain {what}, next {schedule.next_at}")


def cmd_unschedule(args: argparse.Namespace) -> int:
    _open(args).jobs.remove_schedule(args.name, actor=args.actor or default_actor())
    return emit(args, {"adapter": args.name, "removed": True}, f"{args.name}: schedule removed")


def cmd_schedules(args: argparse.Namespace) -> int:
    schedules = _open(args).jobs.schedules()
    lines = [
        f"{s.adapter}: "
        + (f"every {s.every_s:g} s" if s.every_s is not None else f"cron {s.cron!r}")
        + f", next {s.next_at}"
        for s in schedules
    ]
    return emit(args, [s.to_dict() for s in schedules], "\n".join(lines) or "no schedules")


def _quiet() -> None:
    """Only the per-job lines: no library chatter (the run turns progress bars off itself),
    warnings and errors of lorafleet's own loggers still on stderr."""
    import datasets
    from transformers.utils import logging as hf_logging

    for name in ("tuning", "registry"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    datasets.logging.set_verbosity_error()  # progress bars: off in every retraining run


def cmd_run(args: argparse.Namespace) -> int:
    from tuning.retrain import gate_failed, run_job

    if not args.verbose:
        _quiet()
    registry = _open(args)
    actor = args.actor or default_actor()
    report: dict[str, list[Any]] = {"reaped": [], "queued": [], "ran": []}
    for reaped in registry.jobs.reap(actor=actor):
        report["reaped"].append(_say(args, reaped))
    for due in registry.jobs.queue_due(actor=actor):
        report["queued"].append(
            _say(args, due, f"queued job {due.id} for {due.adapter} (schedule)")
        )
    failures = 0
    while args.max_jobs is None or len(report["ran"]) < args.max_jobs:
        job = registry.jobs.claim(actor=actor, job_id=args.job)
        if job is None:
            break
        finished = run_job(registry, job, actor=actor)
        report["ran"].append(_say(args, finished))
        failures += finished.state == "failed" and not gate_failed(finished)
        if args.job is not None:
            break
    registry.close()
    if args.json:
        emit(args, report, "")
    elif not any(report.values()):
        print("no queued jobs")
    return 1 if failures else 0


def _say(args: argparse.Namespace, job: JobRecord, text: str | None = None) -> dict[str, Any]:
    """Print a job's line now (a runner may be killed before it ends); return it as JSON."""
    if not args.json:
        print(text or _job_line(job), flush=True)
    return job.to_dict()
