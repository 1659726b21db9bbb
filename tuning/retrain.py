"""Retraining jobs: run one claimed job of the registry's jobs table, top to bottom.

production version -> dataset (its training files + new files from the adapter's
`retrain_data_dir` + feedback corrections) -> fine-tune warm-started from production with
production's config plus the adapter's `retrain_overrides` -> candidate and production
scored on the same held-out set and the same general text (the forgetting check of
`lorafleet tune`) -> gate -> register with lineage (parent, job, trigger) -> `canary` alias
at the adapter's `canary_weight`.

Everything a job writes lives in `$LORAFLEET_HOME/jobs/<id>/` (data/, config.yaml, the run
with adapter/). A candidate that fails the gate is not registered and moves no alias. A
kill before the registration leaves nothing visible; the next `lorafleet jobs run` marks
the job failed (its worker pid is gone). A background thread refreshes the job's heartbeat
so a worker on another host that stops is recognised too.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from registry import Registry, VersionRecord
from registry.errors import LorafleetError, NotFound
from registry.faults import pause_point
from registry.jobs_api import Jobs
from registry.loop_records import AdapterSettings, JobRecord, worker_id
from registry.records import METADATA_FILE
from tuning.config import DataConfig, TuneConfig, load_config
from tuning.data import (
    LOADERS,
    load_eval_examples,
    load_examples,
    load_tokenizer,
    read_rows,
    tokenize,
)
from tuning.errors import RetrainError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tuning.train import RunResult

logger = logging.getLogger(__name__)
HEARTBEAT_S = 30.0  # well below registry/storage/jobs.py: STALE_AFTER_S
GATE_METRICS = ("eval_loss", "exact_match")
FORGETTING = "reference_perplexity"  # on general text, as `lorafleet tune`'s forgetting check
FORGETTING_SKIPPED = (
    "forgetting not checked: the job's config has evaluation.forgetting: false, so neither "
    "version's reference perplexity was measured; add evaluation.forgetting=true to the "
    "adapter's retrain_overrides to check it"
)


@dataclass(frozen=True)
class GateVerdict:
    """Candidate vs production on the same held-out set and the same general text."""

    passed: bool
    candidate: dict[str, float]
    production: dict[str, float]
    tolerance: float
    forgetting_tolerance: float
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checks not made, each with why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        c, p = self.candidate, self.production
        text = f"eval loss {c['eval_loss']:.4f} vs production {p['eval_loss']:.4f}"
        if "exact_match" in c and "exact_match" in p:
            text += f", exact match {c['exact_match']:.4f} vs {p['exact_match']:.4f}"
        if FORGETTING in c and FORGETTING in p:
            text += f", reference perplexity {c[FORGETTING]:.2f} vs {p[FORGETTING]:.2f}"
        else:
            text += ", forgetting not checked"
        return (
            f"{text} (tolerance {self.tolerance:g}, forgetting tolerance "
            f"{self.forgetting_tolerance:g})"
        )


def judge(
    candidate: dict[str, float],
    production: dict[str, float],
    tolerance: float,
    forgetting_tolerance: float,
) -> GateVerdict:
    """Pass only if the candidate is at least as good: eval loss <= production's x (1 +
    tolerance); where both have it, exact match >= production's - tolerance; and where both
    have it (evaluation.forgetting), reference perplexity <= production's x (1 +
    forgetting_tolerance). Without reference perplexities the check is recorded as skipped."""
    failures, skipped = [], []
    limit = production["eval_loss"] * (1.0 + tolerance)
    if not candidate["eval_loss"] <= limit:  # also catches NaN
        failures.append(
            f"eval loss {candidate['eval_loss']:.4f} of the candidate > {limit:.4f} "
            f"(production's {production['eval_loss']:.4f} x (1 + {tolerance:g}))"
        )
    if "exact_match" in candidate and "exact_match" in production:
        floor = production["exact_match"] - tolerance
        if not candidate["exact_match"] >= floor:
            failures.append(
                f"exact match {candidate['exact_match']:.4f} of the candidate < {floor:.4f} "
                f"(production's {production['exact_match']:.4f} - {tolerance:g})"
            )
    if FORGETTING in candidate and FORGETTING in production:
        ceiling = production[FORGETTING] * (1.0 + forgetting_tolerance)
        if not candidate[FORGETTING] <= ceiling:
            failures.append(
                f"reference perplexity {candidate[FORGETTING]:.2f} of the candidate > "
                f"{ceiling:.2f} (production's {production[FORGETTING]:.2f} x (1 + "
                f"{forgetting_tolerance:g}), on the general text of the forgetting check)"
            )
    else:
        skipped.append(FORGETTING_SKIPPED)
    return GateVerdict(
        not failures, candidate, production, tolerance, forgetting_tolerance, failures, skipped
    )


@dataclass(frozen=True)
class JobData:
    """What a job trains and evaluates on."""

    train_files: list[str]  # the production run's training files
    new_files: list[str]  # from the adapter's retrain_data_dir
    corrections: int  # feedback corrections added
    corrections_file: str | None
    held_out_files: list[str]  # the production run's eval files (or its split, written out)


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    summary: str
    version: int | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    canary: tuple[float, str] | None = None  # weight, reason: set with the job's finish


def job_dir(registry: Registry, job_id: int) -> Path:
    return registry.home / "jobs" / str(job_id)


def run_job(
    registry: Registry, job: JobRecord, *, actor: str, heartbeat_s: float = HEARTBEAT_S
) -> JobRecord:
    """Run a job this process claimed (state running) to its end; returns it finished.
    User-facing problems (LorafleetError) and the gate fail the job with their message."""
    try:
        with _heartbeats(registry.jobs, job.id, heartbeat_s):
            outcome = _retrain(registry, job, actor)
    except LorafleetError as err:
        outcome = Outcome(False, str(err), error=str(err))
    except Exception as err:  # recorded on the job and logged with its traceback
        logger.exception("job %d failed", job.id)
        error = f"internal error {type(err).__name__}: {err} (traceback in the runner's log)"
        outcome = Outcome(False, error, error=error)
    return registry.jobs.finish(
        job.id,
        succeeded=outcome.succeeded,
        actor=actor,
        summary=outcome.summary,
        version=outcome.version,
        result=outcome.result,
        error=outcome.error,
        canary=outcome.canary,
    )


def gate_failed(job: JobRecord) -> bool:
    """True if a failed job failed only because its candidate did not pass the gate."""
    gate = (job.result or {}).get("gate") or {}
    return job.state == "failed" and gate.get("passed") is False


@contextmanager
def _heartbeats(jobs: Jobs, job_id: int, every_s: float) -> Iterator[None]:
    stop = threading.Event()
    worker = worker_id()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                jobs.heartbeat(job_id, worker=worker)
            except LorafleetError as err:
                logger.warning("job %d: heartbeat stopped: %s", job_id, err)
                return

    thread = threading.Thread(target=beat, name=f"job-{job_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _retrain(registry: Registry, job: JobRecord, actor: str) -> Outcome:
    import datasets
    from transformers.utils import logging as hf_logging

    from tuning.train import run

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    production = _production(registry, job.adapter)
    registry.jobs.heartbeat(job.id, parent_version=production.version)
    settings = registry.settings(job.adapter)
    config, data = prepare(registry, production, settings, job.id)
    logger.info("job %d: scoring %s on the held-out set", job.id, production.ref)
    production_scores = score_version(config)
    logger.info("job %d: fine-tuning from %s", job.id, production.ref)
    result = run(config, source=f"job {job.id}")
    pause_point("retrain.trained")
    metrics = result.metadata.metrics
    candidate_scores = {k: float(metrics[k]) for k in GATE_METRICS if k in metrics}
    if "forgetting" in metrics:  # evaluate()'s check, on the text score_version used
        candidate_scores[FORGETTING] = float(metrics["forgetting"]["reference_perplexity"])
    verdict = judge(
        candidate_scores,
        production_scores,
        settings.gate_tolerance,
        settings.gate_forgetting_tolerance,
    )
    outcome: dict[str, Any] = {
        "gate": verdict.to_dict(),
        "data": asdict(data),
        "run_dir": str(config.output.dir),
    }
    if not verdict.passed:
        error = f"gate failed: {'; '.join(verdict.failures)}; nothing registered, no alias moved"
        return Outcome(False, error, result=outcome, error=error)
    weight = settings.canary_weight
    record = _register(registry, job, production, result, actor)
    summary = (
        f"registered {record.ref} from {production.ref}, canary at {weight:g}; "
        f"gate passed: {verdict.describe()}"
    )
    outcome.update(version=record.version, canary_weight=weight)
    canary = (weight, f"job {job.id}: gate passed, {verdict.describe()}")
    return Outcome(True, summary, version=record.version, result=outcome, canary=canary)


def _register(
    registry: Registry,
    job: JobRecord,
    production: VersionRecord,
    result: RunResult,
    actor: str,
) -> VersionRecord:
    """Register the candidate with its lineage. Its canary is set in the transaction that
    finishes the job (`finish_job`): the job's only alias move, so a job killed before that
    commit changed no alias."""
    metadata = result.metadata.model_copy(
        update={"parent_version": production.version, "trigger": job.trigger, "job_id": job.id}
    )
    (result.adapter_dir / METADATA_FILE).write_text(metadata.model_dump_json(indent=1) + "\n")
    record = registry.register(
        job.adapter,
        result.adapter_dir,
        metadata=metadata,
        actor=actor,
        reason=f"job {job.id} ({job.trigger}): retrained from {production.ref}",
    )
    pause_point("retrain.registered")
    return record


def _production(registry: Registry, adapter: str) -> VersionRecord:
    try:
        return registry.resolve(f"{adapter}:production")
    except NotFound as err:
        raise RetrainError(
            f"adapter {adapter!r} has no production version to retrain from ({err}); promote "
            f"one first: lorafleet registry promote {adapter} VERSION"
        ) from err


def prepare(
    registry: Registry, production: VersionRecord, settings: AdapterSettings, job_id: int
) -> tuple[TuneConfig, JobData]:
    """The candidate's config (written to the job's config.yaml) and its data summary."""
    recorded = copy.deepcopy(production.metadata.get("training_config") or {})
    if not recorded.get("data"):
        raise RetrainError(
            f"{production.ref} has no training config in its metadata (it was not trained by "
            "`lorafleet tune`), so a job cannot rebuild its data; register a version trained "
            f"by `lorafleet tune` as {production.adapter}:production"
        )
    if recorded.get("task") == "classification":
        raise RetrainError(
            f"{production.ref} is a classifier; retraining jobs rebuild generation adapters "
            "only: retrain it with `lorafleet tune` on its config and register the result"
        )
    out = job_dir(registry, job_id)
    (out / "data").mkdir(parents=True, exist_ok=True)
    raw_data = recorded["data"]
    fmt = raw_data.get("format", "completion")
    train_files = _existing(raw_data.get("train", []), production, "data.train")
    eval_files = _existing(raw_data.get("eval", []), production, "data.eval")
    base = local_base(registry)
    fit_files, held_out = train_files, eval_files
    if not eval_files:
        fit_files, held_out = _split_held_out(base, raw_data, train_files, out / "data")
    new_files = _new_files(settings, production.adapter)
    rows = registry.corrections(production.adapter, settings.corrections)
    tokenizer = load_tokenizer(base) if rows and fmt == "chat" else None
    corrections_file, added = _write_corrections(
        rows, fmt, out / "data" / "corrections.jsonl", tokenizer
    )
    recorded.update(base=str(base), base_build=None, output={"dir": str(out), "overwrite": True})
    recorded["data"].update(
        train=[*fit_files, *new_files, *([corrections_file] if corrections_file else [])],
        eval=held_out,
    )
    recorded.setdefault("method", {})["init_from"] = str(registry.artifact_path(production))
    recorded.pop("register", None)
    config_file = out / "config.yaml"
    config_file.write_text(yaml.safe_dump(recorded, sort_keys=False))
    config = load_config(config_file, list(settings.retrain_overrides))
    data = JobData(train_files, new_files, added, corrections_file, held_out)
    return config, data


BASE_ENV = "LORAFLEET_BASE"


def local_base(registry: Registry) -> Path:
    """The base model directory on this host: $LORAFLEET_BASE (a training node of a shared
    registry, with the base copied by `lorafleet base fetch`), else where the registry was
    created. RetrainError unless its fingerprint is the registry's."""
    from registry.basemodel import inspect_base

    given = os.environ.get(BASE_ENV)
    if not given:
        return Path(registry.base.path)
    found = inspect_base(given).fingerprint
    if found != registry.base.fingerprint:
        raise RetrainError(
            f"{BASE_ENV}={given} has fingerprint {found}, but the registry is bound to "
            f"{registry.base.fingerprint}: point it at the registry's base"
        )
    return Path(given).expanduser().resolve()


def _existing(paths: list[str], production: VersionRecord, key: str) -> list[str]:
    for text in paths:
        path = Path(text)
        if not path.is_file():
            where = "" if path.is_absolute() else f", relative to {os.getcwd()}"
            raise RetrainError(
                f"training data file {text} of {production.ref} ({key} of its training config"
                f"{where}) no longer exists; restore it, or register a version trained on data "
                f"that exists as {production.adapter}:production"
            )
    return [str(Path(p).absolute()) for p in paths]


def _new_files(settings: AdapterSettings, adapter: str) -> list[str]:
    if settings.retrain_data_dir is None:
        return []
    directory = Path(settings.retrain_data_dir).expanduser()
    if not directory.is_dir():
        raise RetrainError(
            f"retrain_data_dir {directory} of adapter {adapter!r} is not a directory; create "
            f"it or change it: lorafleet registry settings {adapter} retrain_data_dir=DIR"
        )
    return [
        str(p.absolute())
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix in LOADERS and not p.name.startswith(".")
    ]


def _split_held_out(
    base: Path, raw_data: dict[str, Any], train_files: list[str], out: Path
) -> tuple[list[str], list[str]]:
    """The production run held out a share of its training rows: write the same split
    (same seed and filters) to files, so the held-out rows stay out of the candidate's
    training and both versions are scored on them."""
    try:
        data = DataConfig.model_validate({**raw_data, "train": train_files, "eval": []})
    except ValidationError as err:
        raise RetrainError(f"the production run's data config is invalid now: {err}") from err
    tokenizer = load_tokenizer(base)
    _, held_out, _ = load_examples(data, tokenizer)
    held = {tuple(e.input_ids) for e in held_out}
    fit: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    for path in data.train:
        for row in read_rows(path):
            ids = tuple(tokenize(row, data.format, tokenizer).input_ids)
            (kept if ids in held else fit).append(row)
    fit_file, held_file = out / "production-train.jsonl", out / "held-out.jsonl"
    fit_file.write_text("".join(json.dumps(r, default=str) + "\n" for r in fit))
    held_file.write_text("".join(json.dumps(r, default=str) + "\n" for r in kept))
    return [str(fit_file)], [str(held_file)]


def _write_corrections(
    rows: list[dict[str, Any]],
    fmt: str,
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[str | None, int]:
    """Corrections as training rows of the adapter's format; (file or None, rows written).
    `tokenizer` (chat format) recovers the messages of prompts the server rendered."""
    out = []
    for row in rows:
        prompt, correction = row["prompt"], row["correction"]
        if not correction.strip():
            continue
        if fmt == "completion":
            out.append({"prompt": prompt, "completion": correction})
        elif fmt == "text":
            out.append({"text": prompt + correction})
        else:
            turns = _messages(prompt, tokenizer)
            out.append({"messages": [*turns, {"role": "assistant", "content": correction}]})
    if not out:
        return None, 0
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return str(path), len(out)


CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.DOTALL)


def _messages(
    prompt: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> list[dict[str, str]]:
    """The messages of a chat request as stored with its feedback: a JSON list of messages,
    or the prompt the server rendered with the chat template (ChatML turns, kept only if
    the tokenizer renders them back to the same text); else one user turn."""
    try:
        messages = json.loads(prompt)
    except json.JSONDecodeError:
        messages = None
    if isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    turns = [{"role": r, "content": c} for r, c in CHATML_TURN.findall(prompt)]
    if turns and tokenizer is not None:
        rendered = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        if rendered == prompt:
            return turns
    return [{"role": "user", "content": prompt}]


def score_version(config: TuneConfig) -> dict[str, float]:
    """Scores of the adapter `config.method.init_from` (untrained) on the config's held-out
    set and, with evaluation.forgetting, its reference perplexity on the forgetting check's
    general text: the same evaluation settings and text the run uses for the candidate."""
    from tuning.evaluation import score
    from tuning.train import build_model

    tokenizer = load_tokenizer(config.base)
    held_out = load_eval_examples(config.data, tokenizer)  # a job's config names its eval
    model = build_model(config, config.base)
    forgetting = config.evaluation.forgetting
    scores = score(
        model, tokenizer, held_out, config.data, config.evaluation, forgetting=forgetting
    )
    return {k: float(scores[k]) for k in (*GATE_METRICS, FORGETTING) if k in scores}
