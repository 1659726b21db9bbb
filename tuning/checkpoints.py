"""Checkpoints of a tuning run: trainable weights, best weights, optimizer and RNG state in
safetensors, counters in JSON. Written to a temporary directory and renamed into place, so a
run killed while saving resumes from the previous complete checkpoint. Nothing is pickled."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

KEEP = 2  # complete checkpoints kept on disk


@dataclass
class TrainState:
    """Counters that must survive a restart (early stopping included)."""

    step: int = 0
    tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    train_losses: list[list[float]] = field(default_factory=list)  # [step, loss]
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, loss]
    stages: list[list[int]] = field(default_factory=list)  # unfreezing: [step, last layers]
    threads: list[list[int]] = field(default_factory=list)  # [step, torch threads from it]


def trainable_state(
    model: torch.nn.Module, names: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """The weights the run trains: `names` (the optimizer's parameters, frozen or not at this
    step of gradual unfreezing), or those that need gradients now."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if (p.requires_grad if names is None else n in names)
    }


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.contiguous()
        for index, slots in state["state"].items()
        for key, value in slots.items()
    }
    return tensors, state["param_groups"]


def save_checkpoint(
    directory: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    names: Collection[str] | None = None,
) -> Path:
    final = directory / f"step-{state.step:08d}"
    staging = directory / f".tmp-step-{state.step:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(trainable_state(model, names), staging / "trainable.safetensors")
    if best is not None:
        save_file(best, staging / "best.safetensors")
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, staging / "optimizer.safetensors")
    save_file({"cpu": torch.get_rng_state()}, staging / "rng.safetensors")
    (staging / "state.json").write_text(
        json.dumps({"train": asdict(state), "param_groups": groups}, indent=1)
    )
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    for old in sorted(directory.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    saved = json.loads((path / "state.json").read_text())
    load_trainable(model, load_file(path / "trainable.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path / "optimizer.safetensors").items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    torch.set_rng_state(load_file(path / "rng.safetensors")["cpu"])
    best_path = path / "best.safetensors"
    best = load_file(best_path) if best_path.is_file() else None
    return TrainState(**saved["train"]), best


def _lora_layout(tensors: dict[str, torch.Tensor]) -> tuple[set[int], list[str]]:
    """Ranks (rows of the A matrices) and target module names of a LoRA state dict."""
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    targets = sorted({k.split(".")[-3] for k in tensors if k.endswith("lora_A.weight")})
    return ranks, targets


def load_init_weights(model: torch.nn.Module, source: Path, alpha: float) -> None:
    """Warm start: copy a saved PEFT adapter's weights (safetensors, never pickle) into the
    freshly built PEFT `model`. ConfigError unless rank, alpha and targets match."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from tuning.errors import ConfigError

    weights, config_file = source / "adapter_model.safetensors", source / "adapter_config.json"
    if not weights.is_file() or not config_file.is_file():
        raise ConfigError(
            f"method.init_from: {source} has no adapter_config.json + adapter_model.safetensors; "
            "give a PEFT adapter directory with safetensors weights (pickled .bin is not loaded)"
        )
    saved = load_file(weights)
    saved_alpha = json.loads(config_file.read_text()).get("lora_alpha")
    expected = get_peft_model_state_dict(model)
    have, want = _lora_layout(saved), _lora_layout(expected)
    if have != want or saved_alpha != alpha:
        raise ConfigError(
            f"method.init_from: adapter {source} has rank {_ranks(have[0])}, alpha {saved_alpha} "
            f"and targets {', '.join(have[1])}; this run has rank {_ranks(want[0])}, alpha "
            f"{alpha} and targets {', '.join(want[1])}: set method.r, method.alpha and "
            "method.target_modules to the adapter's, or drop method.init_from"
        )
    mismatched = sorted(
        k
        for k in expected.keys() | saved.keys()
        if k not in saved or k not in expected or saved[k].shape != expected[k].shape
    )
    if mismatched:
        raise ConfigError(
            f"method.init_from: adapter {source} and this run's LoRA weights differ in "
            f"{len(mismatched)} tensor(s), e.g. {mismatched[0]}; use the adapter's "
            "method.layers_to_transform and method.modules_to_save, or drop method.init_from"
        )
    dtype = next(iter(expected.values())).dtype
    set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in saved.items()})


def _ranks(ranks: set[int]) -> str:
    return "/".join(str(r) for r in sorted(ranks)) or "none"
