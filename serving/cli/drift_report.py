"""`lorafleet drift report`: fetch one version's drift from a running server's
GET /admin/drift and render it as one self-contained HTML page, a PNG per signal (baseline
vs live distributions, matplotlib Agg, embedded as base64) with its score, threshold and
verdict, so a user sees what drifted."""

from __future__ import annotations

import argparse
import base64
import html
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.cli.admin_client import admin_get
from serving.watch.drift_plots import KINDS, TITLES, VERDICTS, drawn, plot_signal

logger = logging.getLogger(__name__)

DRIFT_REPORT_HELP = """Fetch the drift of one adapter version from a running server (GET
/admin/drift, admin key needed) and write one self-contained HTML page: per signal the
baseline and live distributions as a plot, the score, the threshold and whether it drifted.
NAME alone means NAME:production as the server resolves it."""


def add_drift_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet drift report`."""
    drift = commands.add_parser("drift", help="look at the drift of served adapter versions")
    sub = drift.add_subparsers(dest="drift_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "report",
        help="render baseline vs live distributions as HTML",
        description=DRIFT_REPORT_HELP,
    )
    p.add_argument("model", metavar="NAME[@V]", help="NAME, NAME:ALIAS or NAME@VERSION")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument(
        "--url",
        default="http://127.0.0.1:3000",
        help="the server's base URL (default http://127.0.0.1:3000)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAFLEET_API_KEY"),
        help="the server's admin key (default $LORAFLEET_API_KEY)",
    )
    p.set_defaults(handler=cmd_drift_report)


def cmd_drift_report(args: argparse.Namespace) -> int:
    report = write_report(args.model, args.out, url=args.url, api_key=args.api_key)
    drifted = [n for n, s in report["signals"].items() if s["status"] == "drifted"]
    print(
        f"{args.out}: {report['model']}, {report['samples']} requests in the window; "
        f"drifted: {', '.join(drifted) or 'none'}"
    )
    return 0


def fetch_report(url: str, model: str, api_key: str | None, timeout_s: float = 30) -> Any:
    """GET /admin/drift?model=MODEL; AdminCallFailed naming the value and the fix."""
    return admin_get(url, "/admin/drift", {"model": model}, api_key, timeout_s)


def render_html(report: dict[str, Any], *, url: str = "") -> str:
    """One page: a header with the window, then per signal its verdict, score and plot."""
    signals = drawn(report["signals"])
    sections = [_section(name, signal) for name, signal in signals.items()]
    drifted = [n for n, s in signals.items() if s["status"] == "drifted"]
    summary = (
        f"<b>{len(drifted)} of {len(sections)} signals drifted</b>: {', '.join(drifted)}"
        if drifted
        else f"<b>no signal drifted</b> ({len(sections)} checked)"
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    window = (
        f"{report['samples']} requests and {report['feedback_samples']} feedback ratings in "
        f"the window (last {report['window']} requests within {report['window_s']:g} s)"
    )
    source = f" from {html.escape(url)}" if url else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>drift of {html.escape(report["model"])}</title>
<style>
body {{ font-family: sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
section {{ border-top: 1px solid #ddd; padding: 1em 0; }}
.verdict {{ display: inline-block; padding: 0.15em 0.6em; border-radius: 0.3em;
  color: white; font-weight: bold; }}
img {{ max-width: 100%; }}
td {{ padding-right: 1.5em; }}
</style></head><body>
<h1>Drift of {html.escape(report["model"])}</h1>
<p>{window}{"" if report["baseline"] else "; this version has no baseline profile"}.<br>
{summary}.<br><small>generated {when}{source}</small></p>
{"".join(sections)}
</body></html>
"""


def _section(name: str, signal: dict[str, Any]) -> str:
    verdict, color = VERDICTS.get(signal["status"], (signal["status"], "#8c8c8c"))
    score = "-" if signal["score"] is None else f"{signal['score']:.4f}"
    png = base64.b64encode(plot_signal(name, signal)).decode()
    return f"""<section>
<h2>{html.escape(TITLES.get(name, name))}
<span class="verdict" style="background:{color}">{verdict}</span></h2>
<table><tr><td>signal <code>{name}</code></td><td>{KINDS.get(name, "score")} <b>{score}</b></td>
<td>threshold {signal["threshold"]:g}</td>
<td>samples {signal["samples"]} (minimum {signal["min_samples"]})</td></tr></table>
<img alt="{name}: baseline vs live" src="data:image/png;base64,{png}">
</section>
"""


def write_report(model: str, out: Path, *, url: str, api_key: str | None) -> dict[str, Any]:
    """Fetch, render and write the page; the report's JSON is returned."""
    report: dict[str, Any] = fetch_report(url, model, api_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report, url=url))
    logger.info("wrote the drift report of %s to %s", report["model"], out)
    return report
