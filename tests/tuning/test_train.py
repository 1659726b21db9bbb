"""Training runs on the tiny base: determinism, resume after a kill equals an uninterrupted
run, LoRA+ groups, early stopping, evaluation numbers, complete registered metadata, and a
2-process run under torchrun with gloo."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from registry import Registry
from registry.profile import BaselineProfile
from registry.scoring import exact_match, token_f1
from tuning.config import TrainingConfig
from tuning.train import lr_factor, param_groups, run

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_same_seed_same_adapter_weights(
    tiny_base: Path, task_files, tune_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    first = run(tune_config(tiny_base, task_files, tmp_path / "a"))
    run(tune_config(tiny_base, task_files, tmp_path / "b"))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run(tune_config(tiny_base, task_files, tmp_path / "c", **{"training.seed": 1}))
    c = weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # The run learned: adapter loss below the base's on held-out data.
    metrics = first.metadata.metrics
    assert metrics["eval_loss"] < metrics["base"]["eval_loss"]


def test_resume_after_kill_equals_uninterrupted_run(
    tiny_base: Path,
    task_files,
    tune_config,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    # Dropout and early-stopping state must survive the restart too.
    overrides = {
        "training.checkpoint_every": 5,
        "training.early_stopping_patience": 5,
        "method.dropout": 0.1,
    }
    run(tune_config(tiny_base, task_files, tmp_path / "straight", **overrides))

    config = tune_config(tiny_base, task_files, tmp_path / "killed", **overrides)
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    env = {**os.environ, "LORAFLEET_PAUSE_AT": "tune.checkpointed"}
    proc = subprocess.Popen(
        [LORAFLEET, "tune", str(config_path)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "paused at tune.checkpointed" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "adapter").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000005"]

    resumed = run(config)
    straight, again = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    state = resumed.metadata.metrics["train"]
    assert (
        state["steps"] == 12 and len(state["eval_losses"]) == 3
    )  # evals from before the kill kept


def test_lora_plus_groups_and_schedule(
    tiny_base: Path, task_files, tune_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from tuning.train import build_model

    config = tune_config(
        tiny_base,
        task_files,
        tmp_path,
        **{
            "training.lr_ratio_b": 16,
            "method.modules_to_save": "[lm_head]",
            "training.lr_modules_to_save": 1e-4,
            "training.weight_decay": 0.1,
        },
    )
    model = build_model(config, tiny_base)
    groups = {g["name"]: g for g in param_groups(model, config.training)}
    assert groups["a"]["lr"] == 3e-3 and groups["b"]["lr"] == 3e-3 * 16
    assert groups["saved"]["lr"] == 1e-4
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in groups["b"]["params"])
    assert all(g["weight_decay"] == 0.1 for g in groups.values())
    t = TrainingConfig(warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 100, t) == pytest.approx(0.1)
    assert lr_factor(9, 100, t) == 1.0
    assert lr_factor(55, 100, t) == pytest.approx(0.5)
    assert lr_factor(99, 100, TrainingConfig(schedule="linear")) == pytest.approx(0.01)


def test_early_stopping_keeps_best_weights(
    tiny_base: Path, task_files, tune_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # A learning rate far too high makes the eval loss rise after the first eval.
    result = run(
        tune_config(
            tiny_base,
            task_files,
            tmp_path,
            **{
                "training.lr": 0.5,
                "training.max_steps": 40,
                "training.eval_every": 2,
                "training.early_stopping_patience": 2,
                "training.schedule": "constant",
            },
        )
    )
    train = result.metadata.metrics["train"]
    assert train["stopped_early"] and train["steps"] < 40
    # The record says what computed it: auto resolved ($LORAFLEET_DTYPE fp32 in the tests),
    # the CPU, and the torch threads from step 0 on.
    assert train["dtype"] == "fp32" and train["cpu"]["model"]
    assert train["threads"][0][0] == 0 and train["threads"][0][1] >= 1
    best = min(loss for _, loss in train["eval_losses"])
    assert train["best_eval_loss"] == best
    assert result.metadata.metrics["eval_loss"] == pytest.approx(best, rel=1e-5)


def test_metric_functions_on_known_cases() -> None:
    assert exact_match(" 12 ", "12") == 1.0 and exact_match("12", "13") == 0.0
    assert token_f1("the cat sat", "the cat") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 1.0


def test_register_records_complete_metadata(
    tiny_base: Path,
    task_files,
    tune_config,
    tmp_path: Path,
    cli: Callable[..., object],  # type: ignore[no-untyped-def]
) -> None:
    home = tmp_path / "home"
    config = tune_config(
        tiny_base,
        task_files,
        tmp_path / "run",
        **{
            "register.name": "adder",
            "register.alias": "staging",
            "register.home": home,
            "method.use_dora": True,
        },
    )
    result = run(config)
    assert result.registered == "adder@1"
    registry = Registry(home)
    record = registry.resolve("adder:staging")
    meta = record.metadata
    assert meta["base_fingerprint"] == registry.base.fingerprint
    assert meta["tokenizer_hash"] == registry.base.tokenizer_hash and meta["chat_template_hash"]
    assert meta["dataset"]["examples"] == 52 and len(meta["dataset"]["fingerprint"]) == 64
    assert str(task_files[0]) in meta["dataset"]["source"]
    assert meta["training_config"]["method"]["use_dora"] is True
    for key in (
        "eval_loss",
        "perplexity",
        "exact_match",
        "token_f1",
        "base",
        "forgetting",
        "train",
    ):
        assert key in meta["metrics"], key
    assert set(meta["metrics"]["base"]) >= {"eval_loss", "exact_match"}
    assert {"torch", "transformers", "peft"} <= set(meta["library_versions"])
    assert meta["seed"] == 0 and meta["trigger"] == "manual" and meta["wall_time_s"] > 0
    assert meta["tokens_per_s"] > 0 and math.isfinite(meta["metrics"]["forgetting"]["change_pct"])
    assert "dora" in record.features and record.engines == []
    stored = registry.artifact_path(record)
    profile = BaselineProfile.load(stored / meta["drift_profile"])
    assert profile.samples == 52 and profile.completion_length_counts is not None
    assert (stored / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = cli("registry", "show", "adder@1", home=home)
    assert "exact_match" in shown.stdout and "dataset" in shown.stdout


def test_two_processes_with_gloo(tiny_base: Path, task_files, tune_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tune_config(
        tiny_base,
        task_files,
        tmp_path / "ddp",
        **{"training.max_steps": 6, "evaluation.forgetting": False},
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--standalone", "-m", "tuning", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "adapter" / "lorafleet.json").read_text())
    assert meta["metrics"]["train"]["processes"] == 2
    assert meta["metrics"]["train"]["steps"] == 6
    assert out.stdout.count("adapter:") == 1  # only process 0 reports
    assert meta["metrics"]["eval_loss"] < meta["metrics"]["base"]["eval_loss"]


def test_packed_training_learns_and_base_numbers_are_the_plain_model(
    tiny_base: Path,
    task_files,
    tune_config,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning.data import load_examples
    from tuning.evaluation import mean_loss

    config = tune_config(
        tiny_base, task_files, tmp_path, **{"data.packing": True, "training.max_steps": 20}
    )
    metrics = run(config).metadata.metrics
    assert metrics["eval_loss"] < metrics["base"]["eval_loss"]
    # The base column is the plain base model, not the adapter with its scale set to zero.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    _, held_out, _ = load_examples(config.data, tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    expected = mean_loss(plain, held_out, 16, tokenizer.pad_token_id)
    assert metrics["base"]["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_registry_of_another_base_refuses_before_training(
    tiny_base: Path,
    other_base: Path,
    task_files,
    tune_config,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    from registry.errors import AlreadyInitialized

    home = tmp_path / "home"
    Registry.create(home, other_base).close()
    config = tune_config(
        tiny_base, task_files, tmp_path / "run", **{"register.name": "adder", "register.home": home}
    )
    with pytest.raises(AlreadyInitialized, match="is bound to base"):
        run(config)
    assert not (tmp_path / "run").exists()
