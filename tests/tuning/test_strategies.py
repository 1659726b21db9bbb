"""Tuning strategies do what they say: layer-wise learning rates in the optimizer's groups,
gradual unfreezing that leaves earlier layers exactly at their initial weights until their
stage, and replay batches that hold the configured share of general text."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from tuning.errors import ConfigError
from tuning.train import build_model, param_groups, run, train_loop

LAYER = re.compile(r"\.layers\.(\d+)\.")


def _layer(name: str) -> int | None:
    found = LAYER.search(name)
    return int(found.group(1)) if found else None


def test_layer_lr_decay_sets_each_layers_rate(
    tiny_base: Path, task_files, tune_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config = tune_config(
        tiny_base,
        task_files,
        tmp_path,
        **{
            "training.layer_lr_decay": 0.5,
            "training.lr": 1e-3,
            "training.lr_ratio_b": 4,
            "training.lr_modules_to_save": 1e-4,
            "method.target_modules": "[q_proj, v_proj, embed_tokens]",
            "method.modules_to_save": "[lm_head]",
        },
    )
    model = build_model(config, tiny_base)
    groups = {g["name"]: g for g in param_groups(model, config.training)}
    names = {id(p): n for n, p in model.named_parameters()}
    # Two layers: layer 1 at the full rate, layer 0 at half, the embeddings at a quarter.
    assert groups["a.layer1"]["lr"] == pytest.approx(1e-3)
    assert groups["a.layer0"]["lr"] == pytest.approx(5e-4)
    assert groups["b.layer1"]["lr"] == pytest.approx(4e-3)
    assert groups["b.layer0"]["lr"] == pytest.approx(2e-3)
    assert groups["a.embeddings"]["lr"] == pytest.approx(2.5e-4)
    assert groups["saved"]["lr"] == pytest.approx(1e-4)  # the new component: its own rate
    for name, group in groups.items():
        for param in group["params"]:
            pname = names[id(param)]
            if name.startswith("saved"):
                assert "modules_to_save" in pname
            elif name.endswith(".embeddings"):
                assert "embed_tokens" in pname
            else:
                assert _layer(pname) == int(name.rsplit("layer", 1)[1]), pname
                assert ("lora_B" in pname) == name.startswith("b")
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == sum(1 for p in model.parameters() if p.requires_grad)
    # Without decay the groups stay as they were: one per kind.
    plain = {
        g["name"]
        for g in param_groups(model, tune_config(tiny_base, task_files, tmp_path).training)
    }
    assert plain == {"a", "b", "saved"}


def test_unfreezing_keeps_earlier_layers_at_their_initial_weights(
    tiny_base: Path, task_files, tune_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from tuning.data import load_examples, load_tokenizer

    config = tune_config(
        tiny_base,
        task_files,
        tmp_path / "run",
        **{"method.unfreeze": "{start_layers: 1, every_steps: 3}", "training.max_steps": 7},
    )
    model = build_model(config, tiny_base)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = load_tokenizer(tiny_base)
    train, held_out, _ = load_examples(config.data, tokenizer)
    seen: list[dict[str, object]] = []

    def observe(state, optimizer) -> None:  # type: ignore[no-untyped-def]
        params = {id(p): n for n, p in model.named_parameters()}
        row: dict[str, object] = {"step": state.step}
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = params[id(param)]
                row[name] = (
                    group["depth"],
                    param.requires_grad,
                    torch.equal(param.detach(), initial[name]),
                    bool(optimizer.state.get(param)),
                )
        seen.append(row)

    state = train_loop(
        config, model, train, held_out, tokenizer.pad_token_id, tmp_path, observe=observe
    )
    assert state.stages == [[0, 1], [3, 2]]
    assert len(seen) == 7
    for row in seen:
        step = row.pop("step")
        for name, (depth, grad, unchanged, has_state) in row.items():  # type: ignore[misc]
            if depth == 0 and step <= 3:  # steps 1-3 ran with layer 0 frozen
                assert not grad and unchanged and not has_state, (step, name)
            else:
                assert grad and has_state, (step, name)
                if "lora_B" in name or step >= 5:  # A moves once B is no longer zero
                    assert not unchanged, (step, name)
    # After the run no layer is left frozen.
    assert all(p.requires_grad for n, p in model.named_parameters() if n in initial)


def test_unfreezing_and_layer_rates_are_recorded_and_printed(
    tiny_base: Path, task_files, tune_config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    config = tune_config(
        tiny_base,
        task_files,
        tmp_path,
        **{
            "method.unfreeze": "{start_layers: 1, every_epochs: 1}",
            "training.layer_lr_decay": 0.8,
            "training.max_steps": 16,
            "evaluation.forgetting": False,
        },
    )
    with caplog.at_level(logging.INFO, logger="tuning.train"):
        result = run(config)
    meta = result.metadata
    # 52 examples in batches of 8: 7 steps an epoch, so layer 0 joins at step 7.
    assert meta.metrics["train"]["unfreeze_stages"] == [[0, 1], [7, 2]]
    recorded = meta.training_config
    assert recorded["method"]["unfreeze"]["every_epochs"] == 1
    assert recorded["training"]["layer_lr_decay"] == 0.8
    printed = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(r"a\.layer0 .* lr 0\.0024\b", printed), printed
    assert re.search(r"a\.layer1 .* lr 0\.003\b", printed), printed
    assert "step 7: the last 2 layers train" in printed


def test_unfreeze_settings_are_checked(
    tiny_base: Path, task_files, tune_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="exactly one of every_steps and every_epochs"):
        tune_config(tiny_base, task_files, tmp_path, **{"method.unfreeze": "{start_layers: 1}"})
    config = tune_config(
        tiny_base, task_files, tmp_path, **{"method.unfreeze": "{start_layers: 2, every_steps: 2}"}
    )
    with pytest.raises(ConfigError, match="start_layers 2 leaves nothing frozen: the base has 2"):
        run(config)


def test_replay_batches_hold_the_configured_share() -> None:
    from tuning.data import Example, batches

    task = [Example([5, 6, 7 + i % 3], [-100, 6, 7 + i % 3], [5]) for i in range(30)]
    replay = [Example([99] * 4, [99] * 4, []) for _ in range(7)]
    # 6 task rows a batch: 30 examples alone, or 6 packed rows of 5 (3 tokens each, 16 a row).
    for packing, expected in ((False, 5), (True, 1)):
        out = batches(
            task,
            batch_size=8,
            max_length=16 if packing else 32,
            packing=packing,
            pad_id=0,
            seed=0,
            epoch=0,
            replay=replay,
            replay_rows=2,
        )
        replayed = [int((b["input_ids"] == 99).any(dim=1).sum()) for b in out]
        assert replayed == [2] * len(out)
        task_tokens = sum(int((b["input_ids"] == 5).sum()) for b in out)
        assert task_tokens == 30  # one pass over the task, nothing dropped
        assert len(out) == expected and all(len(b["input_ids"]) == 8 for b in out)
    plain = batches(task, batch_size=8, max_length=32, packing=False, pad_id=0, seed=0, epoch=0)
    assert len(plain) == 4 and not any(bool((b["input_ids"] == 99).any()) for b in plain)


def test_replay_run_records_its_share_and_keeps_the_check_apart(
    tiny_base: Path, task_files, tune_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from tuning.data import load_tokenizer
    from tuning.replay import reference_set, replay_set

    text = tmp_path / "general.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i}: the server answers every request." for i in range(40))
    )
    config = tune_config(
        tiny_base,
        task_files,
        tmp_path / "run",
        **{"data.replay": 0.25, "data.reference_text": text, "training.max_steps": 4},
    )
    tokenizer = load_tokenizer(tiny_base)
    checked = {tuple(e.input_ids) for e in reference_set(tokenizer, config.data)}
    replayed = {tuple(e.input_ids) for e in replay_set(tokenizer, config.data)}
    assert checked and replayed and not checked & replayed  # never trained on what is checked
    without = tune_config(tiny_base, task_files, tmp_path / "x", **{"data.reference_text": text})
    assert len(reference_set(tokenizer, without.data)) == len(checked) + len(replayed)
    train = run(config).metadata.metrics["train"]
    assert train["replay"] == {"share": 0.25, "rows_per_batch": 2, "windows": len(replayed)}
    with pytest.raises(ConfigError, match=r"data.replay 0.05 of training.batch_size 8 gives 0"):
        tune_config(tiny_base, task_files, tmp_path, **{"data.replay": 0.05})
