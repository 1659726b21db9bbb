"""How a run spreads learning over the model's depth: the optimizer's parameter groups
(LoRA+ ratios, layer-wise learning-rate decay, new components at their own rate) and
gradual unfreezing (the last layers train first, earlier ones join stage by stage).

A parameter's depth is its decoder layer's index; parameters registered before the first
layer (embeddings) sit at -1 and those after the last (final norm, lm_head) at L, the
number of layers. Modules trained in full (`modules_to_save`: a new head) have no depth:
they train from the first step at `training.lr_modules_to_save`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuning.errors import ConfigError

if TYPE_CHECKING:
    from tuning.config import TrainingConfig, UnfreezeConfig

logger = logging.getLogger(__name__)


def parameter_kind(name: str) -> str:
    """a: LoRA A (and DoRA magnitudes), b: LoRA B, saved: modules trained in full."""
    return "b" if "lora_B" in name else "saved" if "modules_to_save" in name else "a"


def decoder_layers(model: torch.nn.Module) -> tuple[str, int]:
    """The qualified name and length of the model's list of decoder layers: the ModuleList
    of `config.num_hidden_layers` entries (the largest such list)."""
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found: tuple[str, int, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not len(module):
            continue
        if want is not None and len(module) != want:
            continue
        size = sum(p.numel() for p in module.parameters())
        if found is None or size > found[2]:
            found = (name, len(module), size)
    if found is None:
        raise ConfigError(
            f"cannot find this model's decoder layers (a list of {want} modules), which "
            "method.unfreeze and training.layer_lr_decay need; drop those settings"
        )
    return found[0], found[1]


def depths(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth (-1 before the layers, L after them) and L."""
    prefix, layers = decoder_layers(model)
    out: dict[str, int] = {}
    seen_layer = False
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            out[name] = int(name[len(prefix) + 1 :].split(".", 1)[0])
            seen_layer = True
        else:
            out[name] = layers if seen_layer else -1
    return out, layers


def _depth_label(depth: int, layers: int) -> str:
    return "embeddings" if depth < 0 else "top" if depth >= layers else f"layer{depth}"


def param_groups(
    model: torch.nn.Module, config: TrainingConfig, *, by_layer: bool = False
) -> list[dict[str, Any]]:
    """LoRA A (and DoRA magnitudes) at lr, B at lr * lr_ratio_b (LoRA+), saved modules at
    lr_modules_to_save; weight decay on matrices only. With layer-wise decay (or `by_layer`,
    which gradual unfreezing asks for) one group per depth, layer i's rates multiplied by
    layer_lr_decay ** (L - 1 - i): embeddings by decay ** L, the top by 1."""
    layered = by_layer or config.layer_lr_decay != 1.0
    position, layers = depths(model) if layered else ({}, 0)
    groups: dict[tuple[str, int | None, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = parameter_kind(name)
        depth = position[name] if layered and kind != "saved" else None
        groups.setdefault((kind, depth, param.ndim >= 2), []).append(param)
    rates = {
        "a": config.lr,
        "b": config.lr * config.lr_ratio_b,
        "saved": config.lr_modules_to_save or config.lr,
    }
    out = []
    for (kind, depth, decay), params in sorted(
        groups.items(), key=lambda item: (item[0][0], -2 if item[0][1] is None else item[0][1])
    ):
        rate = rates[kind]
        name = f"{kind}{'' if decay else '-nodecay'}"
        if depth is not None:
            rate *= config.layer_lr_decay ** (layers - 1 - min(depth, layers - 1))
            name += f".{_depth_label(depth, layers)}"
        out.append(
            {
                "params": params,
                "lr": rate,
                "initial_lr": rate,
                "weight_decay": config.weight_decay if decay else 0.0,
                "name": name,
                "depth": depth,
            }
        )
    return out


def describe_groups(groups: Iterable[dict[str, Any]]) -> str:
    """One line per group: name, tensors, parameters, peak rate."""
    lines = []
    for g in groups:
        size = sum(p.numel() for p in g["params"])
        lines.append(
            f"  {g['name']:<24} {len(g['params']):>4} tensors {size:>10,} params"
            f"  lr {g['initial_lr']:.3g}"
        )
    return "\n".join(lines)


@dataclass
class Unfreezing:
    """Which depths train at each optimizer step. Stage k (k = step // every_steps, or by
    epochs) trains the last start_layers + k * layers_per_stage layers and the top; the
    embeddings join with layer 0. Parameters of the other depths keep requires_grad off,
    so they get no gradient and AdamW leaves them (and its state for them) untouched."""

    config: UnfreezeConfig
    layers: int
    steps_per_epoch: int

    @classmethod
    def checked(cls, config: UnfreezeConfig, layers: int, steps_per_epoch: int) -> Unfreezing:
        if config.start_layers >= layers:
            raise ConfigError(
                f"method.unfreeze.start_layers {config.start_layers} leaves nothing frozen: the "
                f"base has {layers} layers; set it below {layers} or drop method.unfreeze"
            )
        return cls(config, layers, max(1, steps_per_epoch))

    def stage_length(self) -> int:
        """Optimizer steps per stage."""
        if self.config.every_steps is not None:
            return self.config.every_steps
        assert self.config.every_epochs is not None
        return max(1, math.ceil(self.config.every_epochs * self.steps_per_epoch))

    def trainable_layers(self, step: int) -> int:
        stage = step // self.stage_length()
        return min(self.layers, self.config.start_layers + stage * self.config.layers_per_stage)

    def trains(self, depth: int | None, step: int) -> bool:
        if depth is None or depth >= self.layers:
            return True
        return depth >= self.layers - self.trainable_layers(step) or (
            depth < 0 and self.trainable_layers(step) == self.layers
        )

    def all_trainable_at(self) -> int:
        """The first step at which every layer trains."""
        cfg = self.config
        stages = math.ceil((self.layers - cfg.start_layers) / cfg.layers_per_stage)
        return stages * self.stage_length()

    def apply(self, groups: Iterable[dict[str, Any]], step: int) -> bool:
        """Set requires_grad for `step`; True when anything changed."""
        changed = False
        for group in groups:
            on = self.trains(group["depth"], step)
            for param in group["params"]:
                if param.requires_grad != on:
                    param.requires_grad_(on)
                    changed = True
        return changed
