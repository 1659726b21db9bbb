"""Per-row adapter routing inside the model: the hf engine's LoRA layers.

PEFT's mixed-adapter batches (`adapter_names=`) rebuild index lists in every layer at every
step; at decode shapes that Python and operator dispatch cost more than the LoRA arithmetic
(docs/architecture.md, "Per-row LoRA routing": +27 ms per step over a 31 ms base step).
Here every adapted linear layer keeps the matrices of all resident adapters stacked,
pre-scaled, in fixed slots:

    y = base(x) + ((x @ A_all.T) * mask) @ B_all

with A_all (slots * R, in) and B_all (slots * R, out), R the engine's max rank (smaller
ranks are zero-padded), and `mask` (batch, 1, k * R) selecting each row's slot (all zeros:
the base model). The engine sets the routing once per forward pass for all layers, so a
batch mixes adapters and the base at the cost of two matmuls per adapted layer. When a batch
uses only k of the slots, each layer first gathers those k slots' rows of A_all and B_all
(`index_select`, contiguous rows), so the cost follows the adapters in the batch, not the
slot count (a server with 100 slots decoding 8 adapters pays for 8). Measured here:
0.90-0.91x of base-only throughput with 8 adapters + base mixed in bf16, outputs equal to
PEFT's per-adapter `generate`.

Only plain LoRA on linear layers is routed: DoRA, modules_to_save, embedding targets and
LoRA bias are refused with NotServable. A classifier (peft task_type SEQ_CLS) may also
carry its head (`score` / `classifier`), which the engine applies itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from serving.errors import NotServable

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight")
HEAD_KEY = re.compile(r"(?P<module>score|classifier)\.(?P<part>weight|bias)")
HEAD_MODULES = {"score", "classifier"}
UNROUTED_FEATURES = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
}


class Routes:
    """The routing shared by every routed layer; set by the engine before each forward."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (batch, 1, k * R) or None: base only
        self.rows: torch.Tensor | None = None  # rows of A_all/B_all in use; None: all


class RoutedLoRALinear(nn.Module):
    """A base linear layer plus the stacked LoRA matrices of every slot."""

    lora_a: torch.Tensor  # (slots * R, in)
    lora_b: torch.Tensor  # (slots * R, out), B pre-multiplied by its scale

    def __init__(self, base: nn.Linear, routes: Routes, slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.routes = routes
        self.max_rank = max_rank
        weight = base.weight
        # Buffers, not parameters: never trained, moved and cast with the model.
        self.register_buffer(
            "lora_a",
            torch.zeros(
                slots * max_rank, base.in_features, dtype=weight.dtype, device=weight.device
            ),
        )
        self.register_buffer(
            "lora_b",
            torch.zeros(
                slots * max_rank, base.out_features, dtype=weight.dtype, device=weight.device
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        mask = self.routes.mask
        if mask is None:
            return out
        a, b, rows = self.lora_a, self.lora_b, self.routes.rows
        if rows is not None:
            a, b = a.index_select(0, rows), b.index_select(0, rows)
        # x (batch, seq, in) @ (in, k*R) -> (batch, seq, k*R); mask keeps each row's slot;
        # then out += h @ B in place (inference only: nothing here keeps a graph)
        h = torch.matmul(x, a.t()).mul_(mask)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b)
        return out

    def write_slot(
        self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float = 1.0
    ) -> None:
        """Store A (r, in) and B * scale (out, r) in `slot`; None clears the slot."""
        rows = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
        with torch.no_grad():
            self.lora_a[rows] = 0
            self.lora_b[rows] = 0
            if a is not None and b is not None:
                r = a.shape[0]
                self.lora_a[rows.start : rows.start + r] = a.to(self.lora_a.dtype)
                scaled = b.float().t() * scale
                self.lora_b[rows.start : rows.start + r] = scaled.to(self.lora_b.dtype)


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from disk: per module, A (r, in), B (out, r) and B's scale.

    Only file reading happens here; the arithmetic (scaling, casting) runs when the slot is
    written, on the engine's thread (see `serving.engines.hf` on threads)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    # A classifier's head: W (labels, hidden) and its bias, if any.
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None


def _scale(config: dict[str, object], module: str, rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))  # type: ignore[arg-type]
    for key, value in (config.get("alpha_pattern") or {}).items():  # type: ignore[attr-defined]
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(directory: Path) -> AdapterWeights:
    """Read a PEFT LoRA directory (safetensors only) into per-module A, B and scale."""
    config = json.loads((directory / "adapter_config.json").read_text())
    classifier = str(config.get("task_type") or "").upper() == "SEQ_CLS"
    if classifier:  # its head is saved whole; anything else trained whole is not served
        config = {
            **config,
            "modules_to_save": sorted(set(config.get("modules_to_save") or []) - HEAD_MODULES),
        }
    for key, feature in UNROUTED_FEATURES.items():
        if config.get(key):
            raise NotServable(
                f"adapter {directory} uses {feature}, which the hf engine's routed LoRA layers "
                "do not serve; retrain without it"
            )
    if config.get("bias", "none") != "none":
        raise NotServable(
            f"adapter {directory} trains LoRA bias, which the hf engine does not serve"
        )
    tensors = load_file(directory / "adapter_model.safetensors")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if classifier and (found := HEAD_KEY.fullmatch(name)) is not None:
            head[found["part"]] = value
            continue
        match = LORA_KEY.fullmatch(name)
        if match is None:
            raise NotServable(f"adapter {directory}: tensor {key!r} is not a LoRA A/B matrix")
        parts.setdefault(match["module"], {})[match["part"]] = value
    modules = {}
    for module, ab in parts.items():
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        modules[module] = (a, b, _scale(config, module, rank))
    if classifier and "weight" not in head:
        raise NotServable(f"classifier {directory} has no head (score.weight); save it again")
    return AdapterWeights(
        modules,
        max(a.shape[0] for a, _, _ in modules.values()),
        (head["weight"], head.get("bias")) if classifier else None,
    )


class AdapterSlots:
    """The routed layers of one model and which adapter occupies which slot."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int) -> None:
        self.model = model
        self.slots = slots
        self.max_rank = max_rank
        self.routes = Routes()
        self.layers: dict[str, RoutedLoRALinear] = {}
        self._modules = dict(model.named_modules())
        self._occupied: dict[int, set[str]] = {}  # slot -> modules written

    def _layer(self, module: str) -> RoutedLoRALinear:
        """The routed layer for `module`, wrapping the base linear on first use."""
        if module in self.layers:
            return self.layers[module]
        target = self._modules.get(module)
        if not isinstance(target, nn.Linear):
            raise NotServable(f"module {module!r} is not a linear layer of the base model")
        parent_name, _, child = module.rpartition(".")
        routed = RoutedLoRALinear(target, self.routes, self.slots, self.max_rank)
        setattr(self._modules[parent_name], child, routed)
        self.layers[module] = routed
        return routed

    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into `slot` (clearing what was there)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        if weights.rank > self.max_rank:
            raise NotServable(
                f"adapter rank {weights.rank} > max rank {self.max_rank} of this engine; "
                f"start the server with --max-rank {weights.rank}"
            )
        for module in weights.modules:
            self._layer(module)  # fail before writing anything
        self.clear(slot)
        for module, (a, b, scale) in weights.modules.items():
            self.layers[module].write_slot(slot, a, b, scale)
        self._occupied[slot] = set(weights.modules)

    def clear(self, slot: int) -> None:
        for module in self._occupied.pop(slot, set()):
            self.layers[module].write_slot(slot, None, None)

    def set_rows(self, slots: list[int | None], dtype: torch.dtype) -> None:
        """Route row i of the next forward pass to slots[i] (None: base model)."""
        used = sorted({s for s in slots if s is not None})
        if not used:
            self.routes.mask, self.routes.rows = None, None
            return
        r = self.max_rank
        position = {slot: i for i, slot in enumerate(used)}
        mask = torch.zeros(len(slots), 1, len(used) * r, dtype=dtype)
        for row, slot in enumerate(slots):
            if slot is not None:
                at = position[slot] * r
                mask[row, 0, at : at + r] = 1
        self.routes.mask = mask
        if len(used) == self.slots:
            self.routes.rows = None
        else:
            starts = torch.tensor(used) * r
            self.routes.rows = (starts[:, None] + torch.arange(r)).reshape(-1)
