"""Retraining jobs on the tiny base with real training and a real registry: warm start,
lineage and canary of a job that passes the gate, a candidate refused by the gate, one
refused for forgetting general text, a runner SIGKILLed midway, schedules, corrections in
the job's data, and clear failures."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from registry import Registry, VersionMetadata
from registry.cli import main
from tuning.config import load_config
from tuning.corpus import sentences
from tuning.errors import ConfigError
from tuning.retrain import FORGETTING_SKIPPED, GATE_METRICS, gate_failed, judge, run_job
from tuning.train import run

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
EXAMPLES = Path(__file__).parents[2] / "examples" / "data" / "arithmetic"


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()]


def write_rows(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A slice of the arithmetic example task: training, held-out and new rows."""
    root = tmp_path_factory.mktemp("arith-data")
    train = rows("train.jsonl")
    (root / "new").mkdir()
    return {
        "train": write_rows(root / "train.jsonl", train[:160]),
        "eval": write_rows(root / "eval.jsonl", rows("eval.jsonl")[:32]),
        "new_dir": root / "new",
        "new": write_rows(root / "new" / "more.jsonl", train[160:200]),
    }


def tune_args(base: Path, task: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"base={base}",
        f"data.train=[{task['train']}]",
        f"data.eval=[{task['eval']}]",
        "data.max_length=32",
        f"output.dir={out}",
        "method.r=4",
        "method.alpha=8",
        "training.batch_size=16",
        "training.max_steps=40",
        "training.eval_every=10",
        "training.lr=3e-2",
        "evaluation.max_new_tokens=4",
        "evaluation.max_examples=16",
        "evaluation.forgetting=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def template(
    tiny_base: Path, task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A registry whose adapter `arith` has version 1 (trained here) as production."""
    home = tmp_path_factory.mktemp("template") / "home"
    Registry.create(home, tiny_base, max_rank=16, actor="tests").close()
    out = home.parent / "run"
    registered = ["register.name=arith", "register.alias=production", f"register.home={home}"]
    run(load_config(None, tune_args(tiny_base, task, out, *registered)))
    return home


@pytest.fixture
def fleet(template: Path, tmp_path: Path) -> Registry:
    """A private copy of the template registry."""
    home = tmp_path / "home"
    shutil.copytree(template, home)
    registry = Registry(home)
    yield registry
    registry.close()


def cli(
    *args: str, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "LORAFLEET_HOME": str(home), "LORAFLEET_ACTOR": "tester", **(env or {})}
    return subprocess.run(
        [LORAFLEET, *args], capture_output=True, text=True, env=full, timeout=300, check=False
    )


def aliases(registry: Registry) -> dict[str, tuple[int, float | None]]:
    return {a.alias: (a.version, a.weight) for a in registry.aliases("arith")}


# ---- warm start ---------------------------------------------------------------------------


def test_warm_start_begins_at_the_source_adapters_weights(
    tiny_base: Path, task: dict[str, Path], adapter_factory: Any, tmp_path: Path
) -> None:
    from peft import get_peft_model_state_dict

    from tuning.train import build_model

    source = adapter_factory(tiny_base, rank=4, seed=3)  # alpha 8, q_proj + v_proj
    config = load_config(None, tune_args(tiny_base, task, tmp_path, f"method.init_from={source}"))
    state = get_peft_model_state_dict(build_model(config, tiny_base))
    saved = load_file(source / "adapter_model.safetensors")
    assert state.keys() == saved.keys() and len(saved) == 8
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # not a fresh init

    mismatch = tune_args(
        tiny_base,
        task,
        tmp_path,
        f"method.init_from={source}",
        "method.r=8",
        "method.target_modules=[q_proj,k_proj,v_proj]",
    )
    with pytest.raises(ConfigError) as err:
        build_model(load_config(None, mismatch), tiny_base)
    message = str(err.value)
    assert "rank 4, alpha 8.0 and targets q_proj, v_proj" in message
    assert "rank 8, alpha 8.0 and targets k_proj, q_proj, v_proj" in message


# ---- the gate -----------------------------------------------------------------------------


def test_gate_needs_a_candidate_at_least_as_good() -> None:
    production = {"eval_loss": 2.0, "exact_match": 0.5}
    assert judge({"eval_loss": 2.0, "exact_match": 0.5}, production, 0.0, 0.1).passed
    assert judge({"eval_loss": 2.09, "exact_match": 0.46}, production, 0.05, 0.1).passed
    worse = judge({"eval_loss": 2.2, "exact_match": 0.4}, production, 0.05, 0.1)
    assert not worse.passed and len(worse.failures) == 2
    assert worse.failures[0].startswith("eval loss 2.2000 of the candidate > 2.1000")
    assert worse.failures[1].startswith("exact match 0.4000 of the candidate < 0.4500")
    assert not judge({"eval_loss": float("nan")}, {"eval_loss": 2.0}, 0.0, 0.1).passed


def test_gate_refuses_a_candidate_that_forgets_general_text() -> None:
    production = {"eval_loss": 2.0, "exact_match": 0.5, "reference_perplexity": 150.0}
    same_task = {"eval_loss": 1.9, "exact_match": 0.5}
    kept = judge({**same_task, "reference_perplexity": 164.9}, production, 0.0, 0.1)
    assert kept.passed and kept.failures == [] and kept.skipped == []
    assert kept.describe() == (
        "eval loss 1.9000 vs production 2.0000, exact match 0.5000 vs 0.5000, reference "
        "perplexity 164.90 vs 150.00 (tolerance 0, forgetting tolerance 0.1)"
    )
    forgot = judge({**same_task, "reference_perplexity": 165.1}, production, 0.0, 0.1)
    assert not forgot.passed and forgot.failures == [
        "reference perplexity 165.10 of the candidate > 165.00 (production's 150.00 x (1 + "
        "0.1), on the general text of the forgetting check)"
    ]
    assert judge({**same_task, "reference_perplexity": 165.1}, production, 0.0, 0.2).passed
    assert not judge(
        {**same_task, "reference_perplexity": float("nan")}, production, 0.0, 0.1
    ).passed
    recorded = forgot.to_dict()
    assert recorded["candidate"]["reference_perplexity"] == 165.1
    assert recorded["production"]["reference_perplexity"] == 150.0
    assert (recorded["tolerance"], recorded["forgetting_tolerance"]) == (0.0, 0.1)

    # evaluation.forgetting: false measures neither version: the verdict says so.
    unchecked = judge(same_task, {"eval_loss": 2.0, "exact_match": 0.5}, 0.0, 0.1)
    assert unchecked.passed and unchecked.skipped == [FORGETTING_SKIPPED]
    assert "evaluation.forgetting: false" in FORGETTING_SKIPPED
    assert unchecked.describe().endswith(
        "forgetting not checked (tolerance 0, forgetting tolerance 0.1)"
    )


# ---- jobs ---------------------------------------------------------------------------------


def test_job_registers_candidate_with_lineage_and_canary(
    fleet: Registry, task: dict[str, Path]
) -> None:
    fleet.update_settings(
        "arith",
        {
            "canary_weight": 0.25,
            "retrain_data_dir": str(task["new_dir"]),
            "retrain_overrides": ["training.max_steps=10", "training.lr=1e-3"],
        },
        actor="tester",
    )
    common = {"adapter": "arith", "version": 1, "output": " 1"}
    accepted = fleet.add_feedback("r1", -1.0, correction=" 17", prompt="Add: 12 + 5 =", **common)
    rejected = fleet.add_feedback("r2", -1.0, correction=" 0", prompt="Add: 1 + 1 =", **common)
    fleet.add_feedback("r3", -1.0, correction=" 9", prompt="Add: 4 + 5 =", **common)  # pending
    fleet.review_feedback([accepted], "accepted")
    fleet.review_feedback([rejected], "rejected")

    queued = cli("jobs", "queue", "arith", "--reason", "weekly refresh", home=fleet.home)
    assert queued.returncode == 0 and queued.stdout == "queued job 1 for arith (manual)\n"
    ran = cli("jobs", "run", home=fleet.home)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("job 1 arith succeeded (manual): arith@2 from @1, canary 0.25")
    assert ran.stdout.count("\n") == 1 and ran.stderr == ""  # quiet: one line per job

    production, candidate = fleet.get_version("arith", 1), fleet.get_version("arith", 2)
    assert candidate.metadata["parent_version"] == 1
    assert candidate.metadata["trigger"] == "manual" and candidate.metadata["job_id"] == 1
    assert aliases(fleet) == {"production": (1, None), "canary": (2, 0.25)}
    job = fleet.jobs.get(1)
    assert (job.state, job.parent_version, job.version) == ("succeeded", 1, 2)
    gate = job.result["gate"]  # type: ignore[index]
    assert gate["passed"] is True and gate["tolerance"] == 0.0
    # Production was tuned with evaluation.forgetting: false, so the job's config has it too.
    assert (
        gate["skipped"] == [FORGETTING_SKIPPED] and "reference_perplexity" not in gate["candidate"]
    )
    # Same held-out set as production's own run: its score there is the one it registered with.
    for metric in GATE_METRICS:
        assert gate["production"][metric] == pytest.approx(production.metadata["metrics"][metric])
        assert gate["candidate"][metric] == pytest.approx(candidate.metadata["metrics"][metric])
    assert gate["candidate"]["eval_loss"] <= gate["production"]["eval_loss"]
    assert job.result["canary_weight"] == 0.25  # type: ignore[index]

    data = job.result["data"]  # type: ignore[index]
    assert data["train_files"] == [str(task["train"])]
    assert data["new_files"] == [str(task["new"])] and data["corrections"] == 1
    assert data["held_out_files"] == [str(task["eval"])]
    lines = Path(data["corrections_file"]).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"prompt": "Add: 12 + 5 =", "completion": " 17"}
    ]
    recorded = candidate.metadata["training_config"]
    assert recorded["data"]["train"] == [
        str(task["train"]),
        str(task["new"]),
        data["corrections_file"],
    ]
    assert recorded["method"]["init_from"] == str(fleet.artifact_path(production))
    assert recorded["training"]["max_steps"] == 10 and recorded["training"]["lr"] == 1e-3
    distinct = {json.dumps(r, sort_keys=True) for r in rows("train.jsonl")[:200]}
    assert candidate.metadata["dataset"]["examples"] == len(distinct) + 1  # + the correction
    # A warm start: the candidate's first eval is already near production's, far below base.
    first_eval = candidate.metadata["metrics"]["train"]["eval_losses"][0][1]
    assert first_eval < production.metadata["metrics"]["base"]["eval_loss"] - 1.0

    history = cli("registry", "history", "arith", home=fleet.home).stdout.splitlines()
    steps = [
        next(i for i, line in enumerate(history) if f" {needle}" in line)
        for needle in (
            "job.queued arith",
            "job.started arith",
            "job.succeeded arith@2",  # and its canary move, in one transaction
            "alias.set arith:canary none -> 2 weight 0.25",
        )
    ]
    assert steps == sorted(steps)
    assert "weekly refresh" in history[steps[0]] and "job 1: gate passed" in history[steps[3]]

    shown = cli("jobs", "show", "1", home=fleet.home).stdout
    assert "gate        passed" in shown and "1 new file(s), 1 correction(s)" in shown
    assert "    tolerance 0, forgetting tolerance 0.1\n" in shown  # the defaults
    assert f"    {FORGETTING_SKIPPED}\n" in shown


def test_candidate_failing_the_gate_registers_nothing(
    fleet: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    # lr 1 without clipping ruins the warm-started weights within a few steps.
    overrides = ["training.lr=1.0", "training.max_grad_norm=null", "training.max_steps=4"]
    fleet.update_settings("arith", {"retrain_overrides": overrides}, actor="tester")
    fleet.jobs.queue("arith", actor="tester")
    job = fleet.jobs.claim(actor="tester")
    assert job is not None
    finished = run_job(fleet, job, actor="tester", heartbeat_s=0.05)

    assert finished.state == "failed" and gate_failed(finished)
    gate = finished.result["gate"]  # type: ignore[index]
    assert gate["passed"] is False
    assert gate["candidate"]["eval_loss"] > gate["production"]["eval_loss"]
    assert finished.error is not None and finished.error.startswith(
        f"gate failed: eval loss {gate['candidate']['eval_loss']:.4f} of the candidate > "
        f"{gate['production']['eval_loss']:.4f}"
    )
    assert finished.version is None and finished.parent_version == 1
    assert [v.version for v in fleet.list_versions("arith")] == [1]
    assert aliases(fleet) == {"production": (1, None)}
    assert finished.heartbeat_at is not None and finished.started_at is not None
    assert finished.heartbeat_at > finished.started_at  # the background thread beat
    actions = [e.action for e in fleet.history("arith")]
    assert actions[-3:] == ["job.queued", "job.started", "job.failed"]

    # The runner: a gate failure is the gate doing its work, not a failed run (exit 0).
    fleet.jobs.queue("arith", actor="tester")
    assert main(["jobs", "run", "--home", str(fleet.home)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("job 2 arith failed (manual): gate failed: eval loss ")
    assert line.endswith("nothing registered, no alias moved\n")
    assert aliases(fleet) == {"production": (1, None)}


# ---- forgetting -------------------------------------------------------------------------


def general_rows(seed: int, count: int, *, salad: bool = False) -> list[dict[str, str]]:
    """`count` completion rows of the general text the project generates (tuning/corpus.py,
    other seeds than the forgetting check's text): two sentences with the first word as the
    prompt. `salad`: one sentence's words in random order, text that unlearns its grammar."""
    rng = random.Random(seed)
    lines = sentences(2 * count, seed=seed)
    out = []
    for first, second in zip(lines[::2], lines[1::2], strict=True):
        words = (
            rng.sample(first.split(), len(first.split())) if salad else f"{first} {second}".split()
        )
        out.append({"prompt": words[0], "completion": " " + " ".join(words[1:])})
    return out


@pytest.fixture(scope="module")
def replay_template(
    tiny_base: Path, task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A registry whose `arith` production was tuned on the task plus a replay of general
    text, forgetting check on: the random base's general-text perplexity is near its
    vocabulary size, production's far below it (measured: 164 vs 3216)."""
    root = tmp_path_factory.mktemp("replay")
    replay = write_rows(root / "general.jsonl", general_rows(1, 320))
    home = root / "home"
    Registry.create(home, tiny_base, max_rank=16, actor="tests").close()
    args = tune_args(
        tiny_base,
        task,
        root / "run",
        f"data.train=[{task['train']},{replay}]",
        "evaluation.forgetting=true",
        "method.target_modules=all-linear",
        "method.r=8",
        "method.alpha=16",
        "training.lr=1e-2",
        "training.warmup_steps=5",
        "training.max_steps=80",
        "register.name=arith",
        "register.alias=production",
        f"register.home={home}",
    )
    run(load_config(None, args))
    return home


@pytest.fixture
def replay_fleet(replay_template: Path, tmp_path: Path) -> Registry:
    """A private copy of the replay template registry."""
    home = tmp_path / "home"
    shutil.copytree(replay_template, home)
    registry = Registry(home)
    yield registry
    registry.close()


def run_one_job(registry: Registry, settings: dict[str, Any]) -> Any:
    registry.update_settings("arith", settings, actor="tester")
    registry.jobs.queue("arith", actor="tester")
    job = registry.jobs.claim(actor="tester")
    assert job is not None
    return run_job(registry, job, actor="tester")


def test_retrain_keeping_general_text_passes_the_forgetting_check(
    replay_fleet: Registry, task: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = ["training.max_steps=10", "training.lr=1e-3"]
    settings = {
        "retrain_data_dir": str(task["new_dir"]),
        "retrain_overrides": overrides,
        "gate_forgetting_tolerance": 0.1,  # for a production that knows general text
    }
    finished = run_one_job(replay_fleet, settings)

    assert finished.state == "succeeded" and finished.version == 2
    gate = finished.result["gate"]
    assert gate["passed"] is True and gate["skipped"] == [] and gate["failures"] == []
    assert gate["forgetting_tolerance"] == 0.1
    production = replay_fleet.get_version("arith", 1).metadata["metrics"]["forgetting"]
    candidate = replay_fleet.get_version("arith", 2).metadata["metrics"]["forgetting"]
    ref_p, ref_c = (
        gate["production"]["reference_perplexity"],
        gate["candidate"]["reference_perplexity"],
    )
    # The same text and window as `lorafleet tune`'s check: the job measures production at
    # the number it registered with, and the candidate at the number its run recorded.
    assert ref_p == pytest.approx(production["reference_perplexity"])
    assert ref_c == pytest.approx(candidate["reference_perplexity"])
    assert ref_p < production["base_reference_perplexity"] / 10  # production knows the text
    assert ref_c <= ref_p * 1.1  # measured: 0.96 x production's (158 vs 164)
    succeeded = [e for e in replay_fleet.history("arith") if e.action == "job.succeeded"]
    assert succeeded[-1].reason.endswith(
        f"reference perplexity {ref_c:.2f} vs {ref_p:.2f} (tolerance 0, forgetting tolerance 0.1)"
    )

    assert main(["jobs", "show", "1", "--home", str(replay_fleet.home)]) == 0
    shown = capsys.readouterr().out
    assert f"    {'reference_perplexity':<38}{ref_c:>9.4f}  {ref_p:>10.4f}\n" in shown
    assert "    tolerance 0, forgetting tolerance 0.1\n" in shown


def test_candidate_that_forgets_general_text_is_refused(
    replay_fleet: Registry, tmp_path: Path
) -> None:
    new = tmp_path / "new"
    new.mkdir()
    write_rows(new / "salad.jsonl", general_rows(2, 400, salad=True))
    # Slack on the task's own metrics, so that the forgetting check alone decides: this
    # candidate stays within it on arithmetic (measured: eval loss 1.13 x production's).
    settings = {
        "retrain_data_dir": str(new),
        "retrain_overrides": ["training.max_steps=20", "training.lr=1e-2"],
        "gate_tolerance": 0.2,
        "gate_forgetting_tolerance": 0.1,
    }
    finished = run_one_job(replay_fleet, settings)

    assert finished.state == "failed" and gate_failed(finished)
    gate = finished.result["gate"]
    ref_p, ref_c = (
        gate["production"]["reference_perplexity"],
        gate["candidate"]["reference_perplexity"],
    )
    assert ref_c > 1.3 * ref_p  # measured: 1.41 x production's (232 vs 164)
    forgetting = (
        f"reference perplexity {ref_c:.2f} of the candidate > {ref_p * 1.1:.2f} (production's "
        f"{ref_p:.2f} x (1 + 0.1), on the general text of the forgetting check)"
    )
    assert gate["failures"] == [forgetting]
    assert finished.error == f"gate failed: {forgetting}; nothing registered, no alias moved"
    assert finished.version is None
    assert [v.version for v in replay_fleet.list_versions("arith")] == [1]
    assert aliases(replay_fleet) == {"production": (1, None)}


def test_runner_killed_midway_changes_no_alias_and_is_failed_next_run(
    fleet: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.update_settings("arith", {"retrain_overrides": ["training.max_steps=2"]}, actor="t")
    fleet.jobs.queue("arith", actor="tester")
    env = {**os.environ, "LORAFLEET_HOME": str(fleet.home), "LORAFLEET_PAUSE_AT": "retrain.trained"}
    proc = subprocess.Popen(
        [LORAFLEET, "jobs", "run"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first == "lorafleet: paused at retrain.trained\n"  # nothing else on stderr before
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    assert fleet.jobs.get(1).state == "running"
    assert [v.version for v in fleet.list_versions("arith")] == [1]
    assert aliases(fleet) == {"production": (1, None)}

    assert main(["jobs", "run", "--home", str(fleet.home), "--actor", "cron"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("job 1 arith failed (manual): worker ")
    job = fleet.jobs.get(1)
    assert job.state == "failed" and "killed midway" in (job.error or "")
    assert aliases(fleet) == {"production": (1, None)}
    assert [e.action for e in fleet.history("arith")][-1] == "job.failed"


def test_due_schedule_queues_exactly_one_job(
    fleet: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    home = ["--home", str(fleet.home)]
    assert main(["jobs", "schedule", "arith", "--every", "1s", *home]) == 0
    time.sleep(1.1)
    assert main(["jobs", "run", "--max-jobs", "0", *home]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "queued job 1 for arith (schedule)"
    time.sleep(1.1)  # due again, but a queued job already exists: nothing more is queued
    assert main(["jobs", "run", "--max-jobs", "0", *home]) == 0
    assert capsys.readouterr().out == "no queued jobs\n"
    from datetime import UTC, datetime, timedelta

    assert fleet.jobs.queue_due(actor="t", now=datetime.now(UTC) + timedelta(days=1)) == []
    jobs = fleet.jobs.recent("arith")
    assert [(j.id, j.trigger, j.state) for j in jobs] == [(1, "schedule", "queued")]
    assert main(["jobs", "list", "arith", "--state", "queued", "--json", *home]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["trigger"], j["state"]) for j in listed] == [(1, "schedule", "queued")]
    assert listed[0]["reason"].startswith("scheduled for ")
    assert main(["jobs", "list", "arith", "--state", "failed", *home]) == 0
    assert capsys.readouterr().out == "no jobs\n"

    assert main(["jobs", "schedule", "arith", "--cron", "0 3 * * *", *home]) == 0
    assert main(["jobs", "schedules", *home]) == 0
    assert "arith: cron '0 3 * * *', next " in capsys.readouterr().out
    assert main(["jobs", "unschedule", "arith", *home]) == 0
    assert main(["jobs", "schedule", "arith", "--every", "soon", *home]) == 2
    assert "interval 'soon' is not a positive number" in capsys.readouterr().err


def test_jobs_without_production_or_data_fail_with_the_reason(
    fleet: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    production = fleet.get_version("arith", 1)
    artifact = fleet.artifact_path(production)
    fleet.register("noprod", artifact, metadata=VersionMetadata(**production.metadata))
    gone = tmp_path / "deleted.jsonl"
    meta = VersionMetadata(**production.metadata)
    meta.training_config["data"]["train"] = [str(gone)]
    fleet.register("nodata", artifact, metadata=meta)
    fleet.set_alias("nodata", "production", 1)
    for name in ("noprod", "nodata"):
        fleet.jobs.queue(name, actor="tester")

    assert main(["jobs", "run", "--home", str(fleet.home)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        "job 1 noprod failed (manual): adapter 'noprod' has no production version"
    ) and lines[0].endswith("promote one first: lorafleet registry promote noprod VERSION")
    assert lines[1].startswith(
        f"job 2 nodata failed (manual): training data file {gone} of nodata@1"
    )
    assert not any(a.alias == "canary" for a in fleet.aliases())


# ---- data of a job ------------------------------------------------------------------------


def test_held_out_split_of_production_stays_out_of_training(
    tiny_base: Path, task: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from tuning.data import load_examples, read_rows
    from tuning.retrain import _split_held_out

    raw = {"train": [str(task["train"])], "eval": [], "max_length": 32, "eval_fraction": 0.1}
    fit, held = _split_held_out(tiny_base, raw, [str(task["train"])], tmp_path)
    fit_rows, held_rows = read_rows(Path(fit[0])), read_rows(Path(held[0]))
    fit_keys = [json.dumps(r) for r in fit_rows]
    held_keys = list(dict.fromkeys(json.dumps(r) for r in held_rows))  # distinct, in order
    assert len(fit_rows) + len(held_rows) == 160
    assert len(held_keys) == 8 and len(set(fit_keys)) == 68  # 76 distinct rows, 10% held out
    assert not set(fit_keys) & set(held_keys)
    config = load_config(
        None,
        [
            f"base={tiny_base}",
            f"data.train=[{task['train']}]",
            "data.max_length=32",
            f"output.dir={tmp_path / 'o'}",
        ],
    )
    _, production_held_out, _ = load_examples(config.data, AutoTokenizer.from_pretrained(tiny_base))
    assert [e.completion for e in production_held_out] == [
        json.loads(k)["completion"] for k in held_keys
    ]


def test_corrections_become_rows_of_the_adapters_format(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tuning.retrain import _write_corrections

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nall"}]
    rendered = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    feedback = [
        {"prompt": json.dumps([{"role": "user", "content": "Hi"}]), "correction": "Hello!"},
        {"prompt": rendered, "correction": "Hey."},  # as the server stores a chat request
        {"prompt": "plain question", "correction": "answer"},
        {"prompt": "blank", "correction": "  "},
    ]
    path, count = _write_corrections(feedback, "chat", tmp_path / "c.jsonl", tokenizer)
    assert count == 3 and path == str(tmp_path / "c.jsonl")
    written = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert written[0]["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert written[1]["messages"] == [*turns, {"role": "assistant", "content": "Hey."}]
    assert written[2]["messages"][0] == {"role": "user", "content": "plain question"}
    assert _write_corrections([], "completion", tmp_path / "none.jsonl") == (None, 0)


def test_a_training_node_uses_its_own_copy_of_the_registrys_base(
    home: Path, tiny_base: Path, other_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuning.retrain import RetrainError, local_base

    registry = Registry(home)
    assert local_base(registry) == Path(registry.base.path)
    copy = shutil.copytree(tiny_base, tmp_path / "node" / "base")
    monkeypatch.setenv("LORAFLEET_BASE", str(copy))
    assert local_base(registry) == copy.resolve()
    monkeypatch.setenv("LORAFLEET_BASE", str(other_base))
    with pytest.raises(RetrainError, match=f"bound to {registry.base.fingerprint}"):
        local_base(registry)
    registry.close()
